"""benchmarks/gpu_check.py's smoke mode: the GPU acceptance script's code paths (model folder, train.py under
torchrun, the metrics it reads, the memory plan, the sampler benchmark) run on the CPU with the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_rollout  # noqa: E402


def test_gpu_check_smoke_mode_reports_one_json_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(tmp_path),
               "--share-prompt"]  # the shared-prompt update through train.py; the plain one is tested elsewhere
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])  # the last line is the whole report
    t = report["train"]
    assert report["device"] == "cpu" and t["steps"] == 3 and t["skipped_steps"] == 0
    assert t["step_time_s"] > 0 and t["time/update"] > 0 and t["peak_memory_gb"] > 0 and t["plan_peak_gb"] > 0
    assert t["tokens_per_step"] > 2 * 2 * t["response_length"]  # prompt tokens counted too
    assert "mfu_update" not in t  # a CPU's peak FLOP rate is unknown: no made-up MFU
    if hasattr(bench_rollout, "measure_decode"):
        assert report["sampler"]["ours_tok_s"] > 0 and report["sampler"]["generate_tok_s"] > 0
    else:
        assert "has no measure_decode yet" in report["sampler"]["missing"]
    assert (tmp_path / "policy" / "config.json").is_file()
