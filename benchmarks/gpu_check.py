"""One-command GPU acceptance: the 3B recipe on one H100/H200 in under 8 minutes, reported as one JSON line.

    python benchmarks/gpu_check.py --prepare               # here, with network: files the GPU machine cannot fetch
    python benchmarks/gpu_check.py                         # on the GPU machine (see below for the exact command)
    python benchmarks/gpu_check.py --device cpu --tiny     # smoke test of the same code paths (tests/test_gpu_check.py)

`--prepare` writes, under runs/gpu_check/ (git-ignored; carry these two folders to the GPU machine):
  processor/  the real Qwen2.5-VL tokenizer and image-processor files (benchmarks/full_width.qwen_processor_files)
  wheels/     the transformers wheel of this environment: the GPU image ships an older transformers than the pin
On a device machine of this workplace (the `run` tool):
    carry ["runs/gpu_check/processor", "runs/gpu_check/wheels"], command:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site runs/gpu_check/wheels/*.whl &&
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out /tmp/gpu_check \
        | tee $OUT/gpu_check.json

What it does, all on one GPU, and what it reports:
1. **Model**: the full-size Qwen2.5-VL-3B architecture (`memory.PUBLIC`) with random weights, built on the GPU in
   bf16 from its config (seeded) and saved as a model folder with the processor files (7.5 GB on local disk).
2. **train.py under NCCL**: `torchrun --nproc_per_node 1 train.py --config configs/qwen2_5_vl_3b.yaml` with that
   folder, synthetic image tasks and a small batch (--prompts x --n rows, --max-new-tokens), for --steps steps: the
   3B recipe's fp32 master weights and AdamW state, bf16 compute through FSDP2, the bf16 reference (kl_coef 0.01),
   activation checkpointing. Reported from its metrics.jsonl: step time and phase times (the mean over the steps
   after the first, which compiles and warms the allocator), peak memory (`torch.cuda.max_memory_allocated` over
   the run, as train.py logs it), the memory plan's prediction for the same settings (`memory.plan`, prompt length
   as measured), and the MFU of the update phase: 6 · (decoder-layer parameters · all tokens + lm_head parameters
   · response tokens) / (update seconds · --peak-tflops); attention FLOPs and the vision tower are left out, and
   the recomputation of activation checkpointing is not counted (MFU, not hardware FLOP utilisation).
   `--share-prompt` trains with `grpo.share_prompt` (each prompt run once per micro-batch, the full parameters held
   through the update): run it as a second call and compare `time/update` and the peak memory.
3. **Sampler**: `benchmarks/bench_rollout.measure_decode` on the same model: harmo_min's sampler against HF
   `generate` at --decode-prompts x --decode-n = 64 rows x 512 new tokens, tokens/s of both and the fraction of the
   HBM bound (--peak-gbps). If that function is not in this checkout yet, the JSON says so instead.
Every timing on a GPU is taken between `torch.cuda.synchronize()` calls (train.py's `timed` and measure_decode do
the same). `--device cpu --tiny` runs the same steps with harmo_min's tiny model on the CPU (gloo instead of NCCL,
peak RSS instead of CUDA memory, no MFU or bandwidth fraction: the CPU's peaks are unknown), in well under a minute.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import full_width  # noqa: E402
import train  # noqa: E402
from harmo_min import memory  # noqa: E402
from harmo_min.config import load_config  # noqa: E402
from harmo_min.data import encode_prompts  # noqa: E402
from harmo_min.model import ImageProcessor, build_tiny  # noqa: E402
from harmo_min.synthetic import synthetic_examples  # noqa: E402

PREPARED = ROOT / "runs" / "gpu_check"
MIN_TRANSFORMERS = (5, 23)


def prepare() -> None:
    """The files the offline GPU machine needs: processor files and this environment's transformers wheel."""
    import transformers

    full_width.qwen_processor_files(PREPARED / "processor")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
                    f"transformers=={transformers.__version__}", "-d", str(PREPARED / "wheels")], check=True)
    print(f"prepared {PREPARED / 'processor'} and {PREPARED / 'wheels'}: carry both to the GPU machine")


def build_policy(out: Path, device: torch.device, tiny: bool):
    """(model on `device`, processor, folder): the random-weight policy, saved where train.py will read it."""
    folder = out / "policy"
    if tiny:
        model, processor = build_tiny(0)
        model = model.to(device)
    else:
        from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        source = PREPARED / "processor"
        if not (source / "tokenizer.json").is_file():
            raise SystemExit(f"{source} is missing: run `python benchmarks/gpu_check.py --prepare` on a machine "
                             "with network and carry runs/gpu_check/processor here")
        processor = ImageProcessor.from_pretrained(source)
        config = Qwen2_5_VLConfig(**memory.PUBLIC["Qwen2.5-VL-3B-Instruct"], **full_width.IDS)
        torch.manual_seed(0)
        with torch.device(device):  # random init where the weights live: seconds on a GPU
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16,
                                                                     attn_implementation="sdpa")
        model.generation_config = GenerationConfig(**full_width.GENERATION)  # as Qwen ships it, for train.py
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model.eval(), processor, folder


def run_train(out: Path, folder: Path, args, device: torch.device) -> dict:
    """train.py under torchrun (one rank: NCCL on a GPU, gloo on the CPU); its metrics, summarised."""
    run_dir = out / "run"
    overrides = [f"run_dir={run_dir}", f"model.path={folder}", "data.train=synthetic",
                 f"data.n_train={4 * args.prompts}",
                 f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
                 f"grpo.prompts_per_step={args.prompts}", f"grpo.micro_batch_size={args.micro_batch}",
                 "grpo.drop_zero_variance_groups=false", f"train.steps={args.steps}", "train.save_every=0",
                 "train.sample_every=0", "train.export=false", "optim.warmup_steps=0",
                 f"grpo.share_prompt={str(args.share_prompt).lower()}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # train.py picks CUDA whenever it sees one
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
           "--config", "configs/qwen2_5_vl_3b.yaml", *overrides, "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    (out / "train.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed (exit {proc.returncode}); log: {out / 'train.log'}\n{proc.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if [m["step"] for m in metrics] != list(range(1, args.steps + 1)):
        raise SystemExit(f"train.py logged steps {[m['step'] for m in metrics]}, expected 1..{args.steps}")
    timed = metrics[1:] or metrics  # the first step compiles kernels and grows the allocator's pool
    mean = lambda key: sum(m.get(key, 0.0) for m in timed) / len(timed)  # noqa: E731
    tokens = sum(m["tokens_per_s"] * m["step_time_s"] for m in timed) / len(timed)  # prompt + response tokens
    response_tokens = args.prompts * args.n * mean("response_length")
    result = {"wall_s": round(wall, 1), "steps": len(metrics), "step_time_s": round(mean("step_time_s"), 3),
              **{k: round(mean(k), 3) for k in metrics[-1] if k.startswith("time/")},
              "tokens_per_step": round(tokens), "response_length": round(mean("response_length"), 1),
              "peak_memory_gb": max(m["memory/peak_gb"] for m in metrics),
              "skipped_steps": sum(m["skipped_step"] for m in metrics)}
    cfg = load_config(ROOT / "configs/qwen2_5_vl_3b.yaml", overrides[1:], defaults=train.GRPO_DEFAULTS,
                      open_keys=train.OPEN_KEYS, rules=train.RULES)
    prompt_tokens = max(1, round((tokens - response_tokens) / (args.prompts * args.n)))
    image_tokens = 0 if args.tiny else min(prompt_tokens, 16)  # synthetic 112 px images: 16 tokens each
    planned = memory.plan(cfg, world_size=1, prompt_tokens=prompt_tokens, image_tokens=image_tokens)
    result["plan_peak_gb"] = float(f"{planned.peak_gb:.3g}")
    if device.type == "cuda":
        arch = memory.Arch.of(str(folder), "model.path")
        t = arch.cfg.text_config
        flops = 6 * (arch.layer * t.num_hidden_layers * tokens + t.vocab_size * t.hidden_size * response_tokens)
        result["mfu_update"] = round(flops / (mean("time/update") * args.peak_tflops * 1e12), 4)
    return result


def run_sampler(model, processor, args, device: torch.device) -> dict:
    """measure_decode (benchmarks/bench_rollout.py) on the policy, when that function exists in this checkout."""
    import bench_rollout

    measure = getattr(bench_rollout, "measure_decode", None)
    if measure is None:
        return {"missing": "benchmarks/bench_rollout.py has no measure_decode yet (the static-KV-cache sampler work "
                           "has not landed in this checkout): sampler figures not measured"}
    # `generate` would also apply the saved generation config's repetition_penalty 1.05 (Qwen's default), which our
    # sampler does not have: compare the two on the same distribution, stopping at the same ids.
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=model.generation_config.pad_token_id)
    prompts = encode_prompts(processor, synthetic_examples(args.decode_prompts, seed=0)).to(device)
    if prompts.get("pixel_values") is not None:
        prompts["pixel_values"] = prompts["pixel_values"].to(next(model.parameters()).dtype)
    wanted = dict(n=args.decode_n, max_new_tokens=args.decode_tokens, repeats=1,
                  peak_gbps=args.peak_gbps if device.type == "cuda" else None)
    accepted = inspect.signature(measure).parameters
    result = measure(model, prompts, **{k: v for k, v in wanted.items() if k in accepted})
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="write runs/gpu_check/{processor,wheels} and exit")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="harmo_min's tiny model instead of the full-size 3B")
    p.add_argument("--out", type=Path, default=PREPARED / "out")
    p.add_argument("--steps", type=int, default=3)
    # Sizes: (full-size 3B on a GPU, --tiny smoke test)
    sizes = {"prompts": (4, 2), "n": (8, 2), "micro_batch": (8, 2), "max_new_tokens": (256, 8),
             "decode_prompts": (16, 4), "decode_n": (4, 2), "decode_tokens": (512, 16)}
    p.add_argument("--prompts", type=int, help="train: prompts per step [4; tiny 2]")
    p.add_argument("--n", type=int, help="train: responses per prompt [8; tiny 2]")
    p.add_argument("--micro-batch", type=int, help="train: rows per forward/backward [8; tiny 2]")
    p.add_argument("--max-new-tokens", type=int, help="train: response length limit [256; tiny 8]")
    p.add_argument("--decode-prompts", type=int, help="sampler: prompts, rows = prompts x --decode-n [16; tiny 4]")
    p.add_argument("--decode-n", type=int, help="sampler: responses per prompt [4; tiny 2]")
    p.add_argument("--decode-tokens", type=int, help="sampler: new tokens [512; tiny 16]")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--peak-gbps", type=float, default=4800.0, help="HBM bandwidth, GB/s (H200: 4800, H100: 3350)")
    p.add_argument("--timeout", type=int, default=420, help="seconds for the train.py run")
    p.add_argument("--share-prompt", action="store_true",
                   help="train with grpo.share_prompt (a second run: compare time/update and peak memory)")
    args = p.parse_args(argv)
    for key, (full, tiny) in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.prepare:
        prepare()
        return {}
    import transformers

    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if version < MIN_TRANSFORMERS:
        raise SystemExit(f"transformers {transformers.__version__} is older than the pin (>= 5.23): install the "
                         f"wheel from runs/gpu_check/wheels (see this script's docstring)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny for the smoke test)")
    device = torch.device(args.device)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model, processor, folder = build_policy(args.out, device, args.tiny)
    build_s = time.perf_counter() - start
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "model": "tiny" if args.tiny else "Qwen2.5-VL-3B (random weights)", "build_s": round(build_s, 1),
              "train": run_train(args.out, folder, args, device),
              "sampler": run_sampler(model, processor, args, device)}
    report["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
