"""Process groups, collectives on the training device, FSDP2 with mixed precision, checkpoints and HF export.

    world = init_distributed()                      # World(rank, size, local_rank, device)
    model = apply_fsdp(model, world, compute_dtype=torch.bfloat16)
    tokens, rows = world.sum([n_tokens, n_rows])    # every collective of the loop goes through World
    with gathered_params(model): ...                # full parameters for a whole rollout phase

* `init_distributed()` / `cleanup()`: N ranks under torchrun, else a world of 1 (in-memory store); gloo or NCCL.
* `World.sum / max / all_true`, the loop's only collectives, take and return Python numbers and build their tensor on
  `world.device`: NCCL serves CUDA tensors only, so a tensor made without `device=` kills a GPU run at its first one.
* `apply_fsdp`: FSDP2 units are the vision tower, each decoder layer, and the root (embeddings, final norm, lm_head).
  The parameters keep their dtype (a policy's: float32 masters, so float32 gradients and AdamW state; with bf16 an
  AdamW step at lr 1e-6, below half a bf16 ulp, would be lost for most weights); `MixedPrecisionPolicy` casts them
  to `compute_dtype` and reduces gradients in float32. Gradients are **summed** over ranks (divide factor 1): the
  loss is already the global sum over the global normaliser (`grpo.loss_normalizer`), so averaging would divide twice.
* `gathered_params(model)`: every shard gathered once for a whole rollout phase (one full compute-dtype copy per
  rank); forwards inside run without collectives, so ranks may decode different numbers of steps. `unsharded`
  keeps them through backwards too (the update with `grpo.share_prompt`).
* `load_model_sharded(path, world, ...)`: rank 0 alone reads (or builds) the weights; the other ranks build the
  model on the meta device and receive their shards. 8 ranks never hold 8 host copies of a 7B model.
* `clip_grad_norm(params, max_norm)`: clip by the global norm (over shards and ranks), returned as a float.
* `save_checkpoint` / `load_latest_checkpoint`: model and optimizer through torch.distributed.checkpoint, plus each
  rank's scheduler, step, RNG and data position. Written to `step_N.tmp/`, renamed to `step_N/` once every rank is
  done, then `latest` is replaced atomically: a kill mid-save leaves the previous checkpoint as the latest.
* `full_state_dict(model)`: CPU tensors on rank 0; `export_hf(model, processor, out_dir, world, dtype)`: a
  `from_pretrained`-loadable folder from it.

Left out: tensor/pipeline parallelism, HSDP, CPU offload of parameters.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import Qwen2_5_VLForConditionalGeneration

from harmo_min.model import load_model


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise over ranks, in float64."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff `flag` is true on every rank: the decisions no rank may take alone."""
        return self.sum([0.0 if flag else 1.0])[0] == 0


def init_distributed(device: str = "auto") -> World:
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=torch.device("cuda", local_rank) if use_cuda else None)
        else:  # a plain `python train.py`: a world of one, no ports opened
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(rank, size, local_rank, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


# The one DeviceMesh per (device type, world size) that apply_fsdp shards over; cleanup() releases its group.
_MESHES: dict[tuple[str, int], DeviceMesh] = {}


def cleanup() -> None:
    """Destroy the process groups and end their threads now, not during interpreter exit."""
    if dist.is_initialized():
        # destroy_process_group drops torch's own references to the groups, but a DeviceMesh holds its group, and
        # the mesh outlives the model (DTensor sharding specs that torch keeps refer to it): the group's gloo or
        # NCCL threads would run on until the interpreter tears its modules down at exit, the likely setting of a
        # rank's abort CI once saw there ("terminate called without an active exception"). Emptying the meshes'
        # references lets the groups go with the model.
        for mesh in _MESHES.values():
            mesh._pg_registry.clear()
        _MESHES.clear()
        dist.destroy_process_group()


def apply_fsdp(model, world: World, *, compute_dtype: torch.dtype | None = None):
    """Shard a Qwen2.5-VL model (or a reward model built on one); `compute_dtype` None means the parameters' dtype."""
    cast = compute_dtype is not None and compute_dtype != next(model.parameters()).dtype
    if world.size == 1 and not cast:
        return model  # nothing to shard or cast: plain modules are faster
    key = (world.device.type, world.size)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(world.device.type, (world.size,))
    mesh = _MESHES[key]
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype if cast else None, reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=True)  # gathered_params lifts it for a rollout
    for unit in [model.model.visual, *model.model.language_model.layers, model]:  # the root last
        fully_shard(unit, **kw)
        unit.set_gradient_divide_factor(1.0)  # sum, do not average: see the module docstring
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM; NCCL prefers SUM)
    if not any(p.is_meta for p in model.parameters()):  # a meta-built model does this once it is materialised
        _init_root(model)
    return model


def _init_root(model) -> None:
    # The training forward runs the vision unit on its own before the root forward (grpo.token_logprobs): the root
    # must already know it is the root, or the first unit to run would make itself one.
    model._get_fsdp_state()._lazy_init()


@contextlib.contextmanager
def unsharded(model, *, enabled: bool = True):
    """Every FSDP2 unit's full parameters gathered once and kept, through forwards and backwards, until the end.
    grpo's share_prompt runs each unit twice before one backward: FSDP2 would free the parameters after either
    call's backward while the other's still needs them. Gradients are still reduce-scattered per backward call."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else []
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)


@contextlib.contextmanager
def gathered_params(model):
    with unsharded(model), forward_only(model):
        yield model


@contextlib.contextmanager
def forward_only(model):
    """No autograd, and FSDP2's per-iteration state reset on exit. FSDP2 prefetches in backward in the reverse order
    of the last forwards, and only a backward clears that record: left by forwards without one (rollout, reference,
    old log-probs), ranks whose forwards differed (a text-only prompt runs no vision tower in its prefill, decode
    lengths differ) would prefetch different units in backward: a hang."""
    try:
        with torch.no_grad():
            yield model
    finally:
        if isinstance(model, FSDPModule):
            model.reset_iter_state()


def clip_grad_norm(params, max_norm: float | None) -> float:
    """The norm before clipping (`max_norm` None: measure only)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)  # a DTensor under FSDP2: full_tensor reduces it
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Full CPU tensors on rank 0 (an empty dict elsewhere): a collective, every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_sharded(path: str, world: World, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                       compute_dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"):
    """(model, processor) on `world.device`. `dtype` is the parameters' own (float32 master weights for a policy,
    bf16 for a frozen reference); `compute_dtype` goes to `apply_fsdp`; `path` "tiny" is `build_tiny(seed)`."""
    if world.size == 1:
        model, processor = load_model(path, seed=seed, dtype=dtype, attn_implementation=attn_implementation)
        return apply_fsdp(model.to(world.device), world, compute_dtype=compute_dtype), processor
    full_sd, meta = {}, [None]
    # Every rank needs the processor, which is small; only rank 0 needs the weights.
    source, processor = load_model(path, seed=seed, dtype=dtype, attn_implementation=attn_implementation,
                                   weights=world.is_main)
    if world.is_main:
        full_sd = source.state_dict()
        # Non-persistent buffers (rotary inv_freq) are not in the state dict; meta-built ranks need rank 0's.
        buffers = {k: b for k, b in source.named_buffers() if k not in full_sd}
        meta = [(source.config, source.generation_config, buffers)]
    dist.broadcast_object_list(meta, src=0)
    config, generation_config, buffers = meta[0]
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype,
                                                                 attn_implementation=attn_implementation)
    model.generation_config = generation_config
    apply_fsdp(model, world, compute_dtype=compute_dtype)
    model.to_empty(device=world.device)
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = value.to(world.device)
    _init_root(model)
    return model.eval(), processor  # from_pretrained returns eval mode; a meta-built model must match it


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model, optimizer, scheduler=None,
                    state: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, keeping the `keep` newest; every rank must call it. Returns its folder."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final, tmp = ckpt_root / f"step_{step:08d}", ckpt_root / f"step_{step:08d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    per_rank = {"step": step, "rng": rng, "scheduler": scheduler.state_dict() if scheduler else None, **(state or {})}
    torch.save(per_rank, tmp / f"rank{rank:05d}.pt")
    dist.barrier()  # every rank's files are on disk before the checkpoint becomes visible
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_root / "latest.tmp"
        pointer.write_text(json.dumps({"step": step, "path": final.name}))
        os.replace(pointer, ckpt_root / "latest")
        done = sorted(p for p in ckpt_root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_latest_checkpoint(run_dir: str | os.PathLike, *, model, optimizer, scheduler=None) -> dict:
    """Restore model, optimizer, scheduler and RNG (`--resume`: none is an error, not a silent fresh start); return
    this rank's saved state."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint under {Path(run_dir)}/checkpoints")
    folder = pointer.parent / json.loads(pointer.read_text())["path"]
    rank_file = folder / f"rank{dist.get_rank():05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} missing: was {folder} written with a different number of ranks?")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(loaded, checkpoint_id=str(folder / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    state = torch.load(rank_file, weights_only=False)  # our own file: RNG states are numpy/python objects
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def export_hf(model, processor, out_dir: str | os.PathLike, world: World, dtype: torch.dtype) -> Path | None:
    """Save a `from_pretrained`-loadable folder in `dtype` from the (possibly sharded) model; a collective."""
    full = {k: v.to(dtype) for k, v in full_state_dict(model).items()}
    if model.config.get_text_config().tie_word_embeddings:
        full.pop("lm_head.weight", None)  # tied to the embedding: from_pretrained ties it again, no second copy
    out = Path(out_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, state_dict=full)
        processor.save_pretrained(out)
        # save_pretrained writes the dtype of the live (float32 master) parameters; say what the file holds.
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "dtype": str(dtype).removeprefix("torch.")}, indent=2))
    dist.barrier()
    return out if world.is_main else None
