"""Rollout throughput: harmo_min's `sample` against `model.generate`, same model, same batch, same token counts.

    source .venv/bin/activate
    python benchmarks/bench_rollout.py                       # CPU: tiny and medium random configs, eager
    python benchmarks/bench_rollout.py --configs tiny --max-new-tokens 32 --compile
    python benchmarks/bench_rollout.py --configs medium --modes greedy --profile   # where each side's time goes
    python benchmarks/bench_rollout.py --arch 3b --device cuda --peak-gbps 4800   # full-size Qwen2.5-VL-3B
    python benchmarks/bench_rollout.py --arch 3b --device cpu --text-layers 2 --vision-depth 1 \
        --gpu-prompts 2 --n 2 --gpu-max-new-tokens 8 --modes sampled      # the same path, shrunk, on a CPU

Both sides decode the same left-padded prompt batch (synthetic image prompts) in the same dtype and produce exactly
the same number of tokens, with no stop token on either side: ours with `eos_ids=[-1]` (no row can stop), `generate`
with a generation config whose `eos_token_id` is None (it stops at `max_new_tokens` only, and runs no extra logits
processor to hold EOS back), both with the image/video placeholder ids suppressed
(`suppress_tokens=placeholder_ids(model)` for `generate`, our sampler's default). Modes: `greedy` (n = 1, T = 0;
`do_sample=False`) and `sampled` (n responses per prompt, T = 1; `do_sample=True, num_return_sequences=n`). tokens/s
counts generated tokens only (rows x new tokens) over the wall time of the whole call, prefill included. One warm-up
call per side (for ours with `--compile` it includes the compilation, reported as `ours warm-up s`), then
`--repeats` timed calls (median reported), the two sides alternating. `--clock cpu` times the same calls in
process CPU-seconds, which a CPU shared with other jobs inflates less than wall time.

CPU configs: `tiny` = build_tiny(0) (text hidden 64, 2 layers); `medium` = hidden 512, intermediate 1024,
8 layers, 8 heads, 4 KV heads. float32.

`--arch 3b` builds the full-size Qwen2.5-VL-3B architecture (text hidden 2048, intermediate 11008, 36 layers,
16 heads, 2 KV heads, vocab 151936, tied embeddings, mrope_section [16, 24, 24]; vision depth 32, hidden 1280,
intermediate 3420, 16 heads, out_hidden 2048, window 112, full-attention blocks [7, 15, 23, 31]) with random
weights in bf16, batch `--gpu-prompts` x n (16 x 4 = 64), 512 new tokens. `--text-layers` / `--vision-depth`
shrink it (same widths) so the path also runs on a CPU. Besides the table it reports, for our sampler, the
fraction of the memory-bandwidth bound per decode step: (bytes of text-decoder weights + bytes of the KV cache the
step needs, i.e. the mean context over the decode steps) / measured mean decode-step time, divided by
`--peak-gbps` (GB/s; H100 SXM HBM3 ~3350, H200 ~4800). The vision tower is read only at prefill and excluded from
the per-step bytes; the mean decode-step time is (whole call - prefill) / (new tokens - 1), prefill timed
separately with one forward. Our static cache attends over its whole preallocated length every step, so the bytes
it really reads are higher than the bytes counted: the fraction is of the useful work.

`measure_decode(model, prompts, ...)` is the importable core (the GPU acceptance script calls it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmo_min.data import encode_prompts  # noqa: E402
from harmo_min.model import build_tiny, placeholder_ids  # noqa: E402
from harmo_min.rollout import prefill, sample  # noqa: E402
from harmo_min.synthetic import synthetic_examples  # noqa: E402

CONFIGS = {
    "tiny": {},
    "medium": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4),
}

QWEN25_VL_3B_TEXT = dict(
    hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
    tie_word_embeddings=True, max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
QWEN25_VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, window_size=112, out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31],
)


def measure_decode(model, prompts: dict, *, n: int, max_new_tokens: int, greedy: bool = False,
                   compile: bool = False, repeats: int = 1, peak_gbps: float | None = None,
                   clock=time.perf_counter) -> dict:
    """Ours against `generate` on one prompt batch: tokens/s of each and their ratio; with `peak_gbps`, also the
    prefill time, our mean decode-step time, the bytes a step needs and the fraction of the bandwidth bound.
    `clock=time.process_time` measures CPU-seconds instead of wall seconds (a CPU shared with other jobs)."""
    device = prompts["input_ids"].device
    kw = dict(model=model, prompts=prompts, n=n, max_new_tokens=max_new_tokens, greedy=greedy, clock=clock)
    ours_warmup_s, tokens = _run_ours(compile=compile, **kw)
    _, gen_tokens = _run_generate(**kw)
    assert tokens == gen_tokens, (tokens, gen_tokens)
    ours_times, gen_times = [], []
    for _ in range(repeats):  # alternate the two sides, so a change in machine load hits both
        ours_times.append(_run_ours(compile=compile, **kw)[0])
        gen_times.append(_run_generate(**kw)[0])
    ours_s, gen_s = statistics.median(ours_times), statistics.median(gen_times)
    result = dict(rows=prompts["input_ids"].shape[0] * n, new_tokens=max_new_tokens, greedy=greedy, compile=compile,
                  ours_tok_s=tokens / ours_s, generate_tok_s=tokens / gen_s, ratio=gen_s / ours_s, ours_s=ours_s,
                  generate_s=gen_s, ours_warmup_s=ours_warmup_s)
    if peak_gbps is not None:
        result.update(_bandwidth(model, prompts, n=n, max_new_tokens=max_new_tokens, ours_s=ours_s,
                                 peak_gbps=peak_gbps, device=device, clock=clock))
    return result


def build_qwen25_vl_3b(device, *, text_layers: int | None = None, vision_depth: int | None = None):
    """The Qwen2.5-VL-3B architecture with random bf16 weights (optionally fewer layers, same widths) and the tiny
    offline processor (its ids stay < 151936, so they embed fine)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from harmo_min.model import QWEN_SPECIAL_TOKENS, _set_generation_config, build_tiny_processor

    processor = build_tiny_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(QWEN25_VL_3B_TEXT, vocab_size=151936, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(QWEN25_VL_3B_VISION)
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    if vision_depth is not None:
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_depth]
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16,
                                                                attn_implementation="sdpa")
    model.eval()
    _set_generation_config(model, tok)
    return model, processor


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=list(CONFIGS))
    p.add_argument("--arch", choices=["small", "3b"], default="small",
                   help="small: the --configs models, float32; 3b: full-size Qwen2.5-VL-3B widths, bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4, help="responses per prompt in sampled mode (greedy uses 1)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="ours with sample(compile=True); generate unchanged")
    p.add_argument("--gpu-prompts", type=int, default=16, help="--arch 3b: prompts; batch = prompts x n (16 x 4 = 64)")
    p.add_argument("--gpu-max-new-tokens", type=int, default=512)
    p.add_argument("--text-layers", type=int, help="--arch 3b: fewer decoder layers (same widths)")
    p.add_argument("--vision-depth", type=int, help="--arch 3b: fewer vision blocks (same widths)")
    p.add_argument("--peak-gbps", type=float, help="peak memory bandwidth, GB/s: report the fraction of it")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU-seconds (all threads) instead of wall time; CPU devices only")
    p.add_argument("--profile", action="store_true", help="after timing, print each side's top ops (torch.profiler)")
    args = p.parse_args(argv)

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    if args.clock == "cpu" and torch.device(args.device).type != "cpu":
        sys.exit("--clock cpu: only for --device cpu (GPU work does not show in process CPU time)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, clock {args.clock}")
    builds = []
    if args.arch == "3b":
        model, processor = build_qwen25_vl_3b(args.device, text_layers=args.text_layers,
                                              vision_depth=args.vision_depth)
        prompts = encode_prompts(processor, synthetic_examples(args.gpu_prompts, seed=0)).to(args.device)
        prompts["pixel_values"] = prompts["pixel_values"].to(torch.bfloat16)
        layers = model.config.text_config.num_hidden_layers
        builds.append((f"qwen2.5-vl-3b ({layers} layers)", model, prompts, args.gpu_max_new_tokens))
    else:
        for name in args.configs:
            model, processor = build_tiny(0, **CONFIGS[name])
            model.to(args.device)
            prompts = encode_prompts(processor, synthetic_examples(args.prompts, seed=0)).to(args.device)
            builds.append((name, model, prompts, args.max_new_tokens))

    rows = []
    for name, model, prompts, max_new in builds:
        params = sum(p.numel() for p in model.parameters())
        for mode in args.modes:
            r = measure_decode(model, prompts, n=1 if mode == "greedy" else args.n, max_new_tokens=max_new,
                               greedy=mode == "greedy", compile=args.compile, repeats=args.repeats,
                               peak_gbps=args.peak_gbps, clock=clock)
            rows.append(dict(r, config=name, params=params, mode=mode))
            if args.profile:
                kw = dict(model=model, prompts=prompts, n=1 if mode == "greedy" else args.n, max_new_tokens=max_new,
                          greedy=mode == "greedy", clock=clock)
                _print_profile(f"{name} {mode}: ours", lambda: _run_ours(compile=args.compile, **kw))
                _print_profile(f"{name} {mode}: generate", lambda: _run_generate(**kw))
            print(f"  done {name} {mode}: ours {r['ours_s']:.2f}s (warm-up {r['ours_warmup_s']:.1f}s), "
                  f"generate {r['generate_s']:.2f}s", flush=True)

    print()
    ours = "ours (compiled)" if args.compile else "ours"
    print(f"| config | params | mode | rows x new tokens | {ours} tok/s | generate tok/s | {ours} / generate "
          f"| {ours} warm-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['mode']} | {r['rows']} x {r['new_tokens']} | "
              f"{r['ours_tok_s']:.0f} | {r['generate_tok_s']:.0f} | {r['ratio']:.2f}x | {r['ours_warmup_s']:.1f} |")
    for r in rows:
        if "hbm_fraction" in r:
            print(f"{r['config']} {r['mode']}: prefill {r['prefill_s']:.2f}s, decode step {r['step_ms']:.1f} ms, "
                  f"weights {r['weight_gb']:.2f} GB + mean KV {r['kv_gb_mean']:.2f} GB per step -> "
                  f"{r['achieved_gbps']:.0f} GB/s = {r['hbm_fraction']:.1%} of {args.peak_gbps:.0f} GB/s")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _run_ours(model, prompts, *, n, max_new_tokens, greedy, compile, clock):
    device = prompts["input_ids"].device
    g = torch.Generator(device).manual_seed(0)
    _sync(device)
    t0 = clock()
    out = sample(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=0.0 if greedy else 1.0,
                 generator=g, eos_ids=[-1], compile=compile)
    _sync(device)
    dt = clock() - t0
    assert out.response_ids.shape == (prompts["input_ids"].shape[0] * n, max_new_tokens), out.response_ids.shape
    return dt, out.response_ids.numel()


def _run_generate(model, prompts, *, n, max_new_tokens, greedy, clock):
    device = prompts["input_ids"].device
    torch.manual_seed(0)
    config = copy.deepcopy(model.generation_config)
    config.update(eos_token_id=None, max_new_tokens=max_new_tokens, suppress_tokens=placeholder_ids(model),
                  use_cache=True)
    if greedy:
        config.update(do_sample=False)
    else:
        config.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=n)
    _sync(device)
    t0 = clock()
    with torch.no_grad():
        seqs = model.generate(**prompts, generation_config=config)
    _sync(device)
    dt = clock() - t0
    new = seqs[:, prompts["input_ids"].shape[1]:]
    assert new.shape == (prompts["input_ids"].shape[0] * n, max_new_tokens), new.shape
    return dt, new.numel()


def _print_profile(title: str, fn) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    print(f"\n{title}: top ops by self time (one call, profiler overhead included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def _bandwidth(model, prompts, *, n, max_new_tokens, ours_s, peak_gbps, device, clock) -> dict:
    """Bytes a decode step needs (text weights + KV of the mean context) / mean step time, as a fraction of peak."""
    _sync(device)
    t0 = clock()
    prefill(model, prompts)
    _sync(device)
    prefill_s = clock() - t0
    step_s = (ours_s - prefill_s) / max(max_new_tokens - 1, 1)
    lm = model.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    if not model.config.tie_word_embeddings:
        weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    tc = model.config.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    element = next(lm.parameters()).element_size()
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * element  # K and V, all layers
    rows = prompts["input_ids"].shape[0] * n
    mean_context = prompts["input_ids"].shape[1] + max_new_tokens / 2  # mean KV length over the decode steps
    kv_bytes = rows * mean_context * kv_per_token
    achieved = (weight_bytes + kv_bytes) / step_s / 1e9
    return dict(prefill_s=prefill_s, step_ms=step_s * 1e3, weight_gb=weight_bytes / 1e9, kv_gb_mean=kv_bytes / 1e9,
                achieved_gbps=achieved, hbm_fraction=achieved / peak_gbps)


if __name__ == "__main__":
    main()
