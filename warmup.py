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

Reused from the package: the tiny model (`model.build_tiny`), prompt encoding (`data.encode_prompts`), the batch
iterator (`data.iterate_batches`), token log-probs with the training forward's M-RoPE positions
(`grpo.token_logprobs`), process groups, FSDP2 and the HF export (`distributed`). Every config key is in
WARMUP_DEFAULTS with its meaning. Left out: checkpoints and resume (the stage takes seconds), packing, evaluation
(run `evaluate.py --model run_dir/final`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import yaml

from harmo_min import distributed as hdist
from harmo_min.config import load_config, lr_schedule
from harmo_min.data import encode_prompts, iterate_batches
from harmo_min.grpo import prompt_batch, token_logprobs
from harmo_min.model import build_tiny, eos_token_ids, load_policy
from harmo_min.synthetic import STYLES, TASK_KINDS, synthetic_demonstrations

WARMUP_DEFAULTS = {
    "run_dir": "runs/tiny_warmup",     # metrics.jsonl, config.yaml and the exported policy in final/
    "seed": 0,
    "model": {
        "path": "tiny",                # "tiny" = build_tiny(seed) random weights, or a local Qwen2.5-VL folder
        "dtype": "float32",
        "tiny": {},                    # build_tiny text-model overrides, e.g. {hidden_size: 128, num_hidden_layers: 4}
    },
    "data": {
        "kinds": ["count", "arithmetic", "choice", "describe"],  # synthetic task kinds (synthetic.TASK_KINDS)
        "n_train": 2048,               # demonstrations (cycled through in shuffled batches)
        "image_size": 112,
        "answer_format": "think_answer",  # the instruction appended to prompts, as in GRPO
        "styles": {"reason": 1.0, "direct": 0.0, "unformatted": 0.0},  # share of each demonstration style
        "choice_text": 0.0,            # chance a multiple-choice demo answers with the option's text, not its letter
        "verbose": 0.0,                # chance a description demo is the verbose one (over max_words from 2 shapes)
    },
    "optim": {"lr": 3e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99, "warmup_steps": 0,
              "schedule": "constant", "grad_clip": 1.0},
    "train": {
        "steps": 100,
        "batch_size": 32,              # demonstrations per step, global: split evenly over ranks
        "log_every": 10,
        "export": True,                # the HF folder run_dir/final
    },
}
OPEN_KEYS = ("data.kinds", "model.tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_config(cfg: dict, world_size: int) -> None:
    """Everything that can be wrong with a config, before any model is built."""
    d, t = cfg["data"], cfg["train"]
    if cfg["model"]["dtype"] not in DTYPES:
        raise ValueError(f"model.dtype: unknown {cfg['model']['dtype']!r}; expected one of {list(DTYPES)}")
    unknown = [k for k in d["kinds"] if k not in TASK_KINDS]
    if not d["kinds"] or unknown:
        raise ValueError(f"data.kinds: unknown synthetic task kind(s) {unknown}; expected some of {list(TASK_KINDS)}")
    if d["answer_format"] != "think_answer":
        raise ValueError(f"data.answer_format: the demonstrations are written <think>…</think><answer>…</answer>, "
                         f"so only think_answer is supported, got {d['answer_format']!r}")
    unknown = [s for s in d["styles"] if s not in STYLES]
    if unknown:
        raise ValueError(f"data.styles: unknown style(s) {unknown}; expected some of {list(STYLES)}")
    for key, value in [("train.steps", t["steps"]), ("train.batch_size", t["batch_size"]),
                       ("train.log_every", t["log_every"]), ("data.n_train", d["n_train"])]:
        if value < 1:
            raise ValueError(f"{key}: must be >= 1, got {value}")
    if t["batch_size"] % world_size:
        raise ValueError(f"train.batch_size={t['batch_size']} is not divisible by {world_size} ranks")
    if d["n_train"] < t["batch_size"]:
        raise ValueError(f"data.n_train={d['n_train']} cannot fill one batch of train.batch_size={t['batch_size']}")
    if cfg["optim"]["schedule"] not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule: expected constant or cosine, got {cfg['optim']['schedule']!r}")


def encode_responses(tokenizer, texts: list[str], eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded response ids (B, T), each ending with the EOS the sampler stops at, and their mask (B, T)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos_id] for t in texts]
    width = max(len(x) for x in ids)
    response_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)        # (B, T)
    response_mask = torch.zeros((len(ids), width), dtype=torch.long)              # (B, T)
    for i, x in enumerate(ids):
        response_ids[i, :len(x)] = torch.tensor(x)
        response_mask[i, :len(x)] = 1
    return response_ids, response_mask


def warmup(cfg: dict) -> list[dict]:
    """Run the warm-up `cfg` describes; return the per-step metrics (rank 0 also writes them and the export)."""
    dist = hdist.init_distributed()
    check_config(cfg, dist.world_size)
    torch.manual_seed(cfg["seed"])
    run_dir = Path(cfg["run_dir"])
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    d, o, t = cfg["data"], cfg["optim"], cfg["train"]
    demos = synthetic_demonstrations(d["n_train"], seed=cfg["seed"], kinds=d["kinds"], size=d["image_size"],
                                     styles=d["styles"], choice_text=d["choice_text"], verbose=d["verbose"])

    dtype = DTYPES[cfg["model"]["dtype"]]
    if cfg["model"]["path"] == "tiny":
        model, processor = build_tiny(seed=cfg["seed"], **cfg["model"]["tiny"])
    else:
        model, processor = load_policy(cfg["model"]["path"], dtype=dtype)
    model = hdist.apply_fsdp(model.to(dtype=dtype, device=dist.device), dist)
    model.train()
    tokenizer = processor.tokenizer
    eos_id = eos_token_ids(model)[0]  # <|im_end|>: the end of the assistant turn, where the sampler stops
    pad_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]),
                                  weight_decay=o["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    metrics_file = run_dir / "metrics.jsonl"
    if dist.is_main:
        metrics_file.write_text("")

    per_rank = t["batch_size"] // dist.world_size
    batches = iterate_batches(demos, t["batch_size"], seed=cfg["seed"])
    history = []
    for step in range(t["steps"]):
        t0 = time.perf_counter()
        batch = next(batches)[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        examples, texts = [ex for ex, _ in batch], [r for _, r in batch]
        encoded = encode_prompts(processor, examples, d["answer_format"]).to(dist.device)
        prompts = prompt_batch(encoded, [len(ex.images) for ex in examples])
        response_ids, response_mask = (x.to(dist.device) for x in encode_responses(tokenizer, texts, eos_id, pad_id))
        rows = torch.arange(len(examples), device=dist.device)

        # The global token count first, so the loss is the token mean over every rank's responses.
        tokens = hdist.all_reduce(response_mask.sum().double().reshape(1)).item()
        logp, _ = token_logprobs(model, prompts.rows(rows), response_ids, response_mask)   # (b, T), 0 where masked
        loss = -logp.sum() * dist.world_size / tokens  # × world: FSDP averages gradients over ranks
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if hdist.all_true(math.isfinite(grad_norm), dist.device):  # no rank may step (or skip) alone
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        summed = hdist.all_reduce(torch.stack([loss.detach().double() / dist.world_size,
                                               (logp.exp() * response_mask).sum().double()]).reshape(2))
        metrics = {"step": step + 1, "loss": summed[0].item(), "token_prob": summed[1].item() / tokens,
                   "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "step_time_s": time.perf_counter() - t0}
        history.append(metrics)
        if dist.is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if (step + 1) % t["log_every"] == 0 or step + 1 == t["steps"]:
                print(f"warmup step {step + 1:4d} | loss {metrics['loss']:.4f} | token prob "
                      f"{metrics['token_prob']:.3f} | grad norm {grad_norm:.2f} | {metrics['step_time_s']:.2f}s",
                      flush=True)

    if t["export"]:
        out = hdist.export_hf(model, processor, run_dir / "final", dist)
        if out is not None:
            print(f"exported {out} (the warm-start policy: model.path in a GRPO config)", flush=True)
    hdist.cleanup()
    return history


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_warmup.yaml", help="YAML config [configs/tiny_warmup.yaml]")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 data.verbose=0.5")
    args = parser.parse_args(argv)
    return warmup(load_config(args.config, args.overrides, defaults=WARMUP_DEFAULTS, open_keys=OPEN_KEYS))


if __name__ == "__main__":
    main()
