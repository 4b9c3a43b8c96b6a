"""Multi-process behaviour with `torchrun --nproc_per_node 2` on CPU (gloo): the real launcher, real FSDP2, the real
train.py loop, and the GPU-only rules reproduced on CPU (tests/dist/train_worker.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.distributed.checkpoint import FileSystemReader
from transformers import Qwen2_5_VLForConditionalGeneration

from harmo_min.model import build_tiny

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "train_worker.py"
FAST = ROOT / "tests" / "configs" / "fast.yaml"


def _env():
    # One thread per rank: two ranks on a 2-core CI machine, and bitwise-stable reductions.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _run(args, nproc, timeout=300, ok=True):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(folder):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict()


def test_every_collective_of_the_loop_gets_a_tensor_on_the_training_device(tmp_path):
    """NCCL serves CUDA tensors only: a tensor the loop builds without `device=` kills a GPU run at its first
    collective. The worker names the CPU training device "cpu:0" and refuses any other tensor, as NCCL would."""
    _run([WORKER, "device-rule", "--config", FAST, f"run_dir={tmp_path}", "grpo.kl_coef=0.01",
          "train.save_every=2", "train.export=true"], nproc=2)
    assert len(_metrics(tmp_path)) == 2 and (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists native threads through Linux /proc")
def test_cleanup_ends_the_process_group_threads_before_the_interpreter_exits(tmp_path):
    """DTensor sharding specs that torch keeps hold the DeviceMesh, and the mesh its process group: unless cleanup()
    releases it, the gloo threads (NCCL's on a GPU) still run after train.py returns and its objects are collected,
    and go only while the interpreter tears its modules down, the likely setting of the abort CI once saw on rank 1
    ("terminate called without an active exception")."""
    proc = _run([WORKER, "threads", "--config", FAST, f"run_dir={tmp_path}", "train.steps=1", "grpo.kl_coef=0.01"],
                nproc=2)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert not [name for name in report["threads"] if "gloo" in name], report


@pytest.mark.parametrize("share_prompt", [False, True])
def test_two_rank_update_equals_one_rank_update_on_the_same_global_batch(tmp_path, share_prompt):
    """Same greedy rollouts and advantages over the global batch: the normaliser counted over ranks and FSDP's
    summed (not averaged) gradients make the update independent of the world size. With share_prompt on the two
    ranks (every FSDP2 unit runs twice before its backward; micro-batches of 3 split groups), against one rank
    without it: the same update."""
    common = ["--config", FAST, "train.steps=1", "train.export=true", "grpo.micro_batch_size=3", "optim.lr=1e-2"]
    _run([WORKER, "fixed", *common, f"run_dir={tmp_path / 'one'}"], nproc=1)
    _run([WORKER, "fixed", *common, f"run_dir={tmp_path / 'two'}", f"grpo.share_prompt={str(share_prompt).lower()}"],
         nproc=2)
    (m1,), (m2,) = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6) and m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    w0, w1, w2 = build_tiny(0)[0].state_dict(), _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 1e-3, "the update must move the weights"
    # AdamW's first step is lr · g / (|g| + eps): float noise in g moves a weight by at most ~lr · noise / eps.
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


def test_non_finite_loss_on_one_rank_skips_the_step_everywhere_without_hanging(tmp_path):
    start = time.time()
    _run([WORKER, "fixed-nan", "--config", FAST, "train.steps=1", "train.export=true", f"run_dir={tmp_path}"],
         nproc=2, timeout=240)
    (m,) = _metrics(tmp_path)
    assert m["skipped_step"] == 1.0 and not (m["grad_norm"] == m["grad_norm"])  # NaN everywhere, no step
    w0, w = build_tiny(0)[0].state_dict(), _weights(tmp_path / "final")
    assert max((w[k] - w0[k]).abs().max().item() for k in w) == 0
    assert time.time() - start < 240


@pytest.mark.parametrize("share_prompt", [False, True])
def test_text_only_and_image_items_on_different_ranks_stay_in_lockstep(tmp_path, share_prompt):
    """A rank whose micro-batch has no image still runs the vision unit (x0): without it gloo reports a collective
    mismatch and NCCL hangs. Two text-only and two image items, one prompt per micro-batch."""
    rows = []
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (56, 56), {"red": (220, 30, 30), "blue": (30, 60, 220)}[colour]).save(tmp_path / f"{i}.png")
        rows.append({"id": f"img{i}", "problem": "What colour is the shape?", "images": [f"{i}.png"], "answer": colour})
        rows.append({"id": f"txt{i}", "problem": f"What is {i} plus 1?", "answer": str(i + 1)})
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--config", FAST, f"run_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'mix.jsonl'}",
            "grpo.micro_batch_size=4", "train.steps=4", "rollout.max_new_tokens=3",
            f"grpo.share_prompt={str(share_prompt).lower()}"]
    _run([WORKER, "plain", *args], nproc=2, timeout=240)
    assert len(_metrics(tmp_path / "run")) == 4


def test_bf16_compute_keeps_fp32_master_weights_and_optimizer_state_on_two_ranks(tmp_path):
    _run([WORKER, "fixed", "--config", FAST, f"run_dir={tmp_path}", "train.steps=1", "train.save_every=1",
          "model.compute_dtype=bfloat16"], nproc=2)
    meta = FileSystemReader(str(tmp_path / "checkpoints" / "step_00000001" / "dcp")).read_metadata()
    dtypes = {key: m.properties.dtype for key, m in meta.state_dict_metadata.items() if hasattr(m, "properties")}
    params = [k for k in dtypes if k.startswith("model.")]
    adam = [k for k in dtypes if k.startswith("optimizer.state.") and k.rsplit(".", 1)[-1] in ("exp_avg", "exp_avg_sq")]
    assert params and adam and all(dtypes[k] == torch.float32 for k in params + adam)


def _train_args(run_dir, steps):
    return [WORKER, "plain", "--config", FAST, f"run_dir={run_dir}", f"train.steps={steps}", "train.save_every=2",
            "data.n_train=64"]


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    steps = 8
    full = tmp_path / "full"
    _run(_train_args(full, steps), nproc=2)
    reference = {m["step"]: m for m in _metrics(full)}

    killed = tmp_path / "killed"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(launcher + [str(a) for a in _train_args(killed, steps)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: launcher and both ranks, mid-run
    proc.wait()
    saved = json.loads(latest.read_text())["step"]
    assert saved < steps, "the run finished before it could be killed; the test proved nothing"

    _run(_train_args(killed, steps) + ["--resume"], nproc=2)
    resumed = _metrics(killed)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))  # no step twice, none missing
    for m in resumed[saved:]:
        for key in ("reward/total", "accuracy", "loss", "grad_norm", "response_length", "entropy"):
            assert m[key] == pytest.approx(reference[m["step"]][key], rel=1e-5, abs=1e-7), (m["step"], key)
