"""One GRPO step (rollout + rewards + update): harmo_min's train.py against TRL's GRPOTrainer, same tiny model.

    source .venv/bin/activate
    python benchmarks/bench_step.py                  # ours, then TRL in its own venv (subprocess)
    python benchmarks/bench_step.py --skip-trl       # ours only

TRL lives in its own virtual environment (torch pinned first so pip never pulls a CUDA build):

    python3 -m venv benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/pip install torch==2.13.0
    benchmarks/.venv-trl/bin/pip install -c <(echo torch==2.13.0) trl==1.16.0 -e .

The TRL half runs as `benchmarks/.venv-trl/bin/python benchmarks/bench_step.py --trl-side ...` (this same file;
`--trl-python` picks another interpreter). Nothing from TRL is imported on our side.

Matched settings: the same random tiny Qwen2.5-VL (`build_tiny(0)`, saved with save_pretrained into a temp folder
and loaded by TRL from there), the same synthetic image prompts (`synthetic_examples`, think_answer format, one
112 px image each), `--prompts` prompts per step, `--n` responses per prompt, `--max-new-tokens`, temperature 1,
float32, AdamW at the same lr, one update per rollout batch, the whole batch in one forward/backward (our
micro_batch_size = prompts x n; TRL per_device_train_batch_size = prompts x n, gradient_accumulation_steps 1,
steps_per_generation 1, num_iterations 1), no KL (beta 0, no reference model) on both sides.
Rewards differ by design: ours runs its full hybrid reward (rewards.py); TRL gets a trivial length-based reward
function (its cost is negligible either way). Both sides stop responses at EOS, so response lengths can differ a
little: the mean response length per side is printed next to the times. TRL on CPU: use_vllm=False, bf16=False,
gradient_checkpointing=False.

Step time: ours is `step_time_s` from `train.main`'s history (prompt encoding, rollout, rewards, update,
optimizer step, logging); TRL's is the wall time between `on_step_begin` and `on_step_end` of a trainer callback
(generation, reward, loss, backward, optimizer step). The first `--warmup` steps of each side are dropped; the
median of the rest is reported. `--clock cpu` measures the same intervals in process CPU-seconds (all threads)
instead of wall seconds: on a shared CPU box, wall time mostly measures the other jobs' load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRL_PYTHON = ROOT / "benchmarks" / ".venv-trl" / "bin" / "python"


# ---------------------------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------------------------

def run_ours(args, run_dir: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import train

    overrides = [
        f"run_dir={run_dir}", "seed=0",
        f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1.0",
        f"grpo.prompts_per_step={args.prompts}", f"grpo.micro_batch_size={args.prompts * args.n}", "grpo.epochs=1",
        "grpo.kl_coef=0.0", f"optim.lr={args.lr}", f"grpo.share_prompt={str(args.share_prompt).lower()}",
        f"train.steps={args.steps}", "train.sample_every=0", "train.save_every=0", "train.export=false",
        f"data.n_train={max(64, args.prompts * args.steps)}",
    ]
    if args.clock == "cpu":
        # train.py times a step with time.perf_counter(); point its `time` at a shim whose perf_counter is this
        # process's CPU time (all threads), so step_time_s becomes CPU-seconds per step.
        import types
        train.time = types.SimpleNamespace(perf_counter=time.process_time)
    history = train.main(["--config", "", "--overwrite", *overrides])  # defaults + overrides, no config file
    times = [h["step_time_s"] for h in history]
    return dict(times=times, response_length=statistics.mean(h["response_length"] for h in history))


# ---------------------------------------------------------------------------------------------------------------
# TRL (runs inside benchmarks/.venv-trl)
# ---------------------------------------------------------------------------------------------------------------

def trl_side(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from harmo_min.data import build_messages, load_images

    from harmo_min.synthetic import synthetic_examples
    from harmo_min.model import ImageProcessor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model_dir, dtype=torch.float32)
    processor = ImageProcessor.from_pretrained(args.model_dir)
    processor.tokenizer.padding_side = "left"

    examples = synthetic_examples(max(64, args.prompts * args.steps), seed=0)
    records = {"prompt": [], "image": []}
    for ex in examples:
        records["prompt"].append(build_messages(ex, "think_answer"))
        records["image"].append(load_images(ex)[0])
    dataset = Dataset.from_dict(records)

    def length_reward(completions, **kwargs):  # trivial: cheap and always defined
        return [min(len(str(c)), 100) / 100.0 for c in completions]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        clock = time.process_time if args.clock == "cpu" else time.perf_counter

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = self.clock()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(self.clock() - self.t0)

    timer = StepTimer()
    batch = args.prompts * args.n
    config = GRPOConfig(
        output_dir=args.out_dir, max_steps=args.steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=args.n,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, learning_rate=args.lr,
        beta=0.0, use_vllm=False, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=dataset,
                          processing_class=processor, callbacks=[timer])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    result = dict(times=timer.times, response_length=statistics.mean(lengths) if lengths else None)
    Path(args.result).write_text(json.dumps(result))


def run_trl(args, tmp: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from harmo_min.model import build_tiny

    model_dir = os.path.join(tmp, "tiny_model")
    model, processor = build_tiny(0)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    result = os.path.join(tmp, "trl_result.json")
    cmd = [str(args.trl_python), str(Path(__file__).resolve()), "--trl-side", "--model-dir", model_dir,
           "--out-dir", os.path.join(tmp, "trl_out"), "--result", result,
           "--prompts", str(args.prompts), "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
           "--steps", str(args.steps), "--lr", str(args.lr), "--clock", args.clock]
    print("TRL side:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, timeout=args.trl_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL side failed with exit code {proc.returncode}")
    return json.loads(Path(result).read_text())


def summarise(name: str, res: dict, warmup: int) -> float:
    kept = res["times"][warmup:] or res["times"]
    med = statistics.median(kept)
    print(f"{name}: steps {[round(t, 3) for t in res['times']]} -> median after warm-up {med:.3f} s/step, "
          f"mean response length {res['response_length']:.2f}")
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--n", type=int, default=4, help="responses per prompt (group size)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: seconds per step; cpu: process CPU-seconds per step (all threads), steadier on a "
                        "shared machine where other jobs steal cores")
    p.add_argument("--share-prompt", action="store_true", help="ours with grpo.share_prompt (each prompt run once)")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--trl-python", default=str(DEFAULT_TRL_PYTHON))
    p.add_argument("--trl-timeout", type=int, default=600)
    p.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.trl_side:
        trl_side(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(args, os.path.join(tmp, "ours"))
        trl = None
        if not args.skip_trl:
            trl = run_trl(args, tmp)
    print()
    print(f"settings: {args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, steps={args.steps}, "
          f"warm-up dropped={args.warmup}, clock={args.clock}")
    o = summarise("ours", ours, args.warmup)
    if trl is not None:
        t = summarise("TRL ", trl, args.warmup)
        print()
        print(f"| | {'CPU-s' if args.clock == 'cpu' else 's'}/step | mean response tokens |")
        print("|---|---|---|")
        print(f"| harmo_min | {o:.3f} | {ours['response_length']:.1f} |")
        print(f"| TRL GRPOTrainer | {t:.3f} | {trl['response_length']:.1f} |")
        print(f"ours / TRL step time: {o / t:.2f}x (goal <= 0.4x)")


if __name__ == "__main__":
    main()
