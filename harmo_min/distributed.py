"""Process groups, FSDP2 sharding, the rollout-phase parameter gather, checkpoints and HF export.

* `init_distributed()` / `cleanup()`: one process without torchrun (a world of 1 on an in-memory store), N with
  it; gloo on CPU, NCCL on GPU. Every collective in the project goes through this process group.
* `apply_fsdp(model, dist)`: FSDP2 (`fully_shard`) on the vision tower as one unit, on each decoder layer, then on
  the root (embeddings, final norm, lm_head). bf16 parameters with fp32 gradient reduction when asked. A world of 1
  is left unwrapped: there is nothing to shard and plain modules are faster on a laptop.
* `gathered_params(model)`: all-gather every shard once for a whole rollout phase and keep the full parameters
  until the phase ends; forwards inside then run without collectives, so ranks may decode different numbers of
  steps (the sampler's contract). Memory cost: one full copy of the parameters per rank for the phase.
* `load_sharded_policy(path, dist)`: real weights are read from disk by rank 0 only; other ranks build the model on
  the meta device, and the shards are scattered from rank 0 (`broadcast_from_rank0`). 8 ranks never hold 8 full
  host copies of a 7B model.
* Checkpoints (`save_checkpoint` / `load_latest_checkpoint`): model and optimizer through torch.distributed.checkpoint
  (each rank writes its shards), plus each rank's scheduler, step, RNG and data position. A checkpoint is written to
  `step_N.tmp/` and renamed to `step_N/` only when every rank has finished, then `latest` is replaced atomically:
  a kill mid-save leaves the previous checkpoint as the latest.
* `export_hf(model, processor, out_dir, dist)`: a `from_pretrained`-loadable folder (safetensors, config,
  generation config, processor) from the gathered full state dict.

Left out: tensor/pipeline parallelism, HSDP, CPU offload of parameters.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join (or create, without torchrun) the default process group; pick this rank's device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not tdist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:
            tdist.init_process_group(backend, device_id=torch.device("cuda", local_rank) if use_cuda else None)
        else:  # a plain `python train.py`: a world of one, no ports opened
            tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)
    return Dist(rank, world, local_rank, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def cleanup() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce(x: torch.Tensor, op=tdist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce that is a no-op in a world of one (no group traffic for the common laptop case)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(x, op=op)
    return x


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank iff `flag` is true on every rank: the collective decision that keeps ranks in step."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce(t, tdist.ReduceOp.MIN).item() > 0)


def apply_fsdp(model, dist: Dist, *, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True):
    """Shard a Qwen2.5-VL model with FSDP2: vision tower, each decoder layer, root. Identity in a world of one."""
    if dist.world_size == 1:
        return model
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    # Gradients are reduced in fp32 even with bf16 compute: summing 8 ranks' bf16 gradients loses low bits.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model.model.visual, **kw)
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _fsdp_modules(model) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_params(model):
    """Keep full parameters gathered for the duration (the rollout phase); reshard on exit."""
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Full CPU tensors on rank 0 (an empty dict elsewhere): a collective, every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_sharded_policy(path: str, dist: Dist, *, dtype: torch.dtype, attn_implementation: str = "sdpa",
                        param_dtype: torch.dtype | None = None):
    """Load a checkpoint read from disk by rank 0 only, shard it, and scatter rank 0's weights into the shards."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from harmo_min.model import ImageProcessor, load_policy

    if dist.world_size == 1:
        model, processor = load_policy(path, dtype=dtype, device=dist.device, attn_implementation=attn_implementation)
        return model, processor
    full_sd, buffers = {}, [None]
    if dist.is_main:
        source, processor = load_policy(path, dtype=dtype, attn_implementation=attn_implementation)
        full_sd = source.state_dict()
        # Non-persistent buffers (rotary inv_freq) are not in the state dict; meta-built ranks need rank 0's.
        persistent = set(full_sd)
        buffers = [{k: b for k, b in source.named_buffers() if k not in persistent}]
        config, generation_config = source.config, source.generation_config
    else:
        processor = ImageProcessor.from_pretrained(path, local_files_only=True)
    meta = [(config, generation_config) if dist.is_main else None]
    tdist.broadcast_object_list(meta, src=0)
    tdist.broadcast_object_list(buffers, src=0)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(meta[0][0], dtype=dtype,
                                                                 attn_implementation=attn_implementation)
    model.generation_config = meta[0][1]
    apply_fsdp(model, dist, param_dtype=param_dtype)
    model.to_empty(device=dist.device)
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, value in buffers[0].items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = value.to(dist.device)
    return model, processor


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model, optimizer, scheduler=None,
                    state: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically; every rank must call it. Returns the final folder."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final, tmp = ckpt_root / f"step_{step:08d}", ckpt_root / f"step_{step:08d}.tmp"
    rank = tdist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tdist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    per_rank = {"step": step, "rng": rng_state(), "scheduler": scheduler.state_dict() if scheduler else None,
                **(state or {})}
    torch.save(per_rank, tmp / f"rank{rank:05d}.pt")
    tdist.barrier()  # every rank's files are on disk before the checkpoint becomes visible
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_root / "latest.tmp"
        pointer.write_text(json.dumps({"step": step, "path": final.name}))
        os.replace(pointer, ckpt_root / "latest")
        done = sorted(p for p in ckpt_root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    tdist.barrier()
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    return pointer.parent / json.loads(pointer.read_text())["path"]


def load_latest_checkpoint(run_dir: str | os.PathLike, *, model, optimizer, scheduler=None) -> dict | None:
    """Restore model, optimizer, scheduler and RNG from the latest checkpoint; return this rank's saved state."""
    folder = latest_checkpoint(run_dir)
    if folder is None:
        return None
    rank_file = folder / f"rank{tdist.get_rank():05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} missing: was {folder} written with a different number of ranks?")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(loaded, checkpoint_id=str(folder / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    state = torch.load(rank_file, weights_only=False)  # our own file: RNG states are numpy/python objects
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def export_hf(model, processor, out_dir: str | os.PathLike, dist: Dist) -> Path | None:
    """Save a `from_pretrained`-loadable folder from the (possibly sharded) model; a collective."""
    full = full_state_dict(model)
    out = Path(out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=full)
        processor.save_pretrained(out)
    tdist.barrier()
    return out if dist.is_main else None
