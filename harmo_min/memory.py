r"""The memory plan: what one GPU holds at the peak of a GRPO step, worked out before anything is allocated.

    python train.py --config configs/qwen2_5_vl_3b.yaml --plan --nproc 8      # [--gpu-gb 80 --prompt-tokens 1024]

The models are built on the meta device from config.json alone (no weights are read); a path that does not exist is
planned from the public architecture its folder name names (`PUBLIC`), and the table says so.

Per rank, with P policy parameters, W ranks, c bytes per compute-dtype element (bf16: 2), B = prompts_per_step/W · n
rollout rows, b = micro_batch_size rows, S = prompt + max_new_tokens positions, R = max_new_tokens, V the vocabulary:

    master weights    4P/W                fp32, sharded by FSDP2
    AdamW state       8P/W                exp_avg and exp_avg_sq, fp32
    reference         cP/W                kl_coef > 0 only: frozen, sharded
    reward model      cP_rm               replicated: every rank scores its own rows
    gradients         4P/W                update only (zero_grad(set_to_none) frees them before the rollout)
    rollout weights   cP                  every unit gathered for the phase (distributed.gathered_params)
    KV cache          B·S·layers·2·kv_heads·head_dim·c
    sampler logits    5·B·V·4             the float32 (B, V) tensors rollout.sample_next holds at once
    FSDP units        c(root + 2u) + (c + 4)u     the root unit, gathered through the update; the largest unit u
                                          and the one prefetched; u's gradient in c and in fp32
    logits            2·b·R·V·c + 4·min(1024, bR)·V·4     the response logits grpo.TokenLogProb keeps and their
                                          gradient; its float32 chunks (x, exp, product, grad)
    activations       b·S·(layers·a + e) + p·(depth·a_v + e_v)           without checkpointing
                      b·S·(layers·ch + S + e) + p·(depth·ch_v + e_v) + max(b·S·a, p·a_v)      with: each layer's
                                          input and the bool mask are kept; one layer is recomputed at a time

where p is the micro-batch's image patches (one image per distinct prompt, 4 patches per image token) and the bytes
autograd saves (tests/test_memory.py measures them) are, per token of one decoder layer and per patch of one vision
block (h, i: width and MLP width):

    a   = 2(4h + 2ch + 4) + 4ch + 4·heads + 4ci + cS    two RMSNorms (fp32 input, normalised, scaled); roped q, k
                                                   and v repeated to every head (a padded batch), output, log-sum-
                                                   exp; SiLU-gated MLP (gate, silu, up, product); SDPA's copy of the
                                                   attention mask in the compute dtype
    a_v = 2(4h + 2ch + 4) + 7ch + 4·heads + 4ci    the same with the fused qkv output and the windows' concatenation
    e   = 8 + 2c·head_dim + 4h + ch + 4            + (ch + 16) per response token: ids, cos/sin, final norm;
                                                   lm_head's input, target, lse, mask
    e_v = c·in·t·patch² + 8·head_dim + 4h + 4ch + 6      pixels, rotary cos/sin, merger norm, GELU in and out

The peak is the larger phase: rollout (always + rollout weights + KV + sampler logits) or update (always + gradients
+ FSDP units + logits + activations). Also not counted (besides the table's last line): prefill temporaries and the
frozen models' forward temporaries, smaller than the update's. GB is 2^30 bytes, as torch.cuda reports (an "80 GB"
card has ~79.6).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from harmo_min.grpo import CHUNK
from harmo_min.model import build_tiny_tokenizer, resolve_dtype, tiny_config

GB = 2 ** 30
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
_3B = dict(text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                            num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_parameters=_ROPE),
           vision_config=dict(_VISION, out_hidden_size=2048), tie_word_embeddings=True)
_7B = dict(text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_parameters=_ROPE),
           vision_config=dict(_VISION, out_hidden_size=3584), tie_word_embeddings=False)
PUBLIC = {"Qwen2.5-VL-3B-Instruct": _3B, "Qwen2.5-VL-7B-Instruct": _7B, "Skywork-VL-Reward-7B": _7B}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory plan (--plan: print it and exit; nothing is loaded)")
    g.add_argument("--plan", action="store_true", help="print the per-GPU memory plan of the config and exit")
    g.add_argument("--nproc", type=int, help="ranks to plan for [WORLD_SIZE, else 1]")
    g.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU, GB [80]")
    g.add_argument("--prompt-tokens", type=int, default=1024, help="assumed prompt length, tokens [1024]")
    g.add_argument("--image-tokens", type=int, default=768, help="of which image tokens, one image [768]")


@dataclass(frozen=True)
class Arch:
    """The numbers the plan needs, from a Qwen2.5-VL config built on the meta device."""
    name: str
    params: int          # the whole ForConditionalGeneration (lm_head counted once when tied)
    vision: int          # the vision tower: one FSDP unit
    layer: int           # one decoder layer: one FSDP unit each
    root: int            # the rest: embeddings, final norm, lm_head
    backbone: int        # without the lm_head (a reward model's Qwen2_5_VLModel)
    cfg: Qwen2_5_VLConfig

    @classmethod
    def of(cls, path: str, key: str) -> "Arch":
        folder, name = Path(str(path)).expanduser(), Path(str(path)).name
        if str(path) == "tiny":
            config, name = tiny_config(build_tiny_tokenizer()), "tiny (harmo_min.model.build_tiny)"
        elif (folder / "config.json").is_file():
            config, name = Qwen2_5_VLConfig.from_pretrained(folder), str(folder)
        elif name in PUBLIC:
            config, name = Qwen2_5_VLConfig(**PUBLIC[name]), f"{name} (public architecture: {path} not found)"
        else:
            raise FileNotFoundError(f"{key}={path}: no config.json there, and not one of {sorted(PUBLIC)}")
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        total, vision, layer = count(model), count(model.model.visual), count(model.model.language_model.layers[0])
        return cls(name, total, vision, layer, total - vision - layer * config.text_config.num_hidden_layers,
                   count(model.model), config)


def _arch(cfg: dict, key: str) -> Arch:
    """The architecture at `key`.path; a folder that a `key`.prepare stage has not built yet says so."""
    try:
        return Arch.of(cfg[key]["path"], f"{key}.path")
    except FileNotFoundError as e:
        if not cfg[key].get("prepare"):
            raise
        raise FileNotFoundError(f"{key}.path={cfg[key]['path']} does not exist yet: {key}.prepare builds it "
                                f"(`python {cfg[key]['prepare']}`); run that, or train.py once, then plan") from e


def saved_bytes(arch: Arch, c: int, seq: int) -> dict[str, int]:
    """a, a_v, e, e_v of the module docstring (e_resp: e's per-response-token part) for `seq`-position sequences."""
    t, v = arch.cfg.text_config, arch.cfg.vision_config
    h, hv, d, dv = t.hidden_size, v.hidden_size, t.hidden_size // t.num_attention_heads, v.hidden_size // v.num_heads
    norm, norm_v = 4 * h + 2 * c * h + 4, 4 * hv + 2 * c * hv + 4
    return {"a": 2 * norm + 4 * c * h + 4 * t.num_attention_heads + 4 * c * t.intermediate_size + c * seq,
            "a_v": 2 * norm_v + 7 * c * hv + 4 * v.num_heads + 4 * c * v.intermediate_size,
            "e": 8 + 2 * c * d + 4 * h + c * h + 4, "e_resp": c * h + 16,
            "e_v": c * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 + 8 * dv + 4 * hv + 4 * c * hv + 6}


def activation_bytes(arch: Arch, c: int, *, rows: int, seq: int, resp: int, patches: int, checkpointing: bool) -> int:
    """What the training forward of one micro-batch keeps for backward (rows x seq tokens, `resp` of them scored)."""
    s, t, v = saved_bytes(arch, c, seq), arch.cfg.text_config, arch.cfg.vision_config
    tokens = rows * seq
    outside = tokens * s["e"] + rows * resp * s["e_resp"] + patches * s["e_v"]
    if not checkpointing:
        return outside + tokens * t.num_hidden_layers * s["a"] + patches * v.depth * s["a_v"]
    kept = tokens * t.num_hidden_layers * c * t.hidden_size + patches * v.depth * c * v.hidden_size + tokens * seq
    return outside + kept + max(tokens * s["a"], patches * s["a_v"])


def kv_cache_bytes(arch: Arch, c: int, *, rows: int, positions: int) -> int:
    t = arch.cfg.text_config
    head_dim = t.hidden_size // t.num_attention_heads
    return rows * positions * t.num_hidden_layers * 2 * t.num_key_value_heads * head_dim * c


def logits_bytes(arch: Arch, c: int, *, rows: int, resp: int) -> int:
    vocab = arch.cfg.text_config.vocab_size
    return 2 * rows * resp * vocab * c + 4 * min(CHUNK, rows * resp) * vocab * 4


@dataclass
class Plan:
    title: list[str]
    rows: list[tuple[str, int, str]]  # (what, bytes, when: always | rollout | update)
    gpu_gb: float = 80.0

    def phase(self, name: str) -> int:
        return sum(n for _, n, when in self.rows if when in ("always", name))

    @property
    def peak_gb(self) -> float:
        return max(self.phase("rollout"), self.phase("update")) / GB

    @property
    def margin_gb(self) -> float:
        return self.gpu_gb - self.peak_gb

    def table(self) -> str:
        lines = [*self.title, "", f"{'':44s} {'GB':>7s}   held"]
        lines += [f"{what:44s} {n / GB:7.2f}   {when}" for what, n, when in self.rows]
        r, u = self.phase("rollout") / GB, self.phase("update") / GB
        lines += ["", f"peak: rollout {r:.1f} GB, update {u:.1f} GB -> {self.peak_gb:.1f} of {self.gpu_gb:g} GB "
                      f"per GPU, margin {self.margin_gb:.1f} GB ({self.margin_gb / self.gpu_gb:.0%})",
                  "not counted: CUDA context + NCCL buffers (1-2 GB), allocator fragmentation: keep 10 % spare"]
        return "\n".join(lines)


def plan(cfg: dict, *, world_size: int, gpu_gb: float = 80.0, prompt_tokens: int = 1024, image_tokens: int = 768,
         config_name: str = "") -> Plan:
    """The per-rank plan of a GRPO config (train.py's GRPO_DEFAULTS layout) on `world_size` GPUs."""
    g, r, m = cfg["grpo"], cfg["rollout"], cfg["model"]
    if world_size < 1 or g["prompts_per_step"] % world_size:
        raise ValueError(f"grpo.prompts_per_step={g['prompts_per_step']} is not divisible by {world_size} rank(s)")
    if not 0 <= image_tokens <= prompt_tokens:
        raise ValueError(f"--image-tokens {image_tokens} must be between 0 and --prompt-tokens {prompt_tokens}")
    dtype = resolve_dtype(m["compute_dtype"], torch.device("cuda"))  # auto: bf16 on the GPU this plans for
    c, W, n, b, resp = dtype.itemsize, world_size, r["n"], g["micro_batch_size"], r["max_new_tokens"]
    arch = _arch(cfg, "model")
    prompts, seq, vocab = g["prompts_per_step"] // W, prompt_tokens + resp, arch.cfg.text_config.vocab_size
    images = min(prompts, math.ceil(b / n) + (0 if b % n == 0 or n % b == 0 else 1)) if image_tokens else 0
    act = dict(rows=min(b, prompts * n), seq=seq, resp=resp,
               patches=images * image_tokens * arch.cfg.vision_config.spatial_merge_size ** 2)
    unit, ckpt = max(arch.vision, arch.layer), m["activation_checkpointing"]
    title = [f"memory plan per GPU: {config_name or 'config'} on {W} rank(s) of {gpu_gb:g} GB",
             f"policy: {arch.name}",
             f"        {_count(arch.params)} parameters ({_count(arch.vision)} vision), compute {str(dtype)[6:]}",
             f"assumed: prompts of {prompt_tokens} tokens ({image_tokens} image tokens), responses of {resp} tokens",
             f"rollout: {prompts} prompts x {n} = {prompts * n} rows; update: micro-batches of {act['rows']} rows, "
             f"{images} image(s), activation checkpointing {'on' if ckpt else 'off'}"]
    rows = [(f"master weights (fp32, 1/{W})", 4 * arch.params // W, "always"),
            (f"AdamW state (fp32, 1/{W})", 8 * arch.params // W, "always")]
    if g["kl_coef"] > 0:
        rows.append((f"reference (kl_coef {g['kl_coef']:g}, 1/{W})", c * arch.params // W, "always"))
    if cfg["reward_model"]["path"]:
        rm = _arch(cfg, "reward_model")
        title[3:3] = [f"reward model: {rm.name}", f"        {_count(rm.backbone)} parameters, one copy per GPU"]
        rows.append(("reward model (full copy)", c * rm.backbone, "always"))
    planned, alternative = (activation_bytes(arch, c, **act, checkpointing=x) for x in (ckpt, not ckpt))
    # grpo.share_prompt holds every unit gathered through the update (distributed.unsharded), FSDP2 alone two units
    gathered, held = (("all weights gathered", arch.params) if g["share_prompt"]
                      else ("FSDP units gathered", arch.root + 2 * unit))
    rows += [("rollout weights (gathered, full)", c * arch.params, "rollout"),
             (f"KV cache ({prompts * n} rows x {seq} positions)",
              kv_cache_bytes(arch, c, rows=prompts * n, positions=seq), "rollout"),
             ("sampler logits (fp32)", 5 * prompts * n * vocab * 4, "rollout"),
             (f"gradients (fp32, 1/{W})", 4 * arch.params // W, "update"),
             (f"{gathered} + unit gradients", c * held + (c + 4) * unit, "update"),
             (f"logits ({act['rows']} x {resp} x {vocab})", logits_bytes(arch, c, rows=act["rows"], resp=resp),
              "update"),
             (f"activations, checkpointing {'on' if ckpt else 'off'} ({'off' if ckpt else 'on'}: "
              f"{alternative / GB:.1f})", planned, "update")]
    return Plan(title, rows, gpu_gb)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
