"""Reward-model training: Bradley–Terry on preference pairs, through the same entry point and FSDP2 machinery as GRPO.

    OMP_NUM_THREADS=1 python train.py --config configs/reward_model_tiny.yaml    # tiny, CPU, about a minute
    torchrun --nproc_per_node 8 train.py --config my_rm.yaml model.path=Qwen/Qwen2.5-VL-3B-Instruct
    python train.py --config configs/reward_model_tiny.yaml --resume             # from run_dir/checkpoints/latest

One step: each rank takes its slice of the step's global batch of pairs, encodes chosen and rejected responses
as one batch of 2P rows, runs one forward, and minimises `reward_model.preference_loss` (scalar BT + per-aspect
BT on labelled pairs + rating regression); gradients are clipped, a non-finite norm skips the step on every rank.
Held-out pair accuracy is measured before training, every `train.eval_every` steps and at the end. The run
directory gets `metrics.jsonl` (one line per step and per evaluation), checkpoints, and the trained reward
model at `run_dir/reward_model/` (load it with `RewardModel.from_pretrained`, or name it in a GRPO config's
`reward_model.path`).

Every config key is in REWARD_MODEL_DEFAULTS with its meaning. Left out: gradient accumulation, early stopping,
and starting from an existing reward-model folder (training starts from a backbone and a fresh head).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import yaml

from harmo_min import distributed as hdist
from harmo_min.config import lr_schedule
from harmo_min.data import FORMAT_INSTRUCTIONS, PreferencePair, iterate_batches, load_preference_jsonl
from harmo_min.synthetic import synthetic_pairs
from harmo_min.model import build_tiny, load_policy
from harmo_min.reward_model import RewardConfig, RewardModel, encode_pairs, preference_loss, split_pairs

REWARD_MODEL_DEFAULTS = {
    "stage": "reward_model",
    "run_dir": "runs/reward_model",    # checkpoints, metrics.jsonl, config.yaml, the exported reward_model/
    "seed": 0,
    "model": {
        "path": "tiny",                # backbone: a local Qwen2.5-VL folder or cached hub id; "tiny" = build_tiny(seed)
        "dtype": "float32",            # parameter dtype: float32 on CPU; bfloat16 on GPU
        "attn_implementation": "sdpa",
        "activation_checkpointing": False,
    },
    "reward_model": {
        "aspects": ["score"],          # head outputs, one per aspect; one aspect = a scalar reward model
        "gate": "fixed",               # fixed | prompt (ArmoRM-style gating network on the prompt)
        "gate_temperature": 1.0,       # τ of softmax(MLP(h_prompt) / τ)
        "fixed_weights": None,         # one weight per aspect for gate fixed; null = uniform
        "gate_hidden": 256,            # width of the gating network's hidden layer
        "freeze_backbone": False,      # train only the head and gate (the backbone runs without autograd)
    },
    "data": {
        "train": "synthetic",          # a preference JSONL file (see reward_model.py) or "synthetic"
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_config(cfg: dict, world_size: int) -> RewardConfig:
    """Everything that can be wrong with a config, before any model is loaded."""
    rm = {k: v for k, v in cfg["reward_model"].items() if k != "freeze_backbone"}
    model_cfg = RewardConfig.from_dict(rm)
    if cfg["model"]["dtype"] not in DTYPES:
        raise ValueError(f"model.dtype: unknown {cfg['model']['dtype']!r}; expected one of {list(DTYPES)}")
    t, d = cfg["train"], cfg["data"]
    for key, value in [("train.steps", t["steps"]), ("train.batch_size", t["batch_size"]),
                       ("train.eval_batch_size", t["eval_batch_size"]), ("train.log_every", t["log_every"])]:
        if value < 1:
            raise ValueError(f"{key}: must be >= 1, got {value}")
    if t["batch_size"] % world_size:
        raise ValueError(f"train.batch_size={t['batch_size']} is not divisible by {world_size} ranks")
    if d["n_eval"] < 0 or d["n_train"] < 1:
        raise ValueError(f"data.n_train must be >= 1 and data.n_eval >= 0, got {d['n_train']} and {d['n_eval']}")
    if d["answer_format"] is not None and d["answer_format"] not in FORMAT_INSTRUCTIONS:
        raise ValueError(f"data.answer_format: unknown {d['answer_format']!r}; expected one of "
                         f"{list(FORMAT_INSTRUCTIONS)} or null")
    if cfg["optim"]["schedule"] not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule: expected constant or cosine, got {cfg['optim']['schedule']!r}")
    return model_cfg


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


def build_reward_model(cfg: dict, model_cfg: RewardConfig, dist: hdist.Dist) -> RewardModel:
    m = cfg["model"]
    dtype = DTYPES[m["dtype"]]
    if m["path"] == "tiny":
        policy, processor = build_tiny(seed=cfg["seed"])
    else:
        policy, processor = load_policy(m["path"], dtype=dtype, attn_implementation=m["attn_implementation"])
    torch.manual_seed(cfg["seed"])  # the same head and gate on every rank before sharding
    rm = RewardModel(policy, processor, model_cfg).to(dtype=dtype, device=dist.device)
    del policy  # its LM head is not part of the reward model
    rm.set_backbone_trainable(not cfg["reward_model"]["freeze_backbone"])
    if m["activation_checkpointing"]:
        rm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return hdist.apply_fsdp(rm, dist)  # vision tower, each decoder layer, root (+ head, gate); identity for 1 rank


@torch.no_grad()
def evaluate(rm: RewardModel, pairs: list[PreferencePair], cfg: dict, dist: hdist.Dist) -> dict[str, float]:
    """Held-out pair accuracy, margin and per-aspect accuracy; every rank scores its slice (a collective)."""
    mine = pairs[dist.rank::dist.world_size]
    kw = dict(answer_format=cfg["data"]["answer_format"], batch_size=cfg["train"]["eval_batch_size"])
    examples = [p.example for p in mine]
    a_c, s_c = rm.score(examples, [p.chosen for p in mine], **kw)                   # (P, K), (P,)
    a_r, s_r = rm.score(examples, [p.rejected for p in mine], **kw)
    margin = s_c - s_r                                                               # (P,)
    k = len(rm.aspects)
    index = {a: i for i, a in enumerate(rm.aspects)}
    correct, count = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for i, p in enumerate(mine):
        if p.aspect is not None:
            j = index[p.aspect]
            d = a_c[i, j] - a_r[i, j]
            correct[j] += float(d > 0) + 0.5 * float(d == 0)
            count[j] += 1
    wins = (margin > 0).double() + 0.5 * (margin == 0).double()
    totals = torch.cat([torch.tensor([wins.sum(), margin.double().sum(), len(mine)]), correct, count]).to(dist.device)
    totals = hdist.all_reduce(totals).cpu()
    n = max(totals[2].item(), 1.0)
    out = {"eval/accuracy": totals[0].item() / n, "eval/margin": totals[1].item() / n}
    for j, name in enumerate(rm.aspects):
        if totals[3 + k + j] > 0:
            out[f"eval/accuracy/{name}"] = totals[3 + j].item() / totals[3 + k + j].item()
    return out


def _reduce_step(stats: dict[str, torch.Tensor], aspects: list[str], dist: hdist.Dist) -> dict[str, float]:
    # Means over ranks (every rank has the same number of pairs); per-aspect accuracy from summed counts.
    keys = ("loss", "bt", "bt_aspect", "rating_mse", "accuracy", "margin")
    flat = torch.cat([torch.stack([stats[k].detach().double() for k in keys]),
                      stats["aspect_correct"].double(), stats["aspect_count"].double()]).to(dist.device)
    flat = hdist.all_reduce(flat).cpu()
    out = {k: flat[i].item() / dist.world_size for i, k in enumerate(keys)}
    k = len(aspects)
    for j, name in enumerate(aspects):
        if flat[len(keys) + k + j] > 0:
            out[f"accuracy/{name}"] = flat[len(keys) + j].item() / flat[len(keys) + k + j].item()
    return out


def train_reward_model(cfg: dict, resume: bool = False) -> dict[str, float]:
    """Train a reward model as `cfg` says; return the final metrics (the last step's and the last evaluation's)."""
    dist = hdist.init_distributed()
    model_cfg = check_config(cfg, dist.world_size)
    run_dir = Path(cfg["run_dir"])
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    train_pairs, eval_pairs = load_pairs(cfg, model_cfg.aspects)

    rm = build_reward_model(cfg, model_cfg, dist)
    o, t = cfg["optim"], cfg["train"]
    params = [p for p in rm.parameters() if p.requires_grad]
    # No weight decay on biases and norm gains: decaying them towards 0 only fights the fit.
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": o["weight_decay"]},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=o["lr"], betas=(o["beta1"], o["beta2"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    start = 0
    if resume:
        state = hdist.load_latest_checkpoint(run_dir, model=rm, optimizer=optimizer, scheduler=scheduler)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints")
        start = state["step"]
    metrics_file = run_dir / "metrics.jsonl"
    if dist.is_main and not resume:
        metrics_file.write_text("")

    def log(metrics: dict) -> None:
        if dist.is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")

    def run_eval(step: int) -> dict[str, float]:
        result = {"step": step, **evaluate(rm, eval_pairs, cfg, dist)}
        log(result)
        if dist.is_main:
            aspects = " ".join(f"{k[14:]}={v:.3f}" for k, v in result.items() if k.startswith("eval/accuracy/"))
            print(f"step {step:4d} | eval acc {result['eval/accuracy']:.3f} | eval margin {result['eval/margin']:+.3f} | "
                  f"{aspects}", flush=True)
        return result

    final: dict[str, float] = {}
    if eval_pairs and start == 0:
        final = {f"init_{k}": v for k, v in run_eval(0).items() if k.startswith("eval/")}  # the "before" figure

    per_rank = t["batch_size"] // dist.world_size
    batches = iterate_batches(train_pairs, t["batch_size"], seed=cfg["seed"], start=start)
    rm.train()
    for step in range(start, t["steps"]):
        t0 = time.perf_counter()
        pairs = next(batches)[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        batch, labels = encode_pairs(rm.processor, pairs, model_cfg.aspects, cfg["data"]["answer_format"])
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        labels = {k: v.to(dist.device) for k, v in labels.items()}
        chosen, rejected = split_pairs(rm(**batch))
        stats = preference_loss(chosen, rejected, labels["aspect_index"], chosen_ratings=labels.get("chosen_ratings"),
                                rejected_ratings=labels.get("rejected_ratings"),
                                aspect_weight=cfg["loss"]["aspect_weight"], rating_weight=cfg["loss"]["rating_weight"])
        stats["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o["grad_clip"])
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        # The norm is global under FSDP, but decide collectively anyway: no rank may step (or skip) alone.
        finite = hdist.all_true(math.isfinite(grad_norm) and bool(torch.isfinite(stats["loss"])), dist.device)
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        metrics = {"step": step + 1, **_reduce_step(stats, model_cfg.aspects, dist), "grad_norm": grad_norm,
                   "skipped_step": 0.0 if finite else 1.0, "lr": scheduler.get_last_lr()[0],
                   "step_time_s": time.perf_counter() - t0}
        log(metrics)
        final.update(metrics)
        if dist.is_main and (step + 1) % t["log_every"] == 0:
            print(f"step {step + 1:4d} | loss {metrics['loss']:.4f} | acc {metrics['accuracy']:.3f} | "
                  f"margin {metrics['margin']:+.3f} | lr {metrics['lr']:.2e} | {metrics['step_time_s']:.2f}s", flush=True)
        last = step + 1 == t["steps"]
        if eval_pairs and ((t["eval_every"] and (step + 1) % t["eval_every"] == 0) or last):
            final.update(run_eval(step + 1))
        if (t["save_every"] and (step + 1) % t["save_every"] == 0) or (last and t["save_every"]):
            hdist.save_checkpoint(run_dir, step + 1, model=rm, optimizer=optimizer, scheduler=scheduler)

    if t["export"]:
        out = rm.save_pretrained(run_dir / "reward_model")
        if dist.is_main:
            print(f"exported {out} (RewardModel.from_pretrained, or reward_model.path in a GRPO config)", flush=True)
    hdist.cleanup()
    return final
