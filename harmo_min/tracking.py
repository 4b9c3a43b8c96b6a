"""A training run's folder and records, shared by every stage (train.py, train_reward_model.py, warmup.py).

    earlier = check_run_dir(run_dir, resume=False, overwrite=False)   # before any model loads
    log = RunLog(run_dir, world, cfg, resume_step=None, overwrite=earlier)
    with timed(seconds, "rollout", world.device): ...
    log.write({"step": 1, "loss": ...})       # rank 0 writes; log.history holds this run's metrics on every rank

Also `prepare_paths` (builds a cached input on the first run), `write_samples` and `peak_memory_gb`.
"""

import contextlib
import importlib
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

# The only files check_run_dir and --overwrite look at or delete: anything else in run_dir stays.
RUN_FILES = ("checkpoints", "metrics.jsonl", "samples", "final", "reward_model", "config.yaml", "tensorboard",
             "curves.png")


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> list[str]:
    """The earlier run's files, for `RunLog` to delete when overwriting. A fresh run refuses a folder that holds
    some: it would mix their metrics and prune or shadow their checkpoints."""
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


def _optional(module: str, key: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"train.{key}: true needs `pip install {key}`") from err


class RunLog:
    """config.yaml + metrics.jsonl (one JSON object per step) + TensorBoard / W&B when `train:` asks for them (one
    that is not installed is an error, not a silent no-op)."""

    def __init__(self, run_dir: str | Path, world, cfg: dict, *, resume_step: int | None = None,
                 overwrite: list[str] = ()):
        self.run_dir, self.active, self.history, self.writers = Path(run_dir), world.is_main, [], []
        self.metrics = self.run_dir / "metrics.jsonl"
        if not self.active:
            return
        for name in overwrite:
            shutil.rmtree(self.run_dir / name) if (self.run_dir / name).is_dir() else (self.run_dir / name).unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        # A resumed run drops the lines after its checkpoint, so no step appears twice.
        kept = self.metrics.read_text().splitlines() if resume_step is not None and self.metrics.exists() else []
        kept = [line for line in kept if line.strip() and json.loads(line)["step"] <= resume_step]
        self.metrics.write_text("".join(line + "\n" for line in kept))
        train = cfg.get("train", {})
        if train.get("tensorboard"):
            tb = _optional("torch.utils.tensorboard", "tensorboard").SummaryWriter(self.run_dir / "tensorboard")
            self.writers.append(lambda m: [tb.add_scalar(k, v, m["step"]) for k, v in m.items()
                                           if isinstance(v, (int, float))])
        if train.get("wandb"):
            run = _optional("wandb", "wandb").init(project="harmo_min", dir=str(self.run_dir), config=cfg)
            self.writers.append(lambda m: run.log(m, step=m["step"]))

    def write(self, metrics: dict) -> None:
        self.history.append(metrics)
        if self.active:
            with self.metrics.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            for writer in self.writers:
                writer(metrics)


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str, device: torch.device):
    """Add the phase's wall time to seconds[name]; on a GPU, wait for the device so kernels count where they ran."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    yield
    sync()
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_samples(path: Path, examples: list, texts: list[str], groups: list) -> None:
    """Append one JSON line per response: example, response, total reward, route and every aspect.
    `groups[p]` (a rewards.GroupRewards) holds prompt p's responses, `texts[p * G : (p + 1) * G]`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for p, (ex, grp) in enumerate(zip(examples, groups)):
            for j, total in enumerate(grp.total):
                f.write(json.dumps({"id": ex.id, "prompt": ex.problem or ex.messages, "gold": ex.answer,
                                    "response": texts[p * len(grp.total) + j], "total": total, "route": grp.route[j],
                                    **{k: v[j] for k, v in grp.breakdown.items()}}) + "\n")
