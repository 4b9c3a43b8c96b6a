"""Supervised warm-up: a tiny policy that starts like an instruct model, before GRPO.

    python warmup.py --config configs/tiny_warmup.yaml                 # seconds on a CPU -> runs/tiny_warmup/final
    python warmup.py --config configs/tiny_warmup.yaml train.steps=200 data.styles.direct=0.5
    torchrun --nproc_per_node 2 warmup.py --config configs/tiny_warmup.yaml

Real HARMO runs start from Qwen2.5-VL-Instruct, which already answers `<think>…</think><answer>…</answer>` much of
the time. The tiny random model does not, so this stage gives it that start: plain next-token cross-entropy on the
response tokens of synthetic demonstrations (`synthetic.synthetic_demonstrations`), EOS included so it learns to
stop,

    L = − Σ_{i,t} m_it · log π_θ(y_it | prompt_i, y_i,<t) / Σ_{i,t} m_it        (token mean over the global batch)

with AdamW and the LR schedule of `config.lr_schedule`. The demonstrations mix styles the way an instruct model
does (worked reasoning, a direct guess, no tags; option text instead of a letter, a verbose description), and the
stage is short on purpose: the policy leaves it with the format often but not always right and accuracy well
below its ceiling, which is the room GRPO has to improve. The result is a Hugging Face folder at `run_dir/final`
that `harmo_min.model.load_policy` (and a GRPO config's `model.path`) loads.

Reused from the package, so the warm-up trains exactly the forward GRPO will: the tiny model (`model.build_tiny`,
with optional text-model overrides), prompt encoding (`data.encode_prompts`), the batch iterator
(`data.iterate_batches`), the demonstrations as a one-response-per-prompt `rollout.Rollout` fed to
`grpo.training_inputs` and `grpo.token_logprobs` (M-RoPE positions, images once per prompt), process groups,
FSDP2, the run folder and the HF export (`distributed`, `tracking`). Every config key is in WARMUP_DEFAULTS with
its meaning; RULES checks the values before anything loads. Left out: checkpoints and resume (the stage takes
seconds), packing, evaluation (run `evaluate.py --model run_dir/final`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from harmo_min.config import NOT_EMPTY, above, at_least, in_range, load_config, lr_schedule, one_of, parse_run_args
from harmo_min.data import encode_prompts, iterate_batches
from harmo_min.distributed import cleanup, clip_grad_norm, export_hf, init_distributed, load_model_sharded
from harmo_min.grpo import token_logprobs, training_inputs
from harmo_min.model import DTYPES, eos_token_ids, resolve_dtype
from harmo_min.rollout import Rollout
from harmo_min.synthetic import synthetic_demonstrations
from harmo_min.tracking import RunLog, check_run_dir

WARMUP_DEFAULTS = {
    "run_dir": "runs/tiny_warmup",     # metrics.jsonl, config.yaml and the exported policy in final/
    "seed": 0,
    "model": {
        "path": "tiny",                # "tiny" = build_tiny(seed) random weights, or a local Qwen2.5-VL folder
        "compute_dtype": "auto",       # forward/backward dtype: auto = bfloat16 on GPU, float32 on CPU
    },
    "data": {
        "kinds": ["count", "arithmetic", "choice", "describe"],  # synthetic task kinds (synthetic.TASK_KINDS)
        "n_train": 2048,               # demonstrations (cycled through in shuffled batches)
        "image_size": 112,
        "answer_format": "think_answer",  # the instruction appended to prompts, as in GRPO
        "styles": {"reason": 1.0, "direct": 0.0, "unformatted": 0.0},  # share of each demonstration style
        "choice_text": 0.0,            # chance a multiple-choice demo answers with the option's text, not its letter
        "verbose": 0.0,                # chance a description demo is the verbose one (over the item's max_words)
    },
    "optim": {"lr": 3e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99, "warmup_steps": 0,
              "schedule": "constant", "grad_clip": 1.0},
    "train": {
        "steps": 100,
        "batch_size": 32,              # demonstrations per step, global: split evenly over ranks
        "log_every": 10,
        "export": True,                # the HF folder run_dir/final (float32)
    },
}
OPEN_KEYS = ("data.kinds",)
RULES = {
    "model.path": NOT_EMPTY, "model.compute_dtype": one_of("auto", *DTYPES),
    # The demonstrations are written <think>…</think><answer>…</answer>: no other format has demonstrations.
    "data.answer_format": one_of("think_answer"), "data.n_train": at_least(1), "data.image_size": at_least(28),
    "data.styles.reason": at_least(0), "data.styles.direct": at_least(0), "data.styles.unformatted": at_least(0),
    "data.choice_text": in_range(0, 1), "data.verbose": in_range(0, 1),
    "optim.lr": above(0), "optim.weight_decay": at_least(0), "optim.beta1": in_range(0, 1),
    "optim.beta2": in_range(0, 1), "optim.warmup_steps": at_least(0), "optim.schedule": one_of("constant", "cosine"),
    "optim.grad_clip": above(0), "train.steps": at_least(1), "train.batch_size": at_least(1),
    "train.log_every": at_least(1),
}


def check_warmup_config(cfg: dict, world_size: int) -> None:
    """What RULES cannot see, before any model is built."""
    # data.kinds and data.styles are checked by synthetic_demonstrations, which also runs before any model loads.
    d, t = cfg["data"], cfg["train"]
    if t["batch_size"] % world_size:
        raise ValueError(f"train.batch_size={t['batch_size']} is not divisible by {world_size} ranks")
    if d["n_train"] < t["batch_size"]:
        raise ValueError(f"data.n_train={d['n_train']} cannot fill one batch of train.batch_size={t['batch_size']}")


def demonstration_rollout(tokenizer, texts: list[str], eos_id: int, pad_id: int) -> Rollout:
    """The demonstrations as a rollout of one response per prompt: right-padded ids ending with the EOS the
    sampler stops at, so `grpo.training_inputs` builds the exact training forward GRPO will run."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos_id] for t in texts]
    width = max(len(x) for x in ids)
    response_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)        # (B, T)
    response_mask = torch.zeros((len(ids), width), dtype=torch.long)              # (B, T)
    for i, x in enumerate(ids):
        response_ids[i, :len(x)] = torch.tensor(x)
        response_mask[i, :len(x)] = 1
    return Rollout(prompt_index=torch.arange(len(ids)), response_ids=response_ids, response_mask=response_mask,
                   logprobs=torch.zeros(response_ids.shape), finish_reason=["eos"] * len(ids), texts=list(texts))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_run_args(argv, description=__doc__.split("\n\n")[0], default_config="configs/tiny_warmup.yaml")
    if args.resume:
        raise ValueError("--resume: the warm-up has no checkpoints (it takes seconds); rerun it with --overwrite")
    cfg = load_config(args.config, args.overrides, defaults=WARMUP_DEFAULTS, open_keys=OPEN_KEYS, rules=RULES)
    world = init_distributed()
    check_warmup_config(cfg, world.size)
    run_dir = Path(cfg["run_dir"])
    earlier = check_run_dir(run_dir, resume=False, overwrite=args.overwrite)
    d, o, t = cfg["data"], cfg["optim"], cfg["train"]
    demos = synthetic_demonstrations(d["n_train"], seed=cfg["seed"], kinds=d["kinds"], size=d["image_size"],
                                     styles=d["styles"], choice_text=d["choice_text"], verbose=d["verbose"])

    torch.manual_seed(cfg["seed"])
    # As train.py loads its policy: rank 0 alone reads the weights (not one host copy per rank), float32 master
    # weights and AdamW state, the compute dtype (bf16 on a GPU) through FSDP2.
    model, processor = load_model_sharded(cfg["model"]["path"], world, seed=cfg["seed"], dtype=torch.float32,
                                          compute_dtype=resolve_dtype(cfg["model"]["compute_dtype"], world.device))
    model.train()
    tokenizer = processor.tokenizer
    eos_id = eos_token_ids(model)[0]  # <|im_end|>: the end of the assistant turn, where the sampler stops
    optimizer = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]),
                                  weight_decay=o["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    log = RunLog(run_dir, world, cfg, overwrite=earlier)

    per_rank = t["batch_size"] // world.size
    batches = iterate_batches(demos, t["batch_size"], seed=cfg["seed"])
    for step in range(t["steps"]):
        t0 = time.perf_counter()
        batch = next(batches)[world.rank * per_rank:(world.rank + 1) * per_rank]
        examples = [ex for ex, _ in batch]
        # Prompts and demonstrations are joined on the CPU, where both are built; then the joint inputs move.
        prompts = encode_prompts(processor, examples, d["answer_format"])
        demo = demonstration_rollout(tokenizer, [r for _, r in batch], eos_id, tokenizer.pad_token_id)
        inputs = training_inputs(prompts, [len(ex.images) for ex in examples], demo, torch.arange(len(examples)))
        inputs = {k: v.to(world.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

        # The global token count first, so every rank's loss is its share of the token mean over all ranks.
        tokens = world.sum([float(inputs["response_mask"].sum())])[0]
        logp, _ = token_logprobs(model, inputs)                                    # (b, T), 0 where masked
        loss = -logp.sum() / tokens  # FSDP sums gradients over ranks (distributed.apply_fsdp): the global mean
        loss.backward()
        grad_norm = clip_grad_norm(model.parameters(), o["grad_clip"])
        if world.all_true(math.isfinite(grad_norm)):  # no rank may step (or skip) alone
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()

        total_loss, prob = world.sum([loss.item(), float((logp.detach().exp() * inputs["response_mask"]).sum())])
        metrics = {"step": step + 1, "loss": total_loss, "token_prob": prob / tokens, "grad_norm": grad_norm,
                   "lr": lr, "step_time_s": time.perf_counter() - t0}
        log.write(metrics)
        if world.is_main and ((step + 1) % t["log_every"] == 0 or step + 1 == t["steps"]):
            print(f"warmup step {step + 1:4d} | loss {total_loss:.4f} | token prob {metrics['token_prob']:.3f} | "
                  f"grad norm {grad_norm:.2f} | {metrics['step_time_s']:.2f}s", flush=True)

    if t["export"]:
        out = export_hf(model, processor, run_dir / "final", world, torch.float32)
        if out is not None:
            print(f"exported {out} (the warm-start policy: model.path of a GRPO config)", flush=True)
    cleanup()
    return log.history


if __name__ == "__main__":
    main()
