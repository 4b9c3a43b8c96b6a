"""The rollout sampler: G responses per prompt from a Qwen2.5-VL policy, KV-cached and M-RoPE-correct.

    rollout = sample(model, prompts, n=8, max_new_tokens=256, temperature=1.0, generator=g, tokenizer=tok)

`prompts` is the processor's left-padded batch of N prompts of P tokens (input_ids, attention_mask,
mm_token_type_ids, pixel_values, image_grid_thw); B = N * n rows are decoded. The loop is four small steps:

1. **prefill** each prompt once, through the model's own forward: 3-D M-RoPE positions from `get_rope_index`
   (text tokens count 1, 2, 3, ...; an image's tokens share a temporal index and walk its height/width grid), one
   forward that fills a transformers `DynamicCache` with the prompt's keys and values. The cache must then hold P
   positions: an unknown keyword lands in the model's `**kwargs` and is ignored, so a renamed `cache=` argument
   would otherwise decode every step from an empty cache, silently. `sample` raises instead.
2. **replicate** into a `StaticKVCache`: per layer one preallocated keys buffer and one values buffer of shape
   (B, H_kv, L, D), L = P + max_new_tokens - 1, with the prompt's rows repeated n times (`repeat_interleave`), and
   one (B, L) attention mask: the prompt's padding closed, every response slot closed until it is written. n
   responses per prompt cost one prefill and one vision-tower pass, not n.
3. **decode** one token per step (`decode_one`): open the token's slot in the mask and run the model on the token;
   every attention layer writes its key and value into column P + t of its buffers in place (`index_copy_`) and
   attends over the whole buffer under the mask, passed already 4-D (`{"full_attention": (B, 1, 1, L)}`) so that
   transformers takes it as prepared, as from `generate`, instead of rebuilding it every forward. No tensor grows
   and no address moves: the step has static shapes, so `compile=True` hands it to `torch.compile` (CUDA graphs on
   a GPU). Position of a new text token, on all three M-RoPE axes: `(real tokens so far - 1) + rope_delta` with
   `rope_delta = max prompt position + 1 - prompt length` (an image spans fewer positions than tokens), i.e.
   `real prompt tokens + rope_delta + t` for the token fed at step t. Real tokens are counted from the attention
   mask, so left padding never shifts positions, and text-only prompts (`rope_delta = 0`) get `arange`. The first
   decode step runs eagerly and checks that every attention layer wrote into the static buffers: a cache the
   layers bypassed would, again, decode wrong in silence.
4. **sample** (`sample_next`): vision placeholder ids (`<|image_pad|>`, `<|video_pad|>`) masked out (a response
   containing one would be read as an image slot by the training forward, which then fails or misplaces image
   features), logits / T, optional top-k then top-p truncation, and an exponential race (`argmax(p / E)` with
   `E ~ Exp(1)` is a sample from `p`) from a seeded `torch.Generator`; T = 0 is greedy.

Rows that emit an EOS id stop: later tokens are pad and masked out. The loop ends when every row has stopped or
after `max_new_tokens`.

Returned `logprobs[i, t] = log softmax(logits / T)[token]`, the *untruncated* temperature-scaled policy (T = 1
when greedy) with only the placeholder ids removed. This is exactly what `grpo.token_logprobs` recomputes in the
training forward, so with one update per rollout the sampler's log-probs can serve as `logp_old`; top-k/top-p only
shape which tokens get drawn.

`compile` is off by default: on a CPU it pays only where Python overhead dominates (the tiny model), and under
dynamo transformers' sdpa copies each layer's cache per step (benchmarks/RESULTS.md). Its first call compiles (tens
of seconds); later calls with the same shapes reuse the graph.

Under FSDP2 the caller gathers full parameters once for the whole rollout phase (`distributed.gathered_params`):
every forward then runs locally without collectives, so ranks may stop after different numbers of steps.

Left out: beam search, repetition penalties, speculative decoding, stop strings (stop ids only), video, attention
implementations other than `sdpa` and `eager` (flash-attention kernels take no 4-D mask), sliding-window layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from harmo_min.model import eos_token_ids, mrope_positions, placeholder_ids, takes_boolean_mask


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


@torch.no_grad()
def sample(
    model, prompts: dict, *, n: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
    generator: torch.Generator | None = None, eos_ids: list[int] | None = None, pad_id: int | None = None,
    tokenizer=None, compile: bool = False,
) -> Rollout:
    """Sample `n` responses for each prompt of the left-padded batch `prompts`; see the module docstring."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"sample: n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"sample: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                         f"got {temperature}, {top_p}, {top_k}")
    if eos_ids is None:
        eos_ids = eos_token_ids(model)
    if not eos_ids:
        raise ValueError("sample: no eos_ids given and model.generation_config has none: rows would never stop")
    if pad_id is None:
        pad_id = model.generation_config.pad_token_id
        pad_id = eos_ids[0] if pad_id is None else pad_id
    boolean_mask = takes_boolean_mask(model)
    device = prompts["input_ids"].device
    eos = torch.tensor(eos_ids, device=device)
    suppress = torch.tensor(placeholder_ids(model), dtype=torch.long, device=device)

    # No autograd bookkeeping on any op; the results are cloned out below, so the training step may save them.
    with torch.inference_mode():
        logits, rope_deltas, prompt_cache = prefill(model, prompts)            # (N, V), (N, 1)
        prompt_mask = prompts["attention_mask"]                                # (N, P)
        cache = StaticKVCache(prompt_cache, prompt_mask, n=n, length=prompt_mask.shape[1] + max_new_tokens - 1,
                              boolean_mask=boolean_mask)
        del prompt_cache
        logits = logits.repeat_interleave(n, dim=0)                            # (B, V)
        first_position = (prompt_mask.sum(-1, keepdim=True) + rope_deltas).repeat_interleave(n, dim=0)  # (B, 1)
        decode = _compiled_decode(cache) if compile else decode_one

        rows = logits.shape[0]
        response_ids = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, T_max)
        logprobs = torch.zeros(rows, max_new_tokens, device=device)           # (B, T_max) float32
        done = torch.zeros(rows, dtype=torch.bool, device=device)              # (B,)
        for t in range(max_new_tokens):
            token, logp = sample_next(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                                      suppress=suppress)
            token = torch.where(done, pad_id, token)                           # (B,) finished rows emit pad
            response_ids[:, t] = token
            logprobs[:, t] = logp
            done = done | torch.isin(token, eos)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            # Step 0 runs eagerly, to check that every attention layer wrote the static buffers (module docstring).
            logits = (decode_one if t == 0 else decode)(model, token, first_position + t, cache)
            if t == 0 and cache.writes != cache.layers:
                raise RuntimeError(f"decode: {cache.writes} of {cache.layers} attention layers wrote the KV cache")

    steps = t + 1
    response_ids = response_ids[:, :steps].clone()                             # (B, T)
    logprobs = logprobs[:, :steps].clone()                                     # (B, T)
    is_eos = torch.isin(response_ids, eos)
    # 1 through the first EOS: EOS stays in the loss so the policy learns to stop (pad may equal an EOS id).
    response_mask = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).long()  # (B, T)
    finish_reason = ["eos" if hit else "length" for hit in is_eos.any(-1).tolist()]
    texts = tokenizer.batch_decode(response_ids * response_mask + pad_id * (1 - response_mask),
                                   skip_special_tokens=True) if tokenizer is not None else None
    return Rollout(
        prompt_index=torch.arange(prompts["input_ids"].shape[0], device=device).repeat_interleave(n),
        response_ids=response_ids, response_mask=response_mask,
        logprobs=logprobs * response_mask, finish_reason=finish_reason, texts=texts,
    )


@torch.no_grad()
def prefill(model, prompts: dict) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
    """Run the N prompts through the model once; return last-position logits (N, V), rope deltas (N, 1) and the
    filled cache, after checking that it really holds the P prompt positions."""
    position_ids, rope_deltas = mrope_positions(model, prompts)                # (3, N, P), (N, 1)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], position_ids=position_ids,
                pixel_values=prompts.get("pixel_values"), image_grid_thw=prompts.get("image_grid_thw"),
                cache=cache, use_cache=True, logits_to_keep=1)
    held, prompt_len = cache.get_seq_length(), prompts["input_ids"].shape[1]
    if held != prompt_len:
        raise RuntimeError(f"prefill: the KV cache holds {held} positions after a {prompt_len}-token prompt; the model "
                           "did not fill it (has transformers renamed its `cache=` forward argument?)")
    return out.logits[:, -1], rope_deltas, cache


class StaticKVCache:
    """Preallocated keys and values for the decode loop, plus its attention mask (see the module docstring, step 2).

    transformers' attention layers call `update(key, value, layer_idx)` with this step's (B, H_kv, 1, D) key and
    value; it writes them into column `column` and returns the whole (B, H_kv, L, D) buffers. `decode_one` opens
    the column in `mask` before the forward and advances `column` after it.
    """

    def __init__(self, prompt_cache: DynamicCache, prompt_mask: torch.Tensor, *, n: int, length: int,
                 boolean_mask: bool):
        prompt_len = prompt_mask.shape[1]
        self.keys, self.values = [], []
        for layer in prompt_cache.layers:
            for prompt_kv, buffers in ((layer.keys, self.keys), (layer.values, self.values)):
                rows, heads, _, dim = prompt_kv.shape                          # (N, H_kv, P, D)
                buffer = prompt_kv.new_zeros(rows * n, heads, length, dim)     # (B, H_kv, L, D)
                buffer[:, :, :prompt_len] = prompt_kv.repeat_interleave(n, dim=0)
                buffers.append(buffer)
        self.layers = len(self.keys)
        device = prompt_mask.device
        # sdpa takes a boolean mask (True = attend), eager an additive one (0 = attend, dtype min = blocked).
        dtype = torch.bool if boolean_mask else self.keys[0].dtype
        self.open, closed = (True, False) if boolean_mask else (0.0, torch.finfo(dtype).min)
        mask = torch.full((prompt_mask.shape[0], length), closed, device=device, dtype=dtype)  # (N, L)
        mask[:, :prompt_len].masked_fill_(prompt_mask.bool(), self.open)
        self.mask = mask.repeat_interleave(n, dim=0)                           # (B, L)
        self.column = torch.tensor([prompt_len], device=device)                # (1,) slot of the next token
        self.writes = 0                                                        # update calls, checked once

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.column, key)                  # (B, H_kv, L, D) <- (B, H_kv, 1, D)
        self.values[layer_idx].index_copy_(2, self.column, value)
        if not torch.compiler.is_compiling():
            self.writes += 1  # counted eagerly only: a Python int inside a compiled step would force recompiles
        return self.keys[layer_idx], self.values[layer_idx]


def decode_one(model, token: torch.Tensor, position: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """Feed one token per row (B,) at M-RoPE position (B, 1); return the next logits (B, V). Static shapes."""
    cache.mask.index_fill_(1, cache.column, cache.open)                        # (B, L) the token sees itself
    out = model(input_ids=token[:, None], attention_mask={"full_attention": cache.mask[:, None, None, :]},
                position_ids=position[None].expand(3, -1, -1), cache=cache, use_cache=True)
    cache.column.add_(1)
    return out.logits[:, -1]


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None,
    suppress: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from logits (B, V); return it (B,) and its log-prob under softmax(logits / T) (B,)."""
    logits = logits.float().index_fill(-1, suppress, float("-inf"))
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
    # E = -log U, U ~ U(0, 1): the law of exponential_, about 4x cheaper on a CPU. U is kept off 0 (torch.rand can
    # return it), where E = inf would score every token of a one-token nucleus 0 and argmax would take id 0.
    uniform = torch.rand(filtered.shape, generator=generator, device=filtered.device)  # (B, V)
    noise = uniform.clamp_min_(torch.finfo(uniform.dtype).tiny).log_().neg_()          # (B, V)
    token = (filtered.softmax(-1) / noise).argmax(-1)                          # (B,)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def _compiled_decode(cache: StaticKVCache):
    # CUDA graphs ("reduce-overhead") remove the kernel launch cost that bounds a GPU decode step. The cache's tensors
    # are written in place at fixed addresses: marked static, a graph captures them instead of copying them in.
    for tensor in (*cache.keys, *cache.values, cache.mask, cache.column):
        torch._dynamo.mark_static_address(tensor)
    mode = "reduce-overhead" if cache.mask.device.type == "cuda" else "default"
    compiled = torch.compile(decode_one, mode=mode)

    def step(model, token, position, cache):
        # Each call is a new step: the previous step's logits (already sampled from) may be overwritten in place.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(model, token, position, cache)

    return step
