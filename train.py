"""GRPO training with HARMO's hybrid + multi-aspect rewards for Qwen2.5-VL, one process per GPU under torchrun.

    python train.py                                                     # configs/tiny.yaml: the CPU showcase
    torchrun --nproc_per_node 8 train.py --config configs/qwen2_5_vl_3b.yaml rollout.n=8
    python train.py --config configs/tiny.yaml --resume                 # continue from run_dir's latest checkpoint
    python train.py --config configs/qwen2_5_vl_3b.yaml --plan --nproc 8   # per-GPU memory plan; nothing loads

One step, as the loop below reads:
  1. prompts     each rank takes its slice of the step's global prompt batch and encodes it once (left padded)
  2. rollout     n responses per prompt with the hand-written sampler, full parameters gathered for the phase
  3. rewards     the reward model scores open (and low-confidence) items; every aspect per response (rewards.py)
  4. reference   micro-batches of similar length; reference log-probs (kl_coef > 0) and, with several epochs,
                 the old log-probs, without grad
  5. advantage   A = R − group mean (grpo.py); groups without accuracy variance optionally masked out
  6. update      forward/backward per micro-batch with the loss normaliser counted over all ranks first; grad clip;
                 a collective finite check; optimizer and LR-schedule step
  7. log         one console line, metrics.jsonl (every aspect, routes, phase times, peak memory), sample
                 rollouts, checkpoints; an HF export at the end

Precision: master weights, gradients and AdamW state are float32 on every device; `model.compute_dtype` (bf16 on a
GPU) is what FSDP2 casts the parameters to for forward and backward, with float32 gradient reduction
(distributed.apply_fsdp). The reference and the reward model are frozen copies in the compute dtype.
Every config key, its default and its meaning are in GRPO_DEFAULTS; RULES checks the values before anything loads.
The reward-model stage is train_reward_model.py, the supervised warm-up warmup.py.
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

import torch

from harmo_min import memory
from harmo_min.config import (NOT_EMPTY, above, above_or_null, at_least, in_range, load_config, lr_schedule, one_of,
                              parse_run_args)
from harmo_min.data import FORMAT_INSTRUCTIONS, MAX_IMAGE_PIXELS, encode_prompts, iterate_batches, load_examples
from harmo_min.distributed import (cleanup, clip_grad_norm, export_hf, forward_only, gathered_params, unsharded,
                                   init_distributed, load_latest_checkpoint, load_model_sharded, save_checkpoint)
from harmo_min.grpo import (AGGREGATIONS, KL_ESTIMATORS, group_advantages, grpo_loss, kl_estimate, loss_normalizer,
                            micro_batches, token_logprobs, training_inputs, zero_variance_groups)
from harmo_min.model import DTYPES, resolve_dtype
from harmo_min.reward_model import load_scorer
from harmo_min.rewards import RewardConfig, aspect_means, groups_of, route_counts, score_batch
from harmo_min.rollout import sample
from harmo_min.synthetic import synthetic_examples
from harmo_min.tracking import RunLog, check_run_dir, peak_memory_gb, prepare_paths, timed, write_samples

GRPO_DEFAULTS = {
    "run_dir": "runs/tiny",           # checkpoints, metrics.jsonl, samples/, the exported model
    "seed": 0,
    "model": {
        "path": "tiny",               # a local HF folder or cached hub id; "tiny" = build_tiny(seed) random weights
        "prepare": None,              # a command (e.g. "warmup.py --config X") run first when `path` does not exist
        "compute_dtype": "auto",      # forward/backward dtype: auto = bfloat16 on GPU, float32 on CPU
        "attn_implementation": "sdpa",
        "activation_checkpointing": False,  # recompute decoder layers in backward: long responses at 3B/7B
    },
    "data": {
        "train": "synthetic",         # "synthetic", a JSONL file, or a table: parquet file/folder/glob, .arrow,
                                      # a datasets.save_to_disk folder (see data.py)
        "fields": {},                 # table column per Example field (id, problem, answer, images); see data.py
        "image_root": None,           # relative image paths start here (default: the data file's folder)
        "max_image_pixels": MAX_IMAGE_PIXELS,  # larger images are downscaled once at load; null: no cap
        "kinds": ["count", "digits", "arithmetic", "choice", "colour", "describe"],  # synthetic task kinds
        "n_train": 1024,              # synthetic examples
        "image_size": 112,
        "answer_format": "think_answer",  # the prompt's instruction and the format reward: think_answer | boxed | bare
    },
    "rollout": {"n": 8, "max_new_tokens": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "compile": False},           # torch.compile the decode step (CUDA graphs on a GPU); see rollout.py
    "reward": {},                     # rewards.RewardConfig keys (weights, combine, min_confidence, plugins, ...)
    "reward_model": {
        "path": None,                 # a folder from train_reward_model.py, or a Skywork-VL-Reward folder
        "prepare": None,              # a command run first when `path` does not exist, as for model.prepare
        "batch_size": 16,             # responses per scoring forward
    },
    "grpo": {
        "prompts_per_step": 16,       # global: split evenly over ranks
        "micro_batch_size": 32,       # responses per forward/backward
        "share_prompt": False,        # run each prompt once per micro-batch, not once per response (see grpo.py)
        "epochs": 1,                  # updates per rollout batch (>1 stores old log-probs)
        "clip_low": 0.2, "clip_high": 0.28,
        "kl_coef": 0.0,               # β; a frozen reference is loaded only when > 0
        "kl_estimator": "k2",         # k1 | k2 | k3 in the loss: see grpo.py for the gradient each gives
        "kl_in_reward": False,        # instead: R -= β Σ_t k1 before the advantage, no KL term in the loss
        "aggregation": "token_mean",  # token_mean | seq_mean | constant (Dr. GRPO)
        "constant_divisor": None,     # C for `constant`; null = rollout.max_new_tokens
        "scale_std": False,           # divide advantages by the group std (original GRPO); HARMO does not
        "drop_zero_variance_groups": False,  # mask out groups whose accuracy is all equal (DAPO dynamic sampling)
    },
    "optim": {"lr": 1e-6, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99, "warmup_steps": 0,
              "schedule": "constant", "grad_clip": 1.0},  # grad_clip: max global grad norm, null = no clipping
    "train": {
        "steps": 100, "log_every": 1,
        "save_every": 0,              # checkpoint every N steps (0: never)
        "sample_every": 10,           # write sample rollouts to run_dir/samples/ every N steps (0: never)
        "export": True,               # an HF folder at run_dir/final at the end
        "export_dtype": "float32",    # its weights' dtype (bfloat16 halves a 3B export to ~7.5 GB)
        "tensorboard": False, "wandb": False,
    },
}
OPEN_KEYS = ("reward", "data.kinds", "data.fields")
RULES = {
    "model.path": NOT_EMPTY, "model.compute_dtype": one_of("auto", *DTYPES), "train.export_dtype": one_of(*DTYPES),
    "data.answer_format": one_of(*FORMAT_INSTRUCTIONS), "rollout.n": at_least(2), "rollout.max_new_tokens": at_least(1),
    "rollout.temperature": at_least(0), "rollout.top_p": in_range(0, 1, low_open=True), "rollout.top_k": at_least(0),
    "reward_model.batch_size": at_least(1), "grpo.prompts_per_step": at_least(1), "grpo.micro_batch_size": at_least(1),
    "grpo.epochs": at_least(1), "grpo.clip_low": in_range(0, 1), "grpo.clip_high": at_least(0),
    "grpo.kl_coef": at_least(0), "grpo.kl_estimator": one_of(*KL_ESTIMATORS), "grpo.aggregation": one_of(*AGGREGATIONS),
    "grpo.constant_divisor": above_or_null(0), "optim.lr": above(0), "optim.weight_decay": at_least(0),
    "optim.beta1": in_range(0, 1), "optim.beta2": in_range(0, 1), "optim.warmup_steps": at_least(0),
    "optim.schedule": one_of("constant", "cosine"), "optim.grad_clip": above_or_null(0), "train.steps": at_least(1),
    "train.log_every": at_least(1), "train.save_every": at_least(0), "train.sample_every": at_least(0),
}


def check_config(cfg: dict, world_size: int) -> RewardConfig:
    """What RULES cannot see (the world size, the reward section), before any model is loaded."""
    if (prompts := cfg["grpo"]["prompts_per_step"]) % world_size:
        raise ValueError(f"grpo.prompts_per_step={prompts} is not divisible by {world_size} ranks")
    reward = RewardConfig.from_dict(cfg["reward"], answer_format=cfg["data"]["answer_format"])
    if reward.accuracy_source == "model" and not cfg["reward_model"]["path"]:
        raise ValueError("reward.accuracy_source: model scores every item with the reward model; set reward_model.path")
    return reward.resolve(cfg["rollout"]["max_new_tokens"])


def training_examples(cfg: dict, rank: int, world_size: int):
    """The training set, validated (each rank fully decodes its share of the images) before any model loads."""
    d = cfg["data"]
    if d["train"] == "synthetic":
        return synthetic_examples(d["n_train"], seed=cfg["seed"], kinds=tuple(d["kinds"]), size=d["image_size"])
    return load_examples(d["train"], fields=d["fields"], image_root=d["image_root"],
                         max_image_pixels=d["max_image_pixels"], rank=rank, world_size=world_size)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_run_args(argv, description=__doc__.split("\n\n")[0], default_config="configs/tiny.yaml",
                          add_arguments=memory.add_arguments)

    # ---- set-up: every check before any model loads ----------------------------------------------------------
    cfg = load_config(args.config, args.overrides, defaults=GRPO_DEFAULTS, open_keys=OPEN_KEYS, rules=RULES)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.plan:  # the per-GPU memory plan alone (harmo_min/memory.py): nothing is loaded or allocated
        print(memory.plan(cfg, world_size=args.nproc or world_size, gpu_gb=args.gpu_gb, config_name=args.config,
                          prompt_tokens=args.prompt_tokens, image_tokens=args.image_tokens).table())
        return []
    reward_cfg = check_config(cfg, world_size)
    run_dir = Path(cfg["run_dir"])
    earlier = check_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)
    prepare_paths(cfg, ("model", "reward_model"), world_size)
    examples = training_examples(cfg, int(os.environ.get("RANK", 0)), world_size)
    g, r, n, o, m = cfg["grpo"], cfg["rollout"], cfg["rollout"]["n"], cfg["optim"], cfg["model"]

    world = init_distributed()
    torch.manual_seed(cfg["seed"])
    compute_dtype = resolve_dtype(m["compute_dtype"], world.device)
    policy, processor = load_model_sharded(m["path"], world, seed=cfg["seed"], dtype=torch.float32,
                                           compute_dtype=compute_dtype, attn_implementation=m["attn_implementation"])
    if m["activation_checkpointing"]:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if g["kl_coef"] > 0:
        ref_model = load_model_sharded(m["path"], world, seed=cfg["seed"], dtype=compute_dtype,  # frozen
                                       attn_implementation=m["attn_implementation"])[0].requires_grad_(False)
    scorer = None
    if cfg["reward_model"]["path"] and reward_cfg.accuracy_source != "rule":  # rule-only runs no reward model
        scorer = load_scorer(cfg["reward_model"]["path"], world=world, batch_size=cfg["reward_model"]["batch_size"],
                             answer_format=cfg["data"]["answer_format"], dtype=compute_dtype)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]),
                                  weight_decay=o["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    generator = torch.Generator(world.device).manual_seed(cfg["seed"] * 1_000_003 + world.rank)

    start = 0
    if args.resume:
        state = load_latest_checkpoint(run_dir, model=policy, optimizer=optimizer, scheduler=scheduler)
        start = state["step"]
        generator.set_state(state["generator"])
    log = RunLog(run_dir, world, cfg, resume_step=start if args.resume else None, overwrite=earlier)

    per_rank = g["prompts_per_step"] // world.size
    # The training forward's log-probs: greedy rollouts are scored at T = 1, as the sampler does
    logprobs = functools.partial(token_logprobs, temperature=r["temperature"] or 1.0, share_prompt=g["share_prompt"])
    batches = iterate_batches(examples, g["prompts_per_step"], seed=cfg["seed"], start=start)
    for step in range(start, cfg["train"]["steps"]):
        t0, times = time.perf_counter(), {}
        # 1. prompts: this rank's slice of the global batch, encoded once for rollout and training
        batch = next(batches)[world.rank * per_rank:(world.rank + 1) * per_rank]
        prompts = encode_prompts(processor, batch, cfg["data"]["answer_format"]).to(world.device)

        # 2. rollout with full parameters gathered for the phase (ranks may stop decoding at different steps)
        with timed(times, "rollout", world.device):
            policy.eval()
            with gathered_params(policy):
                rollout = sample(policy, prompts, n=n, max_new_tokens=r["max_new_tokens"], temperature=r["temperature"],
                                 top_p=r["top_p"], top_k=r["top_k"], generator=generator, tokenizer=processor.tokenizer,
                                 compile=r["compile"])
            policy.train()

        # 3. rewards: reward-model scores for open / low-confidence items, then every aspect of every response
        model_scores = None
        if scorer is not None:
            with timed(times, "reward_model", world.device):
                scores = scorer.score([ex for ex in batch for _ in range(n)], rollout.texts)[1].tolist()
            model_scores = groups_of(scores, n)
        with timed(times, "rewards", world.device):
            groups = score_batch(batch, groups_of(rollout.texts, n), lengths=groups_of(rollout.lengths.tolist(), n),
                                 finish_reasons=groups_of(rollout.finish_reason, n), model_scores=model_scores,
                                 cfg=reward_cfg)

        # 4. micro-batches of similar length; reference and old log-probs without grad
        rows = micro_batches(rollout.prompt_index, rollout.lengths, g["micro_batch_size"])
        inputs = [training_inputs(prompts, [len(ex.images) for ex in batch], rollout, idx) for idx in rows]
        ref, old = [None] * len(rows), [None] * len(rows)
        with timed(times, "reference", world.device):
            if ref_model is not None:
                with forward_only(ref_model):
                    ref = [logprobs(ref_model, x)[0] for x in inputs]
            if g["epochs"] > 1:
                with forward_only(policy):
                    old = [logprobs(policy, x)[0] for x in inputs]

        # 5. advantages within each group; optionally mask groups with no accuracy signal
        total = torch.tensor([x for grp in groups for x in grp.total], device=world.device)            # (B,)
        accuracy = torch.tensor([x for grp in groups for x in grp.breakdown["accuracy"]], device=world.device)
        if g["kl_in_reward"] and ref_model is not None:
            for idx, x, ref_logp in zip(rows, inputs, ref):  # R -= β Σ_t k1, with the sampler's log-probs as log π
                logp = rollout.logprobs[idx, :ref_logp.shape[1]]
                total[idx] -= g["kl_coef"] * (kl_estimate(logp, ref_logp, "k1") * x["response_mask"]).sum(-1)
        advantages = group_advantages(total, n, scale_std=g["scale_std"])                               # (B,)
        loss_mask = rollout.response_mask.clone()                                                      # (B, T)
        if g["drop_zero_variance_groups"]:
            loss_mask[zero_variance_groups(accuracy, n).repeat_interleave(n)] = 0
        normalizer = loss_normalizer(loss_mask, world, aggregation=g["aggregation"],
                                     constant_divisor=g["constant_divisor"] or r["max_new_tokens"])

        # 6. update: every micro-batch's loss is its share of the global loss; nothing to learn, no step
        loss_kl_coef = 0.0 if g["kl_in_reward"] else g["kl_coef"]  # the KL is paid in the reward or in the loss
        # Summed on the device (float64, as Python floats would be): no host sync per micro-batch
        sums = {k: torch.zeros((), dtype=torch.float64, device=world.device)
                for k in ("loss", "clip_frac", "kl", "ratio_mean", "entropy", "tokens")}
        grad_norm, stepped = 0.0, False
        for _ in range(g["epochs"] if normalizer > 0 else 0):
            with timed(times, "update", world.device), unsharded(policy, enabled=g["share_prompt"]):
                for idx, x, ref_logp, old_logp in zip(rows, inputs, ref, old):
                    logp, entropy = logprobs(policy, x)
                    mask = loss_mask[idx, :logp.shape[1]]
                    loss, stats = grpo_loss(logp, logp.detach() if old_logp is None else old_logp, advantages[idx],
                                            mask, normalizer=normalizer, ref_logp=ref_logp,
                                            clip_low=g["clip_low"], clip_high=g["clip_high"], kl_coef=loss_kl_coef,
                                            kl_estimator=g["kl_estimator"], aggregation=g["aggregation"])
                    loss.backward()
                    sums["loss"] += loss.detach().double() / g["epochs"]
                    sums["entropy"] += (entropy * mask).sum().double()
                    for key, value in stats.items():
                        sums[key] += value.double()
            with timed(times, "optimizer", world.device):
                grad_norm = clip_grad_norm(policy.parameters(), o["grad_clip"])
                # Collective, though a NaN reaches every rank through the reduction: no rank may step (or skip) alone
                stepped = world.all_true(math.isfinite(grad_norm) and math.isfinite(float(sums["loss"])))
                if stepped:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        sums = {k: float(v) for k, v in sums.items()}
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()

        # 7. log
        metrics = {"step": step + 1, **step_metrics(world, groups, rollout, prompts, reward_cfg, n, sums),
                   "grad_norm": grad_norm, "skipped_step": 0.0 if stepped else 1.0, "lr": lr,
                   **{f"time/{k}": v for k, v in times.items()}, "step_time_s": time.perf_counter() - t0,
                   "memory/peak_gb": world.max(int(peak_memory_gb(world.device) * 1000)) / 1000}
        metrics["tokens_per_s"] = metrics.pop("tokens") / metrics["step_time_s"]
        log.write(metrics)
        if world.is_main and (step + 1) % cfg["train"]["log_every"] == 0:
            print(console_line(metrics), flush=True)
        if cfg["train"]["sample_every"] and (step + 1) % cfg["train"]["sample_every"] == 0:
            write_samples(run_dir / "samples" / f"step_{step + 1:06d}_rank{world.rank}.jsonl", batch, rollout.texts,
                          groups)
        if cfg["train"]["save_every"] and (step + 1) % cfg["train"]["save_every"] == 0:
            save_checkpoint(run_dir, step + 1, model=policy, optimizer=optimizer, scheduler=scheduler,
                            state={"generator": generator.get_state()})

    if cfg["train"]["export"]:
        out = export_hf(policy, processor, run_dir / "final", world, DTYPES[cfg["train"]["export_dtype"]])
        if out is not None:
            print(f"exported {out} (load it with harmo_min.model.load_policy or from_pretrained)", flush=True)
    cleanup()
    return log.history


def step_metrics(world, groups, rollout, prompts, reward_cfg: RewardConfig, n: int, update: dict) -> dict:
    """Means over all ranks of this step's rewards, lengths, routes and update statistics (a collective)."""
    accuracy = [a for grp in groups for a in grp.breakdown["accuracy"]]
    lengths = rollout.lengths.tolist()
    correct = [a >= reward_cfg.correct_threshold for a in accuracy]
    local = {f"reward/{k}": v * len(lengths) for k, v in aspect_means(groups).items()}
    local.update({f"route/{k}": v for k, v in route_counts(groups).items()})
    local.update({f"update/{k}": v for k, v in update.items()})
    local.update(rows=len(lengths), accuracy=sum(accuracy), response_length=sum(lengths), correct=sum(correct),
                 correct_length=sum(length for length, ok in zip(lengths, correct) if ok),
                 eos=sum(f == "eos" for f in rollout.finish_reason),
                 prompt_tokens=float(prompts["attention_mask"].sum()) * n)
    s = dict(zip(local, world.sum(list(local.values()))))
    rows, tokens, right = s["rows"], max(s["update/tokens"], 1.0), s["correct"]
    return {**{k: v / rows for k, v in s.items() if k.startswith("reward/")},
            "accuracy": s["accuracy"] / rows, "response_length": s["response_length"] / rows,
            "length/correct": s["correct_length"] / right if right else 0.0,
            "length/wrong": (s["response_length"] - s["correct_length"]) / (rows - right) if rows > right else 0.0,
            "eos_rate": s["eos"] / rows, "loss": s["update/loss"],
            **{k: s[f"update/{k}"] / tokens for k in ("clip_frac", "kl", "ratio_mean", "entropy")},
            **{k: int(v) for k, v in s.items() if k.startswith("route/")},
            "tokens": s["response_length"] + s["prompt_tokens"]}


def console_line(m: dict) -> str:
    aspects = " ".join(f"{k[7:]}={m[k]:+.3f}" for k in sorted(m) if k.startswith("reward/") and k != "reward/total")
    phases = " ".join(f"{k[5:]} {v:.2f}" for k, v in m.items() if k.startswith("time/"))
    return (f"step {m['step']:4d} | acc {m['accuracy']:.3f} | R {m['reward/total']:+.3f} [{aspects}] | "
            f"len {m['response_length']:.1f} | kl {m['kl']:.4f} | clip {m['clip_frac']:.3f} | "
            f"{m['step_time_s']:.2f}s ({phases})")


if __name__ == "__main__":
    main()
