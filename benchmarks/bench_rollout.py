"""Rollout throughput: harmo_min's `sample` against `model.generate`, same model, same batch, same token counts.

    source .venv/bin/activate
    python benchmarks/bench_rollout.py                       # CPU: tiny and medium random configs
    python benchmarks/bench_rollout.py --configs tiny --max-new-tokens 32
    python benchmarks/bench_rollout.py --gpu --peak-gbps 3350   # CUDA: full-size Qwen2.5-VL-3B, random weights

Both sides decode the same left-padded prompt batch (synthetic image prompts) and produce exactly the same
number of tokens: ours with `eos_ids=[-1]` (no row can stop), `generate` with `min_new_tokens=max_new_tokens`
(EOS suppressed until the end) and `suppress_tokens=placeholder_ids(model)` (the image/video slots our sampler
also masks). Modes: `greedy` (n = 1, T = 0; `do_sample=False`) and `sampled` (n responses per prompt, T = 1;
`do_sample=True, num_return_sequences=n`). tokens/s counts generated tokens only (rows x new tokens) over the
wall time of the whole call, prefill included. One warm-up call per side and config, then `--repeats` timed
calls (median reported).

CPU configs: `tiny` = build_tiny(0) (text hidden 64, 2 layers); `medium` = hidden 512, intermediate 1024,
8 layers, 8 heads, 4 KV heads. float32.

`--gpu` (needs CUDA; implemented but NOT run on the CPU machine this was written on): builds the full-size
Qwen2.5-VL-3B architecture (text hidden 2048, intermediate 11008, 36 layers, 16 heads, 2 KV heads, vocab 151936,
tied embeddings, mrope_section [16, 24, 24]; vision depth 32, hidden 1280, intermediate 3420, 16 heads,
out_hidden 2048, window 112, full-attention blocks [7, 15, 23, 31]) with random weights in bf16, batch 64
(`--gpu-prompts` x n), 512 new tokens, and besides the table reports the fraction of the memory-bandwidth bound
per decode step: (bytes of text-decoder weights + bytes of KV cache read that step) / measured mean decode-step
time, divided by `--peak-gbps` (GB/s; H100 SXM HBM3 ~3350, H200 ~4800). The vision tower is read only at prefill
and excluded from the per-step bytes; the mean decode-step time is (total time - prefill time) / (steps - 1),
prefill timed separately with one forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmo_min.data import encode_prompts  # noqa: E402

from harmo_min.synthetic import synthetic_examples  # noqa: E402
from harmo_min.model import build_tiny  # noqa: E402
from harmo_min.model import placeholder_ids
from harmo_min.rollout import sample  # noqa: E402

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


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_ours(model, prompts, *, n, max_new_tokens, greedy, device):
    g = torch.Generator(device).manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    out = sample(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=0.0 if greedy else 1.0,
                 generator=g, eos_ids=[-1])
    sync(device)
    dt = time.perf_counter() - t0
    assert out.response_ids.shape == (prompts["input_ids"].shape[0] * n, max_new_tokens), out.response_ids.shape
    return dt, out.response_ids.numel()


def run_generate(model, prompts, *, n, max_new_tokens, greedy, device):
    torch.manual_seed(0)
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                  suppress_tokens=placeholder_ids(model), use_cache=True)
    if greedy:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=n)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        seqs = model.generate(**prompts, **kwargs)
    sync(device)
    dt = time.perf_counter() - t0
    new = seqs[:, prompts["input_ids"].shape[1]:]
    assert new.shape == (prompts["input_ids"].shape[0] * n, max_new_tokens), new.shape
    return dt, new.numel()


def timed(fn, repeats, **kw):
    fn(**kw)  # warm-up
    times, tokens = [], None
    for _ in range(repeats):
        dt, tokens = fn(**kw)
        times.append(dt)
    return statistics.median(times), tokens


def build_3b(device):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from harmo_min.model import QWEN_SPECIAL_TOKENS, _set_generation_config, build_tiny_processor

    processor = build_tiny_processor()  # small vocabulary for the prompts; ids stay < 151936 so they embed fine
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(QWEN25_VL_3B_TEXT, vocab_size=151936, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=QWEN25_VL_3B_VISION, tie_word_embeddings=True,
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


def bandwidth_fraction(model, prompts, *, n, max_new_tokens, total_s, peak_gbps, device):
    """Bytes read per decode step (text weights + KV so far) / mean step time, as a fraction of peak."""
    from transformers import DynamicCache
    from harmo_min.rollout import prefill

    cache = DynamicCache(config=model.config)
    sync(device)
    t0 = time.perf_counter()
    prefill(model, prompts, cache)
    sync(device)
    prefill_s = time.perf_counter() - t0
    steps = max_new_tokens - 1
    step_s = (total_s - prefill_s) / steps
    lm = model.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    if not model.config.tie_word_embeddings:
        weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    tc = model.config.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * 2  # K and V, bf16
    rows = prompts["input_ids"].shape[0] * n
    prompt_len = prompts["input_ids"].shape[1]
    mean_ctx = prompt_len + (max_new_tokens) / 2  # average KV length read over the decode steps
    bytes_per_step = weight_bytes + rows * mean_ctx * kv_per_token
    achieved = bytes_per_step / step_s / 1e9
    return dict(prefill_s=prefill_s, step_ms=step_s * 1e3, weight_gb=weight_bytes / 1e9,
                kv_gb_mean=rows * mean_ctx * kv_per_token / 1e9, achieved_gbps=achieved,
                fraction=achieved / peak_gbps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=list(CONFIGS))
    p.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4, help="responses per prompt in sampled mode (greedy uses 1)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="CUDA: full-size Qwen2.5-VL-3B random weights, bf16")
    p.add_argument("--gpu-prompts", type=int, default=16, help="--gpu: prompts; batch = prompts x n (16 x 4 = 64)")
    p.add_argument("--gpu-max-new-tokens", type=int, default=512)
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="--gpu: peak memory bandwidth, GB/s")
    args = p.parse_args(argv)

    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: CUDA is not available")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    rows = []
    if args.gpu:
        model, processor = build_3b(device)
        examples = synthetic_examples(args.gpu_prompts, seed=0)
        prompts = encode_prompts(processor, examples).to(device)
        prompts["pixel_values"] = prompts["pixel_values"].to(torch.bfloat16)
        builds = [("qwen2.5-vl-3b", model, prompts, args.gpu_max_new_tokens)]
    else:
        builds = []
        for name in args.configs:
            model, processor = build_tiny(0, **CONFIGS[name])
            prompts = encode_prompts(processor, synthetic_examples(args.prompts, seed=0))
            builds.append((name, model, prompts, args.max_new_tokens))
    for name, model, prompts, max_new in builds:
        params = sum(p.numel() for p in model.parameters())
        for mode in args.modes:
            n = 1 if mode == "greedy" else args.n
            kw = dict(model=model, prompts=prompts, n=n, max_new_tokens=max_new, greedy=mode == "greedy",
                      device=device)
            ours_s, tokens = timed(run_ours, args.repeats, **kw)
            gen_s, gen_tokens = timed(run_generate, args.repeats, **kw)
            assert tokens == gen_tokens
            row = dict(config=name, params=params, mode=mode, rows=prompts["input_ids"].shape[0] * n,
                       new=max_new, ours=tokens / ours_s, gen=tokens / gen_s, ours_s=ours_s, gen_s=gen_s)
            if args.gpu:
                row["bw"] = bandwidth_fraction(model, prompts, n=n, max_new_tokens=max_new, total_s=ours_s,
                                               peak_gbps=args.peak_gbps, device=device)
            rows.append(row)
            print(f"  done {name} {mode}: ours {ours_s:.2f}s, generate {gen_s:.2f}s", flush=True)

    print()
    print("| config | params | mode | rows x new tokens | ours tok/s | generate tok/s | ours / generate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['mode']} | {r['rows']} x {r['new']} | "
              f"{r['ours']:.0f} | {r['gen']:.0f} | {r['ours'] / r['gen']:.2f}x |")
    for r in rows:
        if "bw" in r:
            b = r["bw"]
            print(f"{r['config']} {r['mode']}: prefill {b['prefill_s']:.2f}s, decode step {b['step_ms']:.1f} ms, "
                  f"weights {b['weight_gb']:.2f} GB + mean KV {b['kv_gb_mean']:.2f} GB per step -> "
                  f"{b['achieved_gbps']:.0f} GB/s = {b['fraction']:.1%} of {args.peak_gbps:.0f} GB/s")


if __name__ == "__main__":
    main()
