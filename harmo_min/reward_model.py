r"""The reward-model head: the model-based half of HARMO's hybrid accuracy reward, scalar or multi-aspect.

    rm = RewardModel.from_pretrained("runs/rm/reward_model")          # ours, or a Skywork-VL-Reward folder
    aspects, scalar = rm.score(examples, responses)                   # (N, K), (N,): raw, no sigmoid

**Forward.** The prompt the policy saw (`data.build_messages(example, answer_format)`) with the response as the
assistant turn, in the processor's chat template (Qwen: `…<|im_start|>assistant\n{response}<|im_end|>\n`), with
its images. With h_t the backbone's last hidden state (Qwen2.5-VL without its LM head), ℓ the last non-pad token
of prompt + response and p the `<|im_start|>` that opens the assistant turn:

    aspects  a = W h_ℓ + b                               (N, K)   K = 1 is the scalar reward model
    gate     g = w / Σ_k w_k                             fixed weights w from the config [uniform], or
             g = softmax(MLP(h_p) / τ)                   prompt-conditioned (ArmoRM): by causal attention h_p has
                                                         seen the whole prompt and none of the response
    scalar   s = Σ_k g_k · a_k                           (N,)

**Losses**, over P preference pairs (c = chosen, r = rejected) from `data.load_preference_jsonl` or
`synthetic.synthetic_pairs`; a pair labelled with an aspect also counts for the scalar (it was preferred because
of that aspect). The training loop is train_reward_model.py.

    L = mean_P  −log σ(s_c − s_r)                                   Bradley–Terry on the scalar, every pair
      + λ_aspect · mean_{P_k}  −log σ(a_c,k − a_r,k)                 pairs labelled with aspect k
      + λ_rating · mean (a_k − rating_k)²                             responses that carry aspect ratings

**Loading.** A folder `save_pretrained` wrote, or the **Skywork-VL-Reward layout**: a Qwen2.5-VL folder plus
`value_head.safetensors` holding `v_head.summary.weight` (1, H) and `v_head.summary.bias` (1,), read as a scalar
model (K = 1, aspect "score"). **Under FSDP2** (`distributed.apply_fsdp` shards `rm.model` like a policy's, the
head and gate go with the root) every rank must run the same sharded units the same number of times: `score` pads
every rank to the largest number of batches, and every forward runs the vision tower (`model.encoded_images`).
Left out: long-response truncation (the whole sequence is scored), video, reward ensembles, listwise losses.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import Qwen2_5_VLModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from harmo_min.data import Example, PreferencePair, build_messages, load_images
from harmo_min.distributed import forward_only, full_state_dict
from harmo_min.model import ImageProcessor, encoded_images, mrope_positions, resolve_dtype

CONFIG_FILE, HEAD_FILE = "head_config.json", "reward_head.safetensors"
SKYWORK_HEAD_FILE, SKYWORK_KEYS = "value_head.safetensors", ("v_head.summary.weight", "v_head.summary.bias")
TURN_START = "<|im_start|>"  # ChatML, as every Qwen2.5-VL chat template uses


@dataclass
class HeadConfig:
    """The head's architecture: the `head:` config section, and all that `head_config.json` of a saved model holds."""

    aspects: list[str] = field(default_factory=lambda: ["score"])
    gate: str = "fixed"
    gate_temperature: float = 1.0
    fixed_weights: list[float] | None = None  # None: uniform
    gate_hidden: int = 256

    def __post_init__(self) -> None:
        if not self.aspects or not all(isinstance(a, str) and re.fullmatch(r"\w+", a) for a in self.aspects):
            raise ValueError(f"head.aspects: need a non-empty list of names (letters, digits, _), got {self.aspects!r}")
        if len(set(self.aspects)) != len(self.aspects):
            raise ValueError(f"head.aspects: duplicate names in {self.aspects!r}")
        if self.gate not in ("fixed", "prompt"):
            raise ValueError(f"head.gate: must be one of ['fixed', 'prompt'], got {self.gate!r}")
        if not (isinstance(self.gate_temperature, (int, float)) and self.gate_temperature > 0):
            raise ValueError(f"head.gate_temperature: must be > 0, got {self.gate_temperature!r}")
        if not (isinstance(self.gate_hidden, int) and self.gate_hidden >= 1):
            raise ValueError(f"head.gate_hidden: must be an int >= 1, got {self.gate_hidden!r}")
        w = self.fixed_weights
        if w is not None and (not isinstance(w, list) or len(w) != len(self.aspects)
                              or not all(isinstance(x, (int, float)) and x >= 0 for x in w) or sum(w) <= 0):
            raise ValueError(f"head.fixed_weights: need {len(self.aspects)} non-negative numbers (one per aspect in "
                             f"{self.aspects}) with a positive sum, got {w!r}")
        if w is not None and self.gate != "fixed":
            raise ValueError(f"head.fixed_weights: only used with gate 'fixed', but gate is {self.gate!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "head") -> "HeadConfig":
        unknown, known = sorted(set(d) - set(cls.__dataclass_fields__)), sorted(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {known}")
        return cls(**d)


@dataclass
class RewardOutput:
    aspects: torch.Tensor  # (N, K) per-aspect scores
    gate: torch.Tensor     # (N, K) non-negative, rows sum to 1
    scalar: torch.Tensor   # (N,) Σ_k gate_k · aspects_k


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (N,) of the last real token of each row, for left padding, right padding, or none."""
    return attention_mask.shape[-1] - 1 - attention_mask.flip(-1).argmax(-1)  # argmax: the first 1 from the right


def encode_responses(processor, examples: Sequence[Example], responses: Sequence[str],
                     answer_format: str | None = "think_answer") -> dict[str, torch.Tensor]:
    """One padded batch of prompt + response sequences with their images, plus `prompt_end` (N,) for the gate.
    `answer_format=None`: the example's own turns unchanged (preference data not written to one of our formats)."""
    if len(examples) != len(responses):
        raise ValueError(f"encode_responses: {len(examples)} examples but {len(responses)} responses")
    turn_start, render = processor.tokenizer.convert_tokens_to_ids(TURN_START), processor.apply_chat_template
    texts, turns = [], []
    for example, response in zip(examples, responses):
        if not isinstance(response, str):
            raise TypeError(f"example {example.id!r}: response must be a str, got {type(response).__name__}")
        if answer_format is not None:
            prompt = build_messages(example, answer_format)
        elif example.messages is not None:
            prompt = [dict(m) for m in example.messages]
        else:
            prompt = [{"role": "user", "content": [{"type": "image"} for _ in example.images]
                       + [{"type": "text", "text": example.problem}]}]
        texts.append(render(prompt + [{"role": "assistant", "content": response}], tokenize=False))
        # Counted on the prompt alone, so a response that happens to contain the marker cannot move the gate.
        turns.append(render(prompt, add_generation_prompt=True, tokenize=False).count(TURN_START))
    images = [im for ex in examples for im in load_images(ex)]
    batch = dict(processor(text=texts, images=images or None, padding=True, return_tensors="pt"))
    is_start = batch["input_ids"] == turn_start                                  # (N, T)
    hit = is_start & (is_start.long().cumsum(-1) == torch.tensor(turns)[:, None])
    if not hit.any(-1).all():
        raise ValueError(f"the chat template does not open the assistant turn with {TURN_START}: the prompt gate "
                         "cannot find where the prompt ends (only ChatML templates, as Qwen's, are supported)")
    batch["prompt_end"] = hit.long().argmax(-1)                                  # (N,)
    return batch


class RewardModel(nn.Module):
    """Qwen2.5-VL backbone (`.model`, no LM head) + linear head with K outputs + gate; see the module docstring."""

    def __init__(self, backbone: Qwen2_5_VLModel, processor, config: HeadConfig):
        super().__init__()
        # Of a ForConditionalGeneration only its base: the LM head is not part of a reward model.
        self.model = backbone if isinstance(backbone, Qwen2_5_VLModel) else backbone.model
        self.processor, self.config = processor, config
        hidden, k = self.model.config.text_config.hidden_size, len(config.aspects)
        self.head = nn.Linear(hidden, k)
        nn.init.normal_(self.head.weight, std=hidden ** -0.5)  # unit-scale scores at init, whatever the width
        nn.init.zeros_(self.head.bias)
        if config.gate == "prompt":
            width = config.gate_hidden
            self.gate = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, k))
        else:
            w = torch.tensor(config.fixed_weights or [1.0] * k, dtype=torch.float32)
            self.register_buffer("fixed_gate", w / w.sum(), persistent=False)  # in head_config.json, not weights
        self.backbone_trainable = True

    @property
    def aspects(self) -> list[str]:
        return list(self.config.aspects)

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (False) or unfreeze the backbone; frozen, its forward also runs without autograd (less memory)."""
        self.model.requires_grad_(trainable)
        self.backbone_trainable = trainable

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mm_token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, prompt_end: torch.Tensor | None = None) -> RewardOutput:
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                     pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        # Explicit positions: exact under left padding, and no rope-delta state is cached on the model between calls.
        position_ids, _ = mrope_positions(self, batch)                                  # (3, N, T)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trainable):
            with encoded_images(self.model, pixel_values, image_grid_thw) as features:
                encoded = {"image": BaseModelOutputWithPooling(pooler_output=features)} if features else None
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    mm_encoder_outputs=encoded, use_cache=False).last_hidden_state  # (N, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        dtype = self.head.weight.dtype  # float32 unless mixed precision casts it: a bf16 backbone, float32 scores
        aspects = self.head(hidden[rows, last_token_index(attention_mask)].to(dtype))  # (N, K)
        if self.config.gate == "prompt":
            if prompt_end is None:
                raise ValueError("a prompt-conditioned gate needs `prompt_end` (see encode_responses)")
            logits = self.gate(hidden[rows, prompt_end].to(dtype))                       # (N, K)
            gate = torch.softmax(logits.float() / self.config.gate_temperature, dim=-1)  # (N, K)
        else:
            gate = self.fixed_gate.float().expand_as(aspects)                            # (N, K)
        aspects = aspects.float()
        return RewardOutput(aspects=aspects, gate=gate, scalar=(gate * aspects).sum(-1))

    def score(self, examples: Sequence[Example], responses: Sequence[str], *,
              answer_format: str | None = "think_answer", batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Aspect scores (N, K) and raw scalar scores (N,), float32 on the CPU; no sigmoid (the combiner applies it).
        Under FSDP a collective: every rank calls it, with its own items (any number, even none)."""
        if len(examples) != len(responses):
            raise ValueError(f"score: {len(examples)} examples but {len(responses)} responses")
        if batch_size < 1:
            raise ValueError(f"score: batch_size must be >= 1, got {batch_size}")
        device = self.head.weight.device
        n_batches = math.ceil(len(examples) / batch_size)
        if isinstance(self, FSDPModule):
            most = torch.tensor([n_batches], device=device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            n_batches = int(most.item())
        was_training = self.training
        self.eval()
        aspects, scalars = [], []
        with forward_only(self):
            for start in range(0, n_batches * batch_size, batch_size):
                chunk_ex, chunk_resp = examples[start:start + batch_size], responses[start:start + batch_size]
                padding = not chunk_ex  # this rank is out of items but must still join the other ranks' forwards
                if padding:
                    chunk_ex, chunk_resp = [Example(id="fsdp-padding", problem="-")], [""]
                batch = encode_responses(self.processor, chunk_ex, chunk_resp, answer_format)
                out = self(**{k: v.to(device) for k, v in batch.items()})
                if not padding:
                    aspects.append(out.aspects.cpu())
                    scalars.append(out.scalar.cpu())
        self.train(was_training)
        if not aspects:
            return torch.zeros(0, len(self.aspects)), torch.zeros(0)
        return torch.cat(aspects), torch.cat(scalars)                                   # (N, K), (N,)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write backbone + processor + head + config; under FSDP a collective (every rank calls, rank 0 writes)."""
        out, sharded = Path(out_dir), isinstance(self, FSDPModule)
        state = full_state_dict(self) if sharded else self.state_dict()
        if not sharded or dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            head = {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith("model.")}
            self.model.save_pretrained(out, state_dict=backbone)
            self.processor.save_pretrained(out)
            save_file(head, str(out / HEAD_FILE), metadata={"format": "pt"})
            head_config = {"format": "harmo_min.reward_model", **asdict(self.config)}
            (out / CONFIG_FILE).write_text(json.dumps(head_config, indent=2))
        if sharded:
            dist.barrier()
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", attn_implementation: str = "sdpa") -> "RewardModel":
        """Load a folder saved by `save_pretrained`, or one in the Skywork-VL-Reward layout; eval mode, frozen."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"reward model {str(path)!r}: no such folder "
                                    "(reward models load from local folders)")
        if (folder / CONFIG_FILE).is_file():
            raw = json.loads((folder / CONFIG_FILE).read_text())
            raw.pop("format", None)
            config = HeadConfig.from_dict(raw, where=str(folder / CONFIG_FILE))
            head = load_file(str(folder / HEAD_FILE))
        elif (folder / SKYWORK_HEAD_FILE).is_file():
            file, config = folder / SKYWORK_HEAD_FILE, HeadConfig(aspects=["score"])
            tensors = load_file(str(file))
            absent = [k for k in SKYWORK_KEYS if k not in tensors]
            if absent:
                raise ValueError(f"{file}: missing {absent}; found {sorted(tensors)} "
                                 "(expected the TRL value-head layout)")
            weight, bias = tensors[SKYWORK_KEYS[0]], tensors[SKYWORK_KEYS[1]]
            if weight.dim() != 2 or weight.shape[0] != 1 or bias.shape != (1,):
                raise ValueError(f"{file}: expected {SKYWORK_KEYS[0]} (1, H) and {SKYWORK_KEYS[1]} (1,), "
                                 f"got {tuple(weight.shape)} and {tuple(bias.shape)}")
            head = {"head.weight": weight.float(), "head.bias": bias.float()}
        else:
            raise FileNotFoundError(f"{folder}: neither {CONFIG_FILE} (a harmo_min reward model) nor "
                                    f"{SKYWORK_HEAD_FILE} (Skywork-VL-Reward layout): not a reward model folder")
        # The base class loads a ForConditionalGeneration checkpoint too, leaving out (and reporting) its lm_head.
        # Straight onto `device`: 8 ranks loading a 7B scorer must not each stage a copy in host memory.
        backbone = Qwen2_5_VLModel.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                   device_map=torch.device(device), local_files_only=True)
        rm = cls(backbone, ImageProcessor.from_pretrained(folder, local_files_only=True), config)  # head: float32
        missing, unexpected = rm.load_state_dict(head, strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise ValueError(f"{folder}: head weights do not match the config: missing {missing}, "
                             f"unexpected {unexpected}")
        rm.set_backbone_trainable(False)
        rm.requires_grad_(False)  # a scorer; to fine-tune, turn requires_grad back on where wanted
        return rm.to(device).eval()


@dataclass
class Scorer:
    """A loaded reward model with the scoring settings of a GRPO run: `score(examples, responses)` for the combiner."""

    model: RewardModel
    batch_size: int = 16
    answer_format: str | None = "think_answer"

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.score(examples, responses, answer_format=self.answer_format, batch_size=self.batch_size)


def load_scorer(path: str | os.PathLike, *, world=None, batch_size: int = 16,
                answer_format: str | None = "think_answer", dtype: torch.dtype | None = None) -> Scorer:
    """A frozen reward model on this rank's device, unsharded: every rank scores its own items, no collectives.
    bf16 on a GPU (a 7B reward model is ~15 GiB per GPU), float32 on the CPU; the head stays float32."""
    device = world.device if world is not None else torch.device("cpu")
    dtype = dtype or resolve_dtype("auto", device)
    return Scorer(RewardModel.from_pretrained(path, dtype=dtype, device=device), batch_size, answer_format)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(s_c − s_r) (P,), written softplus(s_r − s_c): the same value, finite for any margin."""
    return F.softplus(rejected - chosen)


def pair_wins(margin: torch.Tensor) -> torch.Tensor:
    """1 where the chosen response scored higher, ½ for a tie (a coin flip, not a win), 0 otherwise."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def aspect_wins(chosen: torch.Tensor, rejected: torch.Tensor,
                aspect_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per aspect (K,): the `pair_wins` of the pairs labelled with it, and how many are; sums, so ranks can add them
    before dividing. chosen, rejected (P, K) aspect scores; aspect_index (P,) the labelled aspect, −1 for none."""
    labelled = aspect_index >= 0                                                     # (P,)
    k = aspect_index.clamp(min=0)[:, None]                                           # (P, 1)
    margin = (chosen.gather(1, k) - rejected.gather(1, k)).squeeze(1)                # (P,)
    onehot = F.one_hot(k.squeeze(1), chosen.shape[1]).float() * labelled[:, None]    # (P, K)
    return (pair_wins(margin)[:, None] * onehot).sum(0), onehot.sum(0)


def preference_loss(chosen: RewardOutput, rejected: RewardOutput, aspect_index: torch.Tensor, *,
                    chosen_ratings: torch.Tensor | None = None, rejected_ratings: torch.Tensor | None = None,
                    aspect_weight: float = 1.0, rating_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The loss of the module docstring and its logged statistics, for P pairs; `aspect_index` as in `aspect_wins`,
    ratings (P, K) with NaN where absent."""
    margin = chosen.scalar - rejected.scalar                                         # (P,)
    bt = bradley_terry(chosen.scalar, rejected.scalar).mean()
    labelled = aspect_index >= 0                                                     # (P,)
    k = aspect_index.clamp(min=0)[:, None]                                           # (P, 1)
    aspect_margin = (chosen.aspects.gather(1, k) - rejected.aspects.gather(1, k)).squeeze(1)  # (P,)
    bt_aspect = ((bradley_terry(aspect_margin, torch.zeros_like(aspect_margin)) * labelled).sum()
                 / labelled.sum().clamp(min=1))
    squared, rated = chosen.scalar.new_zeros(()), 0
    for out, ratings in ((chosen, chosen_ratings), (rejected, rejected_ratings)):
        if ratings is not None:
            known = ~torch.isnan(ratings)                                            # (P, K)
            squared = squared + torch.where(known, out.aspects - ratings.nan_to_num(), 0.0).pow(2).sum()
            rated += int(known.sum())
    rating_mse = squared / max(rated, 1)
    aspect_correct, aspect_count = aspect_wins(chosen.aspects.detach(), rejected.aspects.detach(), aspect_index)
    return {
        "loss": bt + aspect_weight * bt_aspect + rating_weight * rating_mse,
        "bt": bt.detach(), "bt_aspect": bt_aspect.detach(), "rating_mse": rating_mse.detach(),
        "accuracy": pair_wins(margin.detach()).mean(), "margin": margin.detach().mean(),
        "aspect_correct": aspect_correct, "aspect_count": aspect_count,
    }


def encode_pairs(processor, pairs: Sequence[PreferencePair], aspects: Sequence[str],
                 answer_format: str | None = "think_answer",
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One batch of 2P rows (the P chosen responses, then the P rejected ones) and the pairs' labels."""
    examples = [p.example for p in pairs]
    batch = encode_responses(processor, examples + examples, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                             answer_format)
    unknown = [(p.id, p.aspect) for p in pairs if p.aspect is not None and p.aspect not in aspects]
    if unknown:
        raise ValueError(f"pairs labelled with aspects the model does not have {unknown[:3]}; model aspects "
                         f"{list(aspects)}")
    labels = {"aspect_index": torch.tensor([list(aspects).index(p.aspect) if p.aspect else -1 for p in pairs])}
    for side in ("chosen_ratings", "rejected_ratings"):
        if any(getattr(p, side) for p in pairs):
            labels[side] = torch.tensor([[getattr(p, side).get(a, math.nan) for a in aspects] for p in pairs])
    return batch, labels


def split_pairs(out: RewardOutput) -> tuple[RewardOutput, RewardOutput]:
    """The chosen and rejected halves of a forward over an `encode_pairs` batch."""
    p = out.scalar.shape[0] // 2
    return (RewardOutput(out.aspects[:p], out.gate[:p], out.scalar[:p]),
            RewardOutput(out.aspects[p:], out.gate[p:], out.scalar[p:]))
