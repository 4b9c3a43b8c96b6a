"""The rollout sampler: G responses per prompt from a Qwen2.5-VL policy, KV-cached and M-RoPE-correct.

    rollout = sample(model, prompts, n=8, max_new_tokens=256, temperature=1.0, generator=g, tokenizer=tok)

`prompts` is the processor's left-padded batch (input_ids, attention_mask, mm_token_type_ids, pixel_values,
image_grid_thw). The loop is four small steps:

1. **prefill** each prompt once: 3-D M-RoPE positions from `get_rope_index` (text tokens count 1, 2, 3, ...; an
   image's tokens share a temporal index and walk its height/width grid), one forward that fills the KV cache.
2. **replicate** the cache, the attention mask and the last logits n times (`repeat_interleave`): n responses per
   prompt cost one prefill and one vision-tower pass, not n.
3. **decode** one token per step. Qwen2.5-VL's position for a new text token on all three axes is
   `(real tokens so far - 1) + rope_delta`, where `rope_delta = max prompt position + 1 - prompt length` (an
   image spans fewer positions than tokens). Real tokens are counted from the attention mask, so left padding
   never shifts positions, and the same formula gives `arange` for text-only prompts (`rope_delta = 0`).
4. **sample**: vision placeholder ids (`<|image_pad|>`, `<|video_pad|>`) masked out (a response containing one
   would be read as an image slot by the training forward, which then fails or misplaces image features),
   logits / T, optional top-k then top-p truncation, and an exponential-race draw
   (`argmax(p / Exp(1))` is a sample from `p`) from a seeded `torch.Generator`; T = 0 is greedy.

Rows that emit an EOS id stop: later tokens are pad and masked out. The loop ends when every row has stopped or
after `max_new_tokens`.

Returned `logprobs[i, t] = log softmax(logits / T)[token]`, the *untruncated* temperature-scaled policy (T = 1
when greedy) with only the placeholder ids removed. This is exactly what `grpo.token_logprobs` recomputes in the training forward, so with one update per
rollout the sampler's log-probs can serve as `logp_old`; top-k/top-p only shape which tokens get drawn.

**Under FSDP2** the caller gathers full parameters once for the whole rollout phase
(`distributed.gathered_params`): every forward then runs locally without collectives, so ranks may stop after
different numbers of steps. A caller that keeps parameters sharded (each forward all-gathers) must keep ranks in
lockstep: pass `all_done=` a function that all-reduces the local "every row finished" flag, so no rank leaves
the loop while another still needs its all-gathers.

Left out: beam search, repetition penalties, speculative decoding, stop strings (stop ids only), video.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from harmo_min.model import eos_token_ids, mrope_positions, placeholder_ids


@dataclass
class Rollout:
    prompt_index: torch.Tensor   # (B,) which prompt each row answers; B = N * n, rows of one prompt adjacent
    response_ids: torch.Tensor   # (B, T) right padded with pad_id
    response_mask: torch.Tensor  # (B, T) 1 up to and including the first EOS, 0 after
    logprobs: torch.Tensor       # (B, T) float32, log pi(token)/T of each sampled token, 0 where masked
    finish_reason: list[str]     # "eos" or "length", per row
    texts: list[str] | None      # decoded responses (special tokens skipped) when a tokenizer was given

    @property
    def lengths(self) -> torch.Tensor:  # (B,) response length in tokens, EOS included
        return self.response_mask.sum(-1)


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None,
    suppress_ids: list[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from logits (B, V); return it (B,) and its log-prob under softmax(logits / T) (B,)."""
    logits = logits.float()
    if len(suppress_ids):
        logits[:, list(suppress_ids)] = float("-inf")
    if temperature == 0:
        token = logits.argmax(-1)                                             # (B,)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)                   # (B, V)
    filtered = logp
    if top_k > 0:
        kth = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = torch.sort(filtered, dim=-1, descending=True)   # (B, V)
        probs = sorted_logp.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the most likely token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) selects i with probability p_i (no CPU sync, seeded).
    noise = torch.empty_like(filtered).exponential_(1.0, generator=generator)  # (B, V)
    token = (filtered.softmax(-1) / noise).argmax(-1)                          # (B,)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


@torch.no_grad()
def prefill(model, prompts: dict, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompt through the model once; return last-position logits (N, V) and rope deltas (N, 1)."""
    position_ids, rope_deltas = mrope_positions(model, prompts)                # (3, N, P), (N, 1)
    out = model(
        input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], position_ids=position_ids,
        pixel_values=prompts.get("pixel_values"), image_grid_thw=prompts.get("image_grid_thw"),
        cache=cache, use_cache=True, logits_to_keep=1,
    )
    prompt_len = prompts["input_ids"].shape[1]
    if cache.get_seq_length() != prompt_len:
        # A renamed cache keyword lands in **kwargs and is ignored: decoding would see one token per step.
        raise RuntimeError(
            f"prefill: the KV cache holds {cache.get_seq_length()} positions after a {prompt_len}-token prompt; "
            "the model did not fill it (has transformers renamed its `cache=` forward argument?)"
        )
    return out.logits[:, -1], rope_deltas


@torch.no_grad()
def decode_one(model, token: torch.Tensor, attention_mask: torch.Tensor, rope_deltas: torch.Tensor,
               cache: DynamicCache) -> torch.Tensor:
    """Feed one token per row (B,) whose slot is already in `attention_mask` (B, L); return next logits (B, V)."""
    position = attention_mask.sum(-1, keepdim=True) - 1 + rope_deltas           # (B, 1)
    out = model(
        input_ids=token[:, None], attention_mask=attention_mask, position_ids=position[None].expand(3, -1, -1),
        cache=cache, use_cache=True,
    )
    return out.logits[:, -1]


@torch.no_grad()
def sample(
    model,
    prompts: dict,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    eos_ids: list[int] | None = None,
    pad_id: int | None = None,
    tokenizer=None,
    all_done: Callable[[bool], bool] | None = None,
    suppress_ids: list[int] | None = None,
) -> Rollout:
    """Sample `n` responses for each prompt of the left-padded batch `prompts`; see the module docstring."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"sample: n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"sample: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    gen_cfg = model.generation_config
    if eos_ids is None:
        eos_ids = eos_token_ids(model)
    if not eos_ids:
        raise ValueError("sample: no eos_ids given and model.generation_config has none: rows would never stop")
    pad_id = pad_id if pad_id is not None else (gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else eos_ids[0])
    device = prompts["input_ids"].device
    eos = torch.tensor(eos_ids, device=device)
    suppress_ids = placeholder_ids(model) if suppress_ids is None else suppress_ids

    cache = DynamicCache(config=model.config)
    logits, rope_deltas = prefill(model, prompts, cache)                       # (N, V), (N, 1)
    cache.batch_repeat_interleave(n)
    logits = logits.repeat_interleave(n, dim=0)                                # (B, V)
    rope_deltas = rope_deltas.repeat_interleave(n, dim=0)                      # (B, 1)
    attention_mask = prompts["attention_mask"].repeat_interleave(n, dim=0)     # (B, P)
    rows = logits.shape[0]

    tokens, logps = [], []
    done = torch.zeros(rows, dtype=torch.bool, device=device)                  # (B,)
    for step in range(max_new_tokens):
        token, logp = sample_next(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                                  suppress_ids=suppress_ids)
        token = torch.where(done, pad_id, token)                               # (B,) finished rows emit pad
        tokens.append(token)
        logps.append(torch.where(done, 0.0, logp))
        done = done | torch.isin(token, eos)
        finished = bool(done.all())
        if all_done is not None:
            finished = all_done(finished)
        if finished or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)  # (B, P + step + 1)
        logits = decode_one(model, token, attention_mask, rope_deltas, cache)

    response_ids = torch.stack(tokens, dim=1)                                  # (B, T)
    is_eos = torch.isin(response_ids, eos)
    # 1 through the first EOS: EOS stays in the loss so the policy learns to stop (pad may equal an EOS id).
    before_first_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    response_mask = before_first_eos.long()                                    # (B, T)
    finish_reason = ["eos" if hit else "length" for hit in is_eos.any(-1).tolist()]
    texts = tokenizer.batch_decode(response_ids * response_mask + pad_id * (1 - response_mask),
                                   skip_special_tokens=True) if tokenizer is not None else None
    return Rollout(
        prompt_index=torch.arange(prompts["input_ids"].shape[0], device=device).repeat_interleave(n),
        response_ids=response_ids, response_mask=response_mask,
        logprobs=torch.stack(logps, dim=1) * response_mask, finish_reason=finish_reason, texts=texts,
    )
