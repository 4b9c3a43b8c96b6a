"""A training run's folder and records, shared by every stage (train.py, train_reward_model.py, warmup.py).

    earlier = check_run_dir(run_dir, resume=False, overwrite=False)   # before any model loads
    log = RunLog(run_dir, world, cfg, resume_step=None, overwrite=earlier)
    with timed(seconds, "rollout", world.device): ...
    log.write({"step": 1, "loss": ...})

* `check_run_dir`: a fresh run refuses a `run_dir` that already holds an earlier run's files (it would mix their
  metrics and prune or shadow their checkpoints), unless `--resume` continues it or `--overwrite` deletes them.
  Only the files a run writes (`RUN_FILES`) are looked at or deleted; anything else in the folder stays.
* `RunLog`: rank 0 writes `config.yaml` and `metrics.jsonl` (one JSON object per step; a resumed run first drops
  the lines after its checkpoint, so no step appears twice), plus TensorBoard / W&B when the config asks (asking
  for one that is not installed is an error, not a silent no-op). Other ranks' calls do nothing.
* `prepare_paths`: runs a section's `prepare` command when its `path` does not exist yet (a cached warm-up policy
  or reward model that `python train.py` builds itself on its first run).
* `timed`, `peak_memory_gb`: per-phase wall time (waiting for the GPU at both ends) and the peak memory.
* `write_samples`: a step's prompts, responses and every reward aspect, one JSON line per response.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

RUN_FILES = ("checkpoints", "metrics.jsonl", "samples", "final", "reward_model", "config.yaml", "tensorboard",
             "curves.png")


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> list[str]:
    """The earlier run's files in `run_dir`; raises unless the caller resumes or overwrites them."""
    earlier = [name for name in RUN_FILES if (Path(run_dir) / name).exists()]
    if earlier and not (resume or overwrite):
        raise FileExistsError(f"run_dir {run_dir} already holds {earlier} from an earlier run: continue it with "
                              "--resume, or start over with --overwrite (which deletes those)")
    return earlier if overwrite and not resume else []


def prepare_paths(cfg: dict, sections: tuple[str, ...], world_size: int) -> None:
    """Run `<section>.prepare` (a `python` command line) for each section whose `path` does not exist yet."""
    for section in sections:
        path, command = cfg[section]["path"], cfg[section]["prepare"]
        if command and path and not Path(path).exists():
            if world_size > 1:
                raise FileNotFoundError(f"{section}.path {path} does not exist: run `python {command}` first")
            print(f"{section}.path {path} does not exist yet: running `python {command}`", flush=True)
            subprocess.run([sys.executable, *shlex.split(command)], check=True)
            if not Path(path).exists():
                raise FileNotFoundError(f"{section}.prepare `{command}` finished but did not create {path}")


class RunLog:
    """config.yaml + metrics.jsonl (+ TensorBoard / W&B) of one run, written by rank 0."""

    def __init__(self, run_dir: str | Path, world, cfg: dict, *, resume_step: int | None = None,
                 overwrite: list[str] = ()):
        self.run_dir, self.active = Path(run_dir), world.is_main
        self.history: list[dict] = []  # this run's metrics, on every rank
        self.metrics, self.writers = self.run_dir / "metrics.jsonl", []
        if not self.active:
            return
        for name in overwrite:
            shutil.rmtree(self.run_dir / name) if (self.run_dir / name).is_dir() else (self.run_dir / name).unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        kept = []
        if resume_step is not None and self.metrics.exists():
            kept = [line for line in self.metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.metrics.write_text("".join(line + "\n" for line in kept))
        train = cfg.get("train", {})
        if train.get("tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("train.tensorboard: true needs `pip install tensorboard`") from err
            tb = SummaryWriter(self.run_dir / "tensorboard")
            self.writers.append(lambda m: [tb.add_scalar(k, v, m["step"]) for k, v in m.items()
                                           if isinstance(v, (int, float))])
        if train.get("wandb"):
            try:
                import wandb
            except ImportError as err:
                raise ImportError("train.wandb: true needs `pip install wandb`") from err
            run = wandb.init(project="harmo_min", dir=str(self.run_dir), config=cfg)
            self.writers.append(lambda m: run.log(m, step=m["step"]))

    def write(self, metrics: dict) -> None:
        self.history.append(metrics)
        if not self.active:
            return
        with self.metrics.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        for writer in self.writers:
            writer(metrics)


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str, device: torch.device):
    """Add the phase's wall time to seconds[name]; on a GPU, wait for the device so kernels count where they ran."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_samples(path: Path, examples: list, texts: list[str], groups: list) -> None:
    """Append one JSON line per response: the example, the response, its total reward, route and every aspect.
    `groups[p]` (a rewards.GroupRewards) holds prompt p's responses, `texts[p * G : (p + 1) * G]`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for p, (ex, grp) in enumerate(zip(examples, groups)):
            for j, total in enumerate(grp.total):
                f.write(json.dumps({"id": ex.id, "prompt": ex.problem or ex.messages, "gold": ex.answer,
                                    "response": texts[p * len(grp.total) + j], "total": total, "route": grp.route[j],
                                    **{k: v[j] for k, v in grp.breakdown.items()}}) + "\n")
