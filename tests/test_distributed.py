"""Multi-process behaviour with `torchrun --nproc_per_node 2` on CPU (gloo): the real launcher, real FSDP2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "grpo_worker.py"


def _env():
    # One thread per rank: two ranks on a 2-core CI machine, and bitwise-stable reductions.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _run(args, nproc, timeout=300):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_rank_update_equals_one_rank_update_on_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _run([WORKER, "update", one], nproc=1)
    _run([WORKER, "update", two], nproc=2)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["max_change"] > 1e-4, "the update must actually move the weights"
    assert abs(m1["loss"] - m2["loss"]) < 1e-5 and abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-4
    w1, w2 = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    assert set(w1) == set(w2)
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-5, worst


def test_non_finite_loss_on_one_rank_skips_the_step_everywhere_without_hanging(tmp_path):
    start = time.time()
    _run([WORKER, "nan", tmp_path], nproc=2, timeout=240)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_step"] == 1.0 and metrics["max_change"] == 0.0
    assert time.time() - start < 240


def test_exported_folder_loads_and_generates_the_trained_models_tokens(tmp_path):
    _run([WORKER, "export", tmp_path], nproc=2)
    tokens = json.loads((tmp_path / "export.json").read_text())
    assert tokens["ours"] == tokens["hf"]
    assert json.loads((tmp_path / "metrics.json").read_text())["max_change"] > 1e-4


def _train_args(run_dir, steps):
    return [ROOT / "train.py", "--config", ROOT / "configs" / "tiny.yaml", f"run_dir={run_dir}", f"train.steps={steps}",
            "train.save_every=2", "train.export=false", "train.sample_every=0", "grpo.prompts_per_step=4",
            "rollout.n=4", "data.n_train=64"]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


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
    resumed = {m["step"]: m for m in _metrics(killed)}
    for step in range(saved + 1, steps + 1):
        for key in ("reward/total", "accuracy", "loss", "grad_norm", "response_length", "entropy"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)
