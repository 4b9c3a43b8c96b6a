"""Run train.main as one plain process or under `torchrun --nproc_per_node 2`, with a GPU rule reproduced on CPU.

    python tests/dist/train_worker.py MODE [train.py arguments ...]

MODE
  plain        train.main as is.
  device-rule  The training device becomes torch.device("cpu", 0): a name distinct from a bare "cpu", as "cuda:0" is
               on a GPU node. Every collective called from this repository's code must be handed a tensor that was
               created on (or moved to) exactly that device; a tensor made without `device=` (or with a literal
               "cpu") is what NCCL rejects on a GPU node ("No backend type associated with device type cpu"), and
               here it raises.
  fixed        Greedy rollouts (the same rows whatever the rank split) and fixed advantages linspace(-1, 1) over the
               global batch, so 1 rank and 2 ranks see exactly the same update.
  fixed-nan    As fixed, with a NaN advantage on rank 1 only.
  threads      train.main as is, then, once its objects are collected, one JSON line: the names of this process's
               native threads (Linux /proc), to show which of them outlive train.py's cleanup().
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ROOT = str(Path(__file__).resolve().parents[2])
sys.path.insert(0, ROOT)

import train  # noqa: E402
from harmo_min.rollout import sample  # noqa: E402

TRAINING_DEVICE = torch.device("cpu", 0)
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange}


class DeviceRule(TorchFunctionMode):
    """Records, on each tensor a factory makes or `.to()` moves, the device argument it was given."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            if func in FACTORIES:
                out._made_on = kwargs.get("device")
            elif func is torch.Tensor.to:
                device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None))
                if device is not None:
                    out._made_on = torch.device(device)
        return out


def guard(collective):
    def checked(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(ROOT) and "site-packages" not in caller:
            for t in [a for a in args if isinstance(a, torch.Tensor)]:
                made = getattr(t, "_made_on", "an operation")
                if made != TRAINING_DEVICE:
                    raise RuntimeError(f"{caller}: {collective.__name__} on a tensor made on {made!r}, not on the "
                                       f"training device {TRAINING_DEVICE} (on a GPU node NCCL refuses it: "
                                       "No backend type associated with device type cpu)")
        return collective(*args, **kwargs)
    return checked


def fixed_rollouts(nan: bool):
    rank = int(os.environ.get("RANK", 0))
    offset = {"rows": 0}

    def greedy(model, prompts, **kwargs):
        out = sample(model, prompts, **{**kwargs, "temperature": 0.0})
        offset["rows"] = out.response_ids.shape[0]
        return out

    def advantages(total, n, scale_std=False):
        rows, world = offset["rows"], int(os.environ.get("WORLD_SIZE", 1))
        adv = torch.linspace(-1.0, 1.0, rows * world)[rank * rows:(rank + 1) * rows].clone()
        if nan and rank == 1:
            adv[0] = float("nan")
        return adv.to(total.device)

    train.sample, train.group_advantages = greedy, advantages


def main(mode: str, args: list[str]) -> None:
    if mode == "device-rule":
        real_init = train.init_distributed

        def init_on_named_device():
            world = real_init()
            return type(world)(world.rank, world.size, world.local_rank, TRAINING_DEVICE)
        train.init_distributed = init_on_named_device
        for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
            setattr(dist, name, guard(getattr(dist, name)))
        with DeviceRule():
            train.main(args)
        return
    if mode in ("fixed", "fixed-nan"):
        fixed_rollouts(nan=mode == "fixed-nan")
    train.main(args)
    if mode == "threads":
        gc.collect()  # what the interpreter's exit collects before it tears its modules down
        names = [(task / "comm").read_text().strip() for task in sorted(Path("/proc/self/task").iterdir())]
        print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "threads": names}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
