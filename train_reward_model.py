"""Reward-model training: Bradley–Terry on preference pairs, with the same FSDP2 and precision recipe as GRPO.

    OMP_NUM_THREADS=1 python train_reward_model.py --config configs/reward_model_tiny.yaml   # tiny, CPU, a minute
    torchrun --nproc_per_node 8 train_reward_model.py --config my_rm.yaml model.path=/models/Qwen2.5-VL-3B-Instruct
    python train_reward_model.py --config configs/reward_model_tiny.yaml --resume          # from the latest checkpoint

One step: each rank takes its slice of the step's global batch of pairs, encodes chosen and rejected responses as
one batch of 2P rows, runs one forward, and minimises `reward_model.preference_loss` (scalar BT + per-aspect BT on
labelled pairs + rating regression); gradients are clipped, a non-finite norm skips the step on every rank.
Held-out pair accuracy is measured before training, every `train.eval_every` steps and at the end. The run
directory gets `metrics.jsonl` (one line per step and per evaluation), checkpoints, and the trained reward model at
`run_dir/reward_model/` (load it with `RewardModel.from_pretrained`, or name it in a GRPO config's
`reward_model.path`).

Precision as in train.py: float32 master weights and AdamW state, `model.compute_dtype` for forward and backward.
Every config key is in REWARD_MODEL_DEFAULTS with its meaning. Left out: gradient accumulation, early stopping,
starting from an existing reward-model folder (training starts from a backbone and a fresh head), and rank-0-only
loading (every rank reads the backbone once before sharding).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from harmo_min.config import (NOT_EMPTY, above, above_or_null, at_least, in_range, load_config, lr_schedule, one_of,
                              parse_run_args)
from harmo_min.data import FORMAT_INSTRUCTIONS, PreferencePair, iterate_batches, load_preference_jsonl
from harmo_min.distributed import (apply_fsdp, cleanup, clip_grad_norm, init_distributed, load_latest_checkpoint,
                                   save_checkpoint)
from harmo_min.model import DTYPES, load_model, resolve_dtype
from harmo_min.reward_model import (HeadConfig, RewardModel, aspect_wins, encode_pairs, pair_wins, preference_loss,
                                    split_pairs)
from harmo_min.synthetic import synthetic_pairs
from harmo_min.tracking import RunLog, check_run_dir

REWARD_MODEL_DEFAULTS = {
    "run_dir": "runs/reward_model",    # checkpoints, metrics.jsonl, config.yaml, the exported reward_model/
    "seed": 0,
    "model": {
        "path": "tiny",                # backbone: a local Qwen2.5-VL folder or cached hub id; "tiny" = build_tiny(seed)
        "compute_dtype": "auto",       # forward/backward dtype: auto = bfloat16 on GPU, float32 on CPU
        "attn_implementation": "sdpa",
        "activation_checkpointing": False,
        "freeze_backbone": False,      # train only the head and gate (the backbone runs without autograd)
    },
    "head": {
        "aspects": ["score"],          # head outputs, one per aspect; one aspect = a scalar reward model
        "gate": "fixed",               # fixed | prompt (ArmoRM-style gating network on the prompt)
        "gate_temperature": 1.0,       # τ of softmax(MLP(h_prompt) / τ)
        "fixed_weights": None,         # one weight per aspect for gate fixed; null = uniform
        "gate_hidden": 256,            # width of the gating network's hidden layer
    },
    "data": {
        "train": "synthetic",          # a preference JSONL file (see data.py) or "synthetic"
        "eval": None,                  # a preference JSONL file; null: n_eval pairs held out (synthetic: a new seed)
        "kinds": ["count", "digits", "arithmetic", "choice", "colour", "describe"],  # synthetic kinds of the pairs
        "n_train": 2048,               # synthetic pairs
        "n_eval": 256,                 # held-out pairs (0: no evaluation)
        "answer_format": "think_answer",  # instruction appended to prompts, as in GRPO; null: prompts as written
    },
    "optim": {"lr": 1e-5, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "warmup_steps": 0,
              "schedule": "cosine", "grad_clip": 1.0},
    "loss": {"aspect_weight": 1.0, "rating_weight": 1.0},  # λ_aspect, λ_rating of reward_model.preference_loss
    "train": {
        "steps": 1000,
        "batch_size": 32,              # pairs per step, global: split evenly over ranks
        "eval_batch_size": 32,         # responses per scoring forward
        "log_every": 1, "eval_every": 100,
        "save_every": 0,               # checkpoint every N steps (0: never)
        "export": True,                # the trained reward model at run_dir/reward_model/
    },
}
RULES = {
    "model.path": NOT_EMPTY, "model.compute_dtype": one_of("auto", *DTYPES),
    "data.answer_format": one_of(None, *FORMAT_INSTRUCTIONS), "data.n_train": at_least(1), "data.n_eval": at_least(0),
    "optim.lr": above(0), "optim.weight_decay": at_least(0), "optim.beta1": in_range(0, 1),
    "optim.beta2": in_range(0, 1), "optim.warmup_steps": at_least(0), "optim.schedule": one_of("constant", "cosine"),
    "optim.grad_clip": above_or_null(0), "loss.aspect_weight": at_least(0), "loss.rating_weight": at_least(0),
    "train.steps": at_least(1), "train.batch_size": at_least(1), "train.eval_batch_size": at_least(1),
    "train.log_every": at_least(1), "train.eval_every": at_least(0), "train.save_every": at_least(0),
}


def load_pairs(cfg: dict, aspects: list[str]) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Training and held-out pairs. Synthetic aspect labels the model has no output for are dropped (overall only)."""
    d, seed = cfg["data"], cfg["seed"]
    if d["train"] == "synthetic":
        kw = dict(kinds=d["kinds"], answer_format=d["answer_format"])
        train, held_out = synthetic_pairs(d["n_train"], seed=seed, **kw), synthetic_pairs(d["n_eval"], seed=seed + 10_007, **kw)
        for p in train + held_out:
            p.aspect = p.aspect if p.aspect in aspects else None
        return train, held_out
    train = load_preference_jsonl(d["train"], aspects=aspects)
    if d["eval"]:
        return train, load_preference_jsonl(d["eval"], aspects=aspects)
    if d["n_eval"] >= len(train):
        raise ValueError(f"data.n_eval={d['n_eval']} leaves no training pairs out of {len(train)} in {d['train']}")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    return [train[i] for i in order[d["n_eval"]:]], [train[i] for i in order[:d["n_eval"]]]


@torch.no_grad()
def evaluate(rm: RewardModel, pairs: list[PreferencePair], cfg: dict, world) -> dict[str, float]:
    """Held-out pair accuracy, margin and per-aspect accuracy; every rank scores its slice (a collective)."""
    mine = pairs[world.rank::world.size]
    kw = dict(answer_format=cfg["data"]["answer_format"], batch_size=cfg["train"]["eval_batch_size"])
    examples = [p.example for p in mine]
    a_c, s_c = rm.score(examples, [p.chosen for p in mine], **kw)                   # (P, K), (P,)
    a_r, s_r = rm.score(examples, [p.rejected for p in mine], **kw)
    k = len(rm.aspects)
    index = torch.tensor([-1 if p.aspect is None else rm.aspects.index(p.aspect) for p in mine], dtype=torch.long)
    correct, count = aspect_wins(a_c, a_r, index)                                    # (K,), (K,)
    totals = world.sum([float(pair_wins(s_c - s_r).sum()), float((s_c - s_r).sum()), len(mine), *correct.tolist(),
                        *count.tolist()])
    n = max(totals[2], 1.0)
    out = {"eval/accuracy": totals[0] / n, "eval/margin": totals[1] / n}
    for j, name in enumerate(rm.aspects):
        if totals[3 + k + j] > 0:
            out[f"eval/accuracy/{name}"] = totals[3 + j] / totals[3 + k + j]
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train a reward model; return the final metrics (the last step's and the last evaluation's)."""
    args = parse_run_args(argv, description=__doc__.split("\n\n")[0], default_config="configs/reward_model_tiny.yaml")
    cfg = load_config(args.config, args.overrides, defaults=REWARD_MODEL_DEFAULTS,
                      open_keys=("head.fixed_weights", "data.kinds"), rules=RULES)
    head_cfg = HeadConfig.from_dict(cfg["head"])
    run_dir, o, t = Path(cfg["run_dir"]), cfg["optim"], cfg["train"]
    earlier = check_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)
    train_pairs, eval_pairs = load_pairs(cfg, head_cfg.aspects)

    world = init_distributed()
    if t["batch_size"] % world.size:
        raise ValueError(f"train.batch_size={t['batch_size']} is not divisible by {world.size} ranks")
    m = cfg["model"]
    backbone, processor = load_model(m["path"], seed=cfg["seed"], attn_implementation=m["attn_implementation"])
    torch.manual_seed(cfg["seed"])  # the same head and gate on every rank before sharding
    rm = RewardModel(backbone, processor, head_cfg).to(device=world.device)  # float32: the master weights
    del backbone  # its LM head is not part of the reward model
    rm.set_backbone_trainable(not m["freeze_backbone"])
    if m["activation_checkpointing"]:
        rm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    rm = apply_fsdp(rm, world, compute_dtype=resolve_dtype(m["compute_dtype"], world.device))
    params = [p for p in rm.parameters() if p.requires_grad]
    # No weight decay on biases and norm gains: decaying them towards 0 only fights the fit.
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": o["weight_decay"]},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=o["lr"], betas=(o["beta1"], o["beta2"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    start = 0
    if args.resume:
        start = load_latest_checkpoint(run_dir, model=rm, optimizer=optimizer, scheduler=scheduler)["step"]
    log = RunLog(run_dir, world, cfg, resume_step=start if args.resume else None, overwrite=earlier)

    def run_eval(step: int) -> dict[str, float]:
        result = {"step": step, **evaluate(rm, eval_pairs, cfg, world)}
        log.write(result)
        if world.is_main:
            aspects = " ".join(f"{k[14:]}={v:.3f}" for k, v in result.items() if k.startswith("eval/accuracy/"))
            print(f"step {step:4d} | eval acc {result['eval/accuracy']:.3f} | eval margin {result['eval/margin']:+.3f} | "
                  f"{aspects}", flush=True)
        return result

    final: dict[str, float] = {}
    if eval_pairs and start == 0:
        final = {f"init_{k}": v for k, v in run_eval(0).items() if k.startswith("eval/")}  # the "before" figure

    per_rank = t["batch_size"] // world.size
    batches = iterate_batches(train_pairs, t["batch_size"], seed=cfg["seed"], start=start)
    rm.train()
    for step in range(start, t["steps"]):
        t0 = time.perf_counter()
        pairs = next(batches)[world.rank * per_rank:(world.rank + 1) * per_rank]
        batch, labels = encode_pairs(rm.processor, pairs, head_cfg.aspects, cfg["data"]["answer_format"])
        batch = {k: v.to(world.device) for k, v in batch.items()}
        labels = {k: v.to(world.device) for k, v in labels.items()}
        chosen, rejected = split_pairs(rm(**batch))
        stats = preference_loss(chosen, rejected, labels["aspect_index"], chosen_ratings=labels.get("chosen_ratings"),
                                rejected_ratings=labels.get("rejected_ratings"),
                                aspect_weight=cfg["loss"]["aspect_weight"], rating_weight=cfg["loss"]["rating_weight"])
        # Each rank's loss is the mean over its equal share of the pairs and FSDP sums gradients over ranks
        # (distributed.apply_fsdp): dividing by the world size makes the summed gradient that of the global mean.
        (stats["loss"] / world.size).backward()
        grad_norm = clip_grad_norm(params, o["grad_clip"])
        # The norm is global under FSDP, but decide collectively anyway: no rank may step (or skip) alone.
        stepped = world.all_true(math.isfinite(grad_norm) and bool(torch.isfinite(stats["loss"])))
        if stepped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()

        # Means over ranks (every rank has the same number of pairs); per-aspect accuracy from summed counts.
        keys = ("loss", "bt", "bt_aspect", "rating_mse", "accuracy", "margin")
        k = len(head_cfg.aspects)
        sums = world.sum([float(stats[key].detach()) for key in keys] + stats["aspect_correct"].tolist()
                         + stats["aspect_count"].tolist())
        metrics = {"step": step + 1, **{key: sums[i] / world.size for i, key in enumerate(keys)}}
        for j, name in enumerate(head_cfg.aspects):
            if sums[len(keys) + k + j] > 0:
                metrics[f"accuracy/{name}"] = sums[len(keys) + j] / sums[len(keys) + k + j]
        metrics.update(grad_norm=grad_norm, skipped_step=0.0 if stepped else 1.0, lr=lr,
                       step_time_s=time.perf_counter() - t0)
        log.write(metrics)
        final.update(metrics)
        if world.is_main and (step + 1) % t["log_every"] == 0:
            print(f"step {step + 1:4d} | loss {metrics['loss']:.4f} | acc {metrics['accuracy']:.3f} | "
                  f"margin {metrics['margin']:+.3f} | lr {metrics['lr']:.2e} | {metrics['step_time_s']:.2f}s", flush=True)
        last = step + 1 == t["steps"]
        if eval_pairs and ((t["eval_every"] and (step + 1) % t["eval_every"] == 0) or last):
            final.update(run_eval(step + 1))
        if t["save_every"] and ((step + 1) % t["save_every"] == 0 or last):
            save_checkpoint(run_dir, step + 1, model=rm, optimizer=optimizer, scheduler=scheduler)

    if t["export"]:
        out = rm.save_pretrained(run_dir / "reward_model")
        if world.is_main:
            print(f"exported {out} (RewardModel.from_pretrained, or reward_model.path in a GRPO config)", flush=True)
    cleanup()
    return final


if __name__ == "__main__":
    main()
