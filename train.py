"""harmo_min training: GRPO with HARMO's hybrid + multi-aspect rewards, or a reward model (`stage: reward_model`).

    python train.py                                             # tiny CPU default: learns a toy visual task
    torchrun --nproc_per_node 2 train.py --config configs/tiny.yaml
    torchrun --nproc_per_node 8 train.py --config configs/qwen2_5_vl_3b.yaml rollout.n=8 reward.weights.length=0.5
    python train.py --config configs/tiny.yaml --resume       # continue from run_dir/checkpoints/latest

One GRPO step, as the loop below reads:
  1. prompts   each rank takes its slice of the step's global prompt batch and encodes it once (left padded)
  2. rollout   n responses per prompt with the hand-written sampler, full parameters gathered for the phase
  3. rewards   every aspect per response (rewards.py), reward-model scores for open items when configured
  4. advantage A = R − group mean (grpo.py); groups with no accuracy variance optionally masked out
  5. update    micro-batched forward/backward; the token normaliser is counted over all ranks first
  6. step      grad clip, a collective finite check, optimizer + LR schedule
  7. log       one console line, metrics.jsonl, sample rollouts, checkpoints; an HF export at the end

Every config key is listed in GRPO_DEFAULTS with its meaning; configs/*.yaml override them, `key.path=value`
arguments override the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from harmo_min import distributed as hdist
from harmo_min.config import load_config, lr_schedule
from harmo_min.data import encode_prompts, iterate_batches, load_jsonl
from harmo_min.synthetic import synthetic_examples
from harmo_min.grpo import AGGREGATIONS, group_advantages, grpo_loss, prompt_batch, token_logprobs, zero_variance_groups
from harmo_min.model import build_tiny, load_policy
from harmo_min.rewards import RewardConfig, aspect_means, route_counts, score_batch
from harmo_min.rollout import sample

GRPO_DEFAULTS = {
    "stage": "grpo",
    "run_dir": "runs/tiny",           # checkpoints, metrics.jsonl, samples/, the exported model
    "seed": 0,
    "model": {
        "path": "tiny",               # a local HF folder or cached hub id; "tiny" = build_tiny(seed) random weights
        "dtype": "float32",           # parameter dtype: float32 on CPU; bfloat16 on GPU
        "attn_implementation": "sdpa",
        "activation_checkpointing": False,  # recompute decoder layers in backward: long responses at 3B/7B
    },
    "data": {
        "train": "synthetic",         # a JSONL file (see data.py) or "synthetic"
        "kinds": ["count", "digits", "arithmetic", "choice", "colour", "describe"],  # synthetic task kinds
        "n_train": 1024,              # synthetic examples
        "image_size": 112,
        "answer_format": "think_answer",  # instruction appended to prompts: think_answer | boxed | bare
    },
    "rollout": {"n": 8, "max_new_tokens": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
    "reward": {},                     # rewards.RewardConfig keys (weights, combine, min_confidence, plugins, ...)
    "reward_model": {"path": None, "batch_size": 16},  # a folder from `stage: reward_model` or Skywork-VL-Reward layout
    "grpo": {
        "prompts_per_step": 16,       # global: split evenly over ranks
        "micro_batch_size": 32,       # responses per forward/backward
        "epochs": 1,                  # updates per rollout batch (>1 stores old log-probs)
        "clip_low": 0.2, "clip_high": 0.28,
        "kl_coef": 0.0,               # β of the k3 KL to a frozen reference (loaded only when > 0)
        "aggregation": "token_mean",  # token_mean | seq_mean | constant (Dr. GRPO)
        "constant_divisor": None,     # C for `constant`; null = rollout.max_new_tokens
        "scale_std": False,           # divide advantages by the group std (original GRPO); HARMO does not
        "drop_zero_variance_groups": False,  # mask out groups whose accuracy is all equal (DAPO dynamic sampling)
    },
    "optim": {"lr": 1e-6, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99, "warmup_steps": 0,
              "schedule": "constant", "grad_clip": 1.0},
    "train": {
        "steps": 100, "log_every": 1,
        "save_every": 0,              # checkpoint every N steps (0: only at the end when export is on)
        "sample_every": 10,           # write sample rollouts to run_dir/samples/ every N steps (0: never)
        "export": True,               # an HF folder at run_dir/final at the end
        "tensorboard": False, "wandb": False,
    },
}
OPEN_KEYS = ("reward", "data.kinds")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------

def check_config(cfg: dict, world_size: int) -> RewardConfig:
    """Everything that can be wrong with a config, before any model is loaded."""
    g, r = cfg["grpo"], cfg["rollout"]
    if cfg["model"]["dtype"] not in DTYPES:
        raise ValueError(f"model.dtype: unknown {cfg['model']['dtype']!r}; expected one of {list(DTYPES)}")
    if g["aggregation"] not in AGGREGATIONS:
        raise ValueError(f"grpo.aggregation: unknown {g['aggregation']!r}; expected one of {AGGREGATIONS}")
    if g["prompts_per_step"] % world_size:
        raise ValueError(f"grpo.prompts_per_step={g['prompts_per_step']} is not divisible by {world_size} ranks")
    for key, value in [("rollout.n", r["n"]), ("rollout.max_new_tokens", r["max_new_tokens"]),
                       ("grpo.micro_batch_size", g["micro_batch_size"]), ("grpo.epochs", g["epochs"]),
                       ("train.steps", cfg["train"]["steps"])]:
        if value < 1:
            raise ValueError(f"{key}: must be >= 1, got {value}")
    if r["n"] < 2:
        raise ValueError("rollout.n: GRPO needs at least 2 responses per prompt for a group baseline")
    if cfg["optim"]["schedule"] not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule: expected constant or cosine, got {cfg['optim']['schedule']!r}")
    reward = RewardConfig.from_dict(cfg["reward"], answer_format=cfg["data"]["answer_format"])
    return reward.resolve(r["max_new_tokens"])


def build_policy(cfg: dict, dist: hdist.Dist):
    m = cfg["model"]
    dtype = DTYPES[m["dtype"]]
    if m["path"] == "tiny":
        model, processor = build_tiny(seed=cfg["seed"])
        model = model.to(dtype=dtype, device=dist.device)
        model = hdist.apply_fsdp(model, dist, param_dtype=None)
    else:
        # Rank 0 reads the weights; the others receive their shards (never 8 host copies of the checkpoint).
        model, processor = hdist.load_sharded_policy(m["path"], dist, dtype=dtype,
                                                     attn_implementation=m["attn_implementation"])
    if m["activation_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def load_examples(cfg: dict):
    d = cfg["data"]
    if d["train"] == "synthetic":
        return synthetic_examples(d["n_train"], seed=cfg["seed"], kinds=tuple(d["kinds"]), size=d["image_size"])
    return load_jsonl(d["train"])


# ---------------------------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------------------------

def grpo_update(policy, optimizer, prompts, rollout, advantages: torch.Tensor, loss_mask: torch.Tensor, cfg: dict,
                dist: hdist.Dist, ref_model=None) -> dict[str, float]:
    """Micro-batched GRPO update over this rank's rows; a collective (every rank calls it with the same row count)."""
    g = cfg["grpo"]
    temperature = cfg["rollout"]["temperature"] or 1.0  # greedy rollouts are scored at T = 1, as the sampler does
    rows = rollout.response_ids.shape[0]
    micro = [torch.arange(s, min(s + g["micro_batch_size"], rows)) for s in range(0, rows, g["micro_batch_size"])]

    # The global normaliser, counted before any backward so every micro-batch's loss is its exact share.
    counts = torch.tensor([loss_mask.sum(), (loss_mask.sum(-1) > 0).sum()], dtype=torch.float64)
    hdist.all_reduce(counts)
    divisor = g["constant_divisor"] or cfg["rollout"]["max_new_tokens"]
    normalizer = {"token_mean": counts[0], "seq_mean": counts[1],
                  "constant": counts[1] * divisor}[g["aggregation"]].clamp(min=1).item()

    def logprobs(model, idx):  # (b, T) log-probs and entropies of micro-batch `idx`
        return token_logprobs(model, prompts.rows(rollout.prompt_index[idx]), rollout.response_ids[idx],
                              rollout.response_mask[idx], temperature=temperature)

    old, ref = [None] * len(micro), [None] * len(micro)
    with torch.no_grad():
        if g["epochs"] > 1:
            old = [logprobs(policy, idx)[0] for idx in micro]
        if g["kl_coef"] > 0:
            ref = [logprobs(ref_model, idx)[0] for idx in micro]

    sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "ratio_mean": 0.0, "entropy": 0.0, "tokens": 0.0}
    grad_norm = torch.tensor(0.0)
    for _ in range(g["epochs"]):
        for k, idx in enumerate(micro):
            logp, entropy = logprobs(policy, idx)
            loss, m = grpo_loss(logp, logp.detach() if old[k] is None else old[k], advantages[idx], loss_mask[idx],
                                ref_logp=ref[k], clip_low=g["clip_low"], clip_high=g["clip_high"],
                                kl_coef=g["kl_coef"], aggregation=g["aggregation"], normalizer=normalizer,
                                world_size=dist.world_size)
            loss.backward()
            sums["loss"] += loss.item() / dist.world_size
            sums["entropy"] += float((entropy.detach() * loss_mask[idx]).sum())
            for key in ("clip_frac", "kl", "ratio_mean", "tokens"):
                sums[key] += float(m[key])
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg["optim"]["grad_clip"])
        # A NaN on one rank reaches every rank through the gradient reduction, but decide collectively anyway:
        # no rank may step (or skip) alone.
        finite = hdist.all_true(bool(torch.isfinite(grad_norm)) and math.isfinite(sums["loss"]))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    reduced = torch.tensor([sums[k] for k in sums], dtype=torch.float64)
    hdist.all_reduce(reduced)
    total = dict(zip(sums, reduced.tolist()))
    tokens = max(total["tokens"], 1.0)
    return {"loss": total["loss"] / g["epochs"], "clip_frac": total["clip_frac"] / tokens, "kl": total["kl"] / tokens,
            "ratio_mean": total["ratio_mean"] / tokens, "entropy": total["entropy"] / tokens,
            "grad_norm": float(grad_norm), "skipped_step": 0.0 if finite else 1.0}


# ---------------------------------------------------------------------------------------------------------------
# Logging helpers
# ---------------------------------------------------------------------------------------------------------------

def global_mean(values: dict[str, float], weight: float) -> dict[str, float]:
    """Weighted mean over ranks of per-rank means (weight = this rank's row count)."""
    keys = sorted(values)
    t = torch.tensor([values[k] * weight for k in keys] + [weight], dtype=torch.float64)
    hdist.all_reduce(t)
    return {k: v / t[-1].item() for k, v in zip(keys, t[:-1].tolist())}


def console_line(step: int, m: dict) -> str:
    aspects = " ".join(f"{k[7:]}={m[k]:+.3f}" for k in sorted(m) if k.startswith("reward/") and k != "reward/total")
    return (f"step {step:4d} | acc {m['accuracy']:.3f} | R {m['reward/total']:+.3f} [{aspects}] | "
            f"len {m['response_length']:.1f} | kl {m['kl']:.4f} | clip {m['clip_frac']:.3f} | "
            f"loss {m['loss']:+.4f} | {m['step_time_s']:.2f}s {m['tokens_per_s']:.0f} tok/s")


def write_samples(path: Path, examples, rollout, groups, n: int) -> None:
    with path.open("a", encoding="utf-8") as f:
        for p, (ex, grp) in enumerate(zip(examples, groups)):
            for j in range(n):
                f.write(json.dumps({"id": ex.id, "prompt": ex.problem or ex.messages, "gold": ex.answer,
                                    "response": rollout.texts[p * n + j], "total": grp.total[j], "route": grp.route[j],
                                    **{k: v[j] for k, v in grp.breakdown.items()}}) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------

def train_grpo(cfg: dict, resume: bool = False) -> list[dict]:
    dist = hdist.init_distributed()
    reward_cfg = check_config(cfg, dist.world_size)
    torch.manual_seed(cfg["seed"])
    run_dir = Path(cfg["run_dir"])
    if dist.is_main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    examples = load_examples(cfg)

    policy, processor = build_policy(cfg, dist)
    ref_model = None
    if cfg["grpo"]["kl_coef"] > 0:
        ref_model, _ = build_policy(cfg, dist)
        ref_model.requires_grad_(False)
    scorer = None
    if cfg["reward_model"]["path"]:
        from harmo_min.reward_model import load_scorer
        scorer = load_scorer(cfg["reward_model"]["path"], dist=dist, batch_size=cfg["reward_model"]["batch_size"],
                             answer_format=cfg["data"]["answer_format"])  # the RM sees the policy's exact prompt
    o = cfg["optim"]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]),
                                  weight_decay=o["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    generator = torch.Generator(dist.device).manual_seed(cfg["seed"] * 1_000_003 + dist.rank)

    start = 0
    if resume:
        state = hdist.load_latest_checkpoint(run_dir, model=policy, optimizer=optimizer, scheduler=scheduler)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints")
        start = state["step"]
        generator.set_state(state["generator"])
    metrics_file = run_dir / "metrics.jsonl"
    if dist.is_main and not resume:
        metrics_file.write_text("")
    writers = open_writers(cfg, run_dir) if dist.is_main else []

    r, g, n = cfg["rollout"], cfg["grpo"], cfg["rollout"]["n"]
    per_rank = g["prompts_per_step"] // dist.world_size
    batches = iterate_batches(examples, g["prompts_per_step"], seed=cfg["seed"], start=start)
    history = []
    progress = range(start, cfg["train"]["steps"])
    if dist.is_main and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(progress, initial=start, total=cfg["train"]["steps"], dynamic_ncols=True)
    for step in progress:
        t0 = time.perf_counter()
        # 1. prompts: this rank's slice of the global batch, encoded once for rollout and training
        batch = next(batches)[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        encoded = encode_prompts(processor, batch, cfg["data"]["answer_format"]).to(dist.device)
        prompts = prompt_batch(encoded, [len(ex.images) for ex in batch])

        # 2. rollout with full parameters gathered for the phase (ranks may stop decoding at different steps)
        policy.eval()
        with hdist.gathered_params(policy):
            rollout = sample(policy, encoded, n=n, max_new_tokens=r["max_new_tokens"], temperature=r["temperature"],
                             top_p=r["top_p"], top_k=r["top_k"], generator=generator, tokenizer=processor.tokenizer)
        policy.train()

        # 3. rewards: every aspect of every response; reward-model scores for open / low-confidence items
        lengths = rollout.lengths.tolist()
        texts = [rollout.texts[p * n:(p + 1) * n] for p in range(len(batch))]
        model_scores = None
        if scorer is not None:
            flat = scorer.score([ex for ex in batch for _ in range(n)], rollout.texts)[1].tolist()
            model_scores = [flat[p * n:(p + 1) * n] for p in range(len(batch))]
        groups = score_batch(batch, texts, lengths=[lengths[p * n:(p + 1) * n] for p in range(len(batch))],
                             finish_reasons=[rollout.finish_reason[p * n:(p + 1) * n] for p in range(len(batch))],
                             model_scores=model_scores, cfg=reward_cfg)

        # 4. advantages within each group; optionally mask groups with no accuracy signal
        total = torch.tensor([x for grp in groups for x in grp.total], device=dist.device)            # (B,)
        accuracy = torch.tensor([x for grp in groups for x in grp.breakdown["accuracy"]], device=dist.device)
        advantages = group_advantages(total, n, scale_std=g["scale_std"])                              # (B,)
        loss_mask = rollout.response_mask.clone()                                                     # (B, T)
        if g["drop_zero_variance_groups"]:
            loss_mask[zero_variance_groups(accuracy, n).repeat_interleave(n)] = 0

        # 5-6. update and step
        update = grpo_update(policy, optimizer, prompts, rollout, advantages, loss_mask, cfg, dist, ref_model)
        scheduler.step()

        # 7. log
        step_time = time.perf_counter() - t0
        local = {f"reward/{k}": v for k, v in aspect_means(groups).items()}
        local.update(accuracy=float(accuracy.mean()), response_length=sum(lengths) / len(lengths),
                     eos_rate=sum(f == "eos" for f in rollout.finish_reason) / len(lengths))
        metrics = {"step": step + 1, **global_mean(local, len(lengths)), **update, "lr": scheduler.get_last_lr()[0]}
        routes = route_counts(groups)
        counts = hdist.all_reduce(torch.tensor(list(routes.values()), dtype=torch.float64))
        metrics.update({f"route/{k}": int(v) for k, v in zip(routes, counts.tolist())})
        tokens = torch.tensor([float(rollout.response_mask.sum() + encoded["attention_mask"].sum() * n)])
        metrics.update(step_time_s=step_time, tokens_per_s=float(hdist.all_reduce(tokens)) / step_time)
        history.append(metrics)
        if dist.is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if (step + 1) % cfg["train"]["log_every"] == 0:
                print(console_line(step + 1, metrics), flush=True)
            for w in writers:
                w(metrics, step + 1)
        if cfg["train"]["sample_every"] and (step + 1) % cfg["train"]["sample_every"] == 0:
            write_samples(run_dir / "samples" / f"step_{step + 1:06d}_rank{dist.rank}.jsonl", batch, rollout, groups, n)
        if cfg["train"]["save_every"] and (step + 1) % cfg["train"]["save_every"] == 0:
            hdist.save_checkpoint(run_dir, step + 1, model=policy, optimizer=optimizer, scheduler=scheduler,
                                  state={"generator": generator.get_state()})

    if cfg["train"]["export"]:
        out = hdist.export_hf(policy, processor, run_dir / "final", dist)
        if out is not None:
            print(f"exported {out} (load it with harmo_min.model.load_policy or from_pretrained)", flush=True)
    hdist.cleanup()
    return history


def open_writers(cfg: dict, run_dir: Path) -> list:
    """TensorBoard / W&B loggers when asked for; asking for one that is not installed is an error, not a no-op."""
    writers = []
    if cfg["train"]["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("train.tensorboard: true needs `pip install tensorboard`") from err
        tb = SummaryWriter(run_dir / "tensorboard")
        writers.append(lambda m, s: [tb.add_scalar(k, v, s) for k, v in m.items() if isinstance(v, (int, float))])
    if cfg["train"]["wandb"]:
        try:
            import wandb
        except ImportError as err:
            raise ImportError("train.wandb: true needs `pip install wandb`") from err
        run = wandb.init(project="harmo_min", dir=str(run_dir), config=cfg)
        writers.append(lambda m, s: run.log(m, step=s))
    return writers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints/latest")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n=8 optim.lr=1e-6")
    args = parser.parse_args(argv)
    stage = "grpo"
    if args.config and os.path.isfile(args.config):
        with open(args.config, encoding="utf-8") as f:
            stage = (yaml.safe_load(f) or {}).get("stage", "grpo")
    stage = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("stage=")), stage)
    if stage == "reward_model":
        from harmo_min.reward_training import REWARD_MODEL_DEFAULTS, train_reward_model
        cfg = load_config(args.config, args.overrides, defaults=REWARD_MODEL_DEFAULTS,
                          open_keys=("reward_model.fixed_weights", "data.kinds"))
        train_reward_model(cfg, resume=args.resume)
    elif stage == "grpo":
        train_grpo(load_config(args.config, args.overrides, defaults=GRPO_DEFAULTS, open_keys=OPEN_KEYS), args.resume)
    else:
        raise ValueError(f"{args.config}: stage: expected 'grpo' or 'reward_model', got {stage!r}")


if __name__ == "__main__":
    main()
