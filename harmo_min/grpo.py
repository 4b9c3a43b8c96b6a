r"""The GRPO update: group advantages, the KL estimators, the clipped loss, its global normaliser, token log-probs.

For a group of G responses to one prompt with rewards R_1..R_G (rewards.py):

    A_i = R_i − mean(R)                 [paper]      or   (R_i − mean(R)) / (std(R) + 1e-4)   (scale_std)

Every token t of response i shares A_i. With logp = log π_θ(token)/T from a training forward (the sampler's positions
and temperature), logp_old from before the update and logp_ref from the frozen reference, r = logp_ref − logp:

    ratio = exp(logp − logp_old)
    ℓ_t   = −min(ratio · A, clip(ratio, 1 − ε_low, 1 + ε_high) · A) + β · k          [ε_low 0.2, ε_high 0.28]

KL estimators k of KL(π‖ref) from tokens sampled from π (`kl_estimate`), and the gradient each gives *in the loss*:

    k1 = −r              E_π[k1] = KL(π‖ref); its gradient ∇logp has expectation 0 under π: no pull towards ref
    k2 = r² / 2          gradient E_π[(logp − logp_ref) ∇logp] = ∇ KL(π‖ref), the reverse KL of the RL objective
    k3 = e^r − r − 1     ≥ 0, the lowest-variance value estimate, but gradient E_π[(1 − e^r) ∇logp] = ∇ KL(ref‖π):
                         the forward, mass-covering KL. It keeps probability on every answer the reference likes
                         (on the tiny colour task it capped sampled accuracy near 1 − β) [DeepSeek GRPO's choice]

With `kl_in_reward` the penalty moves out of the loss into the reward instead: R_i ← R_i − β Σ_t k1_t (before
the group advantage), whose policy gradient is that of E[R] − β KL(π‖ref). The logged `kl` is always mean k3, a
non-negative, unbiased value estimate of KL(π‖ref).

Aggregation over the response-token mask m (EOS included, so the policy learns to stop):

    token_mean  L = Σ_{i,t} m·ℓ / Σ_{i,t} m              over the *global* batch (all micro-batches, all ranks)
    seq_mean    L = (1/N) Σ_i (Σ_t m·ℓ / Σ_t m)            original GRPO: a token of a short answer weighs more
    constant    L = Σ_{i,t} m·ℓ / (N · C)                  Dr. GRPO, C = constant_divisor (max_new_tokens)

`loss_normalizer` counts the divisor over every micro-batch of every rank before the first backward, and
`grpo_loss` returns a micro-batch's *share* of the global L. FSDP sums gradients over ranks (divide factor 1, see
distributed.apply_fsdp), so the summed gradients of all micro-batches on all ranks are ∇L exactly, whatever the
split. A normaliser of 0 (every group dropped by dynamic sampling) means: no backward and no optimizer step.
With one update per rollout batch logp_old = logp.detach() (ratio ≡ 1, only the clip-free gradient remains);
with several epochs logp_old is stored from a no-grad forward before the first update.

Training forward (`micro_batches`, `training_inputs`, `token_logprobs`): a rank's rows are cut into micro-batches
of similar length, each trimmed to its own longest prompt and response. Each micro-batch runs the vision tower once
on the images of its distinct prompts and hands every row its prompt's features (`mm_encoder_outputs`), so n
responses to one prompt cost one image encoding, not n; the tower runs even without images, as FSDP2 needs
(`model.encoded_images`). `TokenLogProb` keeps only the model-dtype logits and one float per token, and recomputes
the softmax chunk by chunk in backward: a float32 (B, T, V) log-softmax would cost 0.6 MB per token at 152k vocab.

`share_prompt=True` (`grpo.share_prompt`) runs each distinct prompt once, not once per response: a first forward
over the prompts without their last token records their keys and values (with gradients, `PromptCache`), each
response's row takes its prompt's (`index_select`, whose backward sums the n rows' gradients into their prompt),
and a second forward runs [last prompt token, response[:-1]] against them, under explicit 4-D masks. Same
positions, same visible keys, the same log-probs and gradients up to float rounding, with or without activation
checkpointing; it computes P + n·T positions per group instead of n·(P + T). Under FSDP2 each unit then runs twice
before one backward, which frees its parameters after either call's backward: train.py keeps them gathered
through the update (`distributed.unsharded`).

Left out: value functions, PPO's GAE, off-policy importance weighting across rollout batches, sequence-level
ratios (GSPO).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from harmo_min.model import encoded_images, mrope_positions, placeholder_ids, takes_boolean_mask

AGGREGATIONS = ("token_mean", "seq_mean", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")
CHUNK = 1024  # rows per float32 softmax chunk in token_logprobs (the memory plan counts one chunk)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_std: bool = False,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = R_i − mean of its group (optionally / (std + eps)); rows of a group are adjacent. (B,) -> (B,)"""
    grouped = rewards.view(-1, group_size).float()                            # (N, G)
    adv = grouped - grouped.mean(-1, keepdim=True)
    if scale_std:
        adv = adv / (grouped.std(-1, keepdim=True, unbiased=False) + eps)
    return adv.view(-1)


def zero_variance_groups(accuracy: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) accuracies -> (N,) True where every response of the group got the same accuracy (no signal). On accuracy,
    not on the shaped total: all-wrong answers of different lengths still vary in total reward (the length penalty),
    yet teach nothing about correctness (DAPO's dynamic sampling)."""
    grouped = accuracy.view(-1, group_size)
    return (grouped.max(-1).values - grouped.min(-1).values) == 0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π‖ref) from π's own samples; see the module docstring for each one's gradient."""
    r = ref_logp - logp
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r ** 2
    assert estimator == "k3", estimator
    return torch.exp(r) - r - 1


def loss_normalizer(loss_mask: torch.Tensor, world, *, aggregation: str, constant_divisor: int) -> float:
    """The global divisor, over every rank (a collective): Σ tokens, responses or responses · C; dropped groups: 0."""
    tokens, rows = world.sum([float(loss_mask.sum()), float((loss_mask.sum(-1) > 0).sum())])
    return {"token_mean": tokens, "seq_mean": rows, "constant": rows * constant_divisor}[aggregation]


def grpo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, normalizer: float,
    ref_logp: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.28, kl_coef: float = 0.0,
    kl_estimator: str = "k3", aggregation: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the global loss, and summed statistics (divide by token counts to log).

    logp, old_logp, ref_logp, mask: (b, T); advantages: (b,). `normalizer` from `loss_normalizer`. With
    `ref_logp` and kl_coef > 0 the KL term is in the loss; `ref_logp` with kl_coef = 0 only measures it.
    """
    assert aggregation in AGGREGATIONS and normalizer > 0, (aggregation, normalizer)
    mask = mask.float()
    adv = advantages[:, None].float()                                         # (b, 1)
    ratio = torch.exp(logp - old_logp)                                         # (b, T)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)                            # (b, T)
    if ref_logp is not None and kl_coef > 0:
        per_token = per_token + kl_coef * kl_estimate(logp, ref_logp, kl_estimator)
    per_token = per_token * mask
    total = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() if aggregation == "seq_mean" else per_token.sum()
    with torch.no_grad():
        # The clip is active where the clipped branch was chosen and differs: that token passes no gradient.
        stats = {"clip_frac": ((clipped < unclipped) & (mask > 0)).float().sum(), "ratio_mean": (ratio * mask).sum(),
                 "tokens": mask.sum()}
        if ref_logp is not None:
            stats["kl"] = (kl_estimate(logp, ref_logp, "k3") * mask).sum()
    return total / normalizer, stats


def micro_batches(prompt_index: torch.Tensor, lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices (b,) of each micro-batch: a prompt's rows together, prompts by their longest response."""
    prompts = prompt_index.unique(sorted=True)                                # (N,)
    longest = torch.stack([lengths[prompt_index == p].max() for p in prompts])
    order = torch.cat([(prompt_index == prompts[k]).nonzero().squeeze(1)
                       for k in longest.argsort(descending=True, stable=True)])
    return list(order.split(size))


def training_inputs(prompts: dict, images_per_prompt: list[int], rollout, rows: torch.Tensor) -> dict:
    """The prompt + response tensors of `rows` for `token_logprobs`, each distinct prompt's images once. `prompts`:
    the encoded batch the rollout was sampled from; `images_per_prompt[p]`: the number of images of prompt p."""
    p = rollout.prompt_index[rows]                                             # (b,)
    mask = prompts["attention_mask"][p]                                        # (b, P)
    first = int((mask.cumsum(-1) == 0).sum(-1).min())                          # leading pad shared by all rows
    T = max(1, int(rollout.lengths[rows].max()))                               # the longest response here
    response_ids, response_mask = rollout.response_ids[rows, :T], rollout.response_mask[rows, :T]   # (b, T)
    out = {
        "input_ids": torch.cat([prompts["input_ids"][p][:, first:], response_ids], 1),           # (b, P' + T)
        "attention_mask": torch.cat([mask[:, first:], response_mask.to(mask.dtype)], 1),
        "mm_token_type_ids": torch.cat([prompts["mm_token_type_ids"][p][:, first:], torch.zeros_like(response_ids)], 1),
        "response_ids": response_ids, "response_mask": response_mask,
        "pixel_values": None, "image_grid_thw": None, "row_images": [], "row_grid": None,
    }
    image_start = list(itertools.accumulate(images_per_prompt, initial=0))
    row_prompts = p.tolist()
    distinct = sorted(set(row_prompts))
    out["prompt_rows"] = torch.tensor([row_prompts.index(q) for q in distinct])  # (N',) one row per distinct prompt
    out["row_prompt"] = torch.tensor([distinct.index(q) for q in row_prompts])  # (b,) its index in prompt_rows
    images = [j for q in distinct for j in range(image_start[q], image_start[q + 1])]
    if images:
        grid = prompts["image_grid_thw"]                                       # (images, 3)
        patch_start = [0] + grid.prod(-1).cumsum(0).tolist()
        out["pixel_values"] = torch.cat([prompts["pixel_values"][patch_start[j]:patch_start[j + 1]] for j in images])
        out["image_grid_thw"] = grid[images]
        slot = {j: k for k, j in enumerate(images)}
        out["row_images"] = [slot[j] for q in row_prompts for j in range(image_start[q], image_start[q + 1])]
        out["row_grid"] = out["image_grid_thw"][out["row_images"]]             # one grid per image slot of a row
    return out


def token_logprobs(model, inputs: dict, *, temperature: float = 1.0, chunk: int = CHUNK, share_prompt: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(response token)/T (b, T) and per-token entropy (b, T) from one forward of prompt + response (two with
    `share_prompt`, see the module docstring).

    Positions are M-RoPE positions of the concatenated sequence, which for the response tokens are exactly the
    sampler's decode positions ((real tokens so far − 1) + rope delta); tokens after EOS are masked out of the
    attention and of every result.
    """
    position_ids, _ = mrope_positions(model, {**inputs, "image_grid_thw": inputs["row_grid"]})  # (3, b, P' + T)
    logits = (_shared_prompt_logits if share_prompt else _logits)(model, inputs, position_ids)      # (b, T, V)
    mask = inputs["response_mask"].float()                                    # (b, T)
    logp, entropy = TokenLogProb.apply(logits.flatten(0, 1), inputs["response_ids"].flatten(), temperature,
                                       chunk, placeholder_ids(model))
    return logp.view_as(mask) * mask, entropy.view_as(mask) * mask


def _logits(model, inputs: dict, position_ids: torch.Tensor) -> torch.Tensor:
    """The response tokens' logits (b, T, V) from one forward of prompt + response, each row with its prompt's
    image features."""
    L, T = inputs["input_ids"].shape[1], inputs["response_ids"].shape[1]
    keep = torch.arange(L - T - 1, L - 1, device=inputs["input_ids"].device)  # position P−1+t predicts token t
    with encoded_images(model, inputs["pixel_values"], inputs["image_grid_thw"]) as features:  # once per micro-batch
        row_features = tuple(features[k] for k in inputs["row_images"])  # each row: its prompt's images
        encoded = {"image": BaseModelOutputWithPooling(pooler_output=row_features)} if features else None
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=position_ids,
                     mm_encoder_outputs=encoded, use_cache=False, logits_to_keep=keep).logits


def _shared_prompt_logits(model, inputs: dict, position_ids: torch.Tensor) -> torch.Tensor:
    """The same logits (b, T, V), each distinct prompt run once (`share_prompt`, see the module docstring)."""
    ids, attention = inputs["input_ids"], inputs["attention_mask"]           # (b, L), L = P + T
    P = ids.shape[1] - inputs["response_ids"].shape[1]
    heads = inputs["prompt_rows"].to(ids.device)                               # (N',)
    prompt_mask, response_mask = _shared_masks(model, attention, P - 1, heads)
    prompts = PromptCache()
    with _cache_under_checkpointing(model):
        with encoded_images(model, inputs["pixel_values"], inputs["image_grid_thw"]) as features:  # in head order
            encoded = {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))} if features else None
            model(input_ids=ids[heads, :P - 1], attention_mask=prompt_mask, cache=prompts, use_cache=False,
                  position_ids=position_ids[:, heads, :P - 1], mm_encoder_outputs=encoded, logits_to_keep=1)
        responses = PromptCache(prompts, inputs["row_prompt"].to(ids.device))
        return model(input_ids=ids[:, P - 1:-1], attention_mask=response_mask, cache=responses, use_cache=False,
                     position_ids=position_ids[:, :, P - 1:-1]).logits


class PromptCache:
    """The KV "caches" of the shared-prompt forward. `PromptCache()`, in the prompts' forward, records each layer's
    keys and values (N', H_kv, P − 1, D); `PromptCache(prompts, row_prompt)`, in the responses' forward, puts each
    row's prompt rows (`row_prompt`, (b,)) before the row's own. Neither appends, so a layer that activation
    checkpointing replays in backward records, or reads, the same tensors again."""

    def __init__(self, prompts: PromptCache | None = None, row_prompt: torch.Tensor | None = None):
        self.prompts, self.row_prompt, self.keys, self.values = prompts, row_prompt, {}, {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.prompts is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
            return key, value
        keys, values = self.prompts.keys[layer_idx], self.prompts.values[layer_idx]
        return (torch.cat([keys.index_select(0, self.row_prompt), key], 2),                        # (b, H_kv, L−1, D)
                torch.cat([values.index_select(0, self.row_prompt), value], 2))


def _shared_masks(model, attention: torch.Tensor, prompt: int, heads: torch.Tensor) -> tuple[dict, dict]:
    """4-D masks of the two shared-prompt forwards, from the (b, L) attention mask: the prompts' (N', 1, P−1, P−1)
    and the responses' queries over prompt + response keys (b, 1, T, L−1). Causal and padding-closed; a padding
    query sees itself, so no row is all closed (an all-closed sdpa row is NaN, and NaN · 0 poisons the gradients)."""
    keys = attention[:, :-1].bool()                                            # (b, L−1)
    causal = torch.ones(keys.shape[1], keys.shape[1], dtype=torch.bool, device=keys.device).tril()  # (L−1, L−1)
    full = ((causal & keys[:, None, :]) | torch.eye(keys.shape[1], dtype=torch.bool, device=keys.device))[:, None]
    masks = full[heads, :, :prompt, :prompt], full[:, :, prompt:, :]           # (N', 1, P−1, P−1), (b, 1, T, L−1)
    if not takes_boolean_mask(model):  # eager attention adds the mask: 0 open, float32's minimum closed
        masks = tuple(torch.zeros(m.shape, device=m.device).masked_fill(~m, torch.finfo(torch.float32).min)
                      for m in masks)
    return tuple({"full_attention": m} for m in masks)


@contextlib.contextmanager
def _cache_under_checkpointing(model):
    """transformers drops the cache of a layer that activation checkpointing replays (a replayed append would append
    twice); PromptCache never appends, so its layers may keep it."""
    layers = model.get_decoder().layers
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's False


class TokenLogProb(torch.autograd.Function):
    """log softmax(logits / T)[target] and the entropy per row; backward recomputes the softmax from logits and lse."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, temperature: float, chunk: int, suppress: list[int]):
        rows, dtype = logits.shape[0], torch.promote_types(logits.dtype, torch.float32)  # bf16 logits -> fp32 math
        logp, lse, entropy = (torch.empty(rows, dtype=dtype, device=logits.device) for _ in range(3))
        for s in range(0, rows, chunk):
            x = logits[s:s + chunk].to(dtype) / temperature                    # (c, V)
            x[:, suppress] = float("-inf")  # the sampler never draws these: same distribution as the rollout
            lse[s:s + chunk] = torch.logsumexp(x, -1)
            logp[s:s + chunk] = x.gather(-1, target[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            p = torch.exp(x - lse[s:s + chunk, None])
            entropy[s:s + chunk] = lse[s:s + chunk] - (p * x.masked_fill(p == 0, 0)).sum(-1)
        ctx.save_for_backward(logits, target, lse)
        ctx.temperature, ctx.chunk, ctx.suppress = temperature, chunk, suppress
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, _grad_entropy):
        logits, target, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            x = logits[s:s + ctx.chunk].to(lse.dtype) / ctx.temperature       # (c, V)
            x[:, ctx.suppress] = float("-inf")
            g = -torch.exp(x - lse[s:s + ctx.chunk, None])                     # d logp / d x = onehot − softmax
            g.scatter_add_(-1, target[s:s + ctx.chunk, None], torch.ones_like(g[:, :1]))
            grad[s:s + ctx.chunk] = (g * (grad_logp[s:s + ctx.chunk, None] / ctx.temperature)).to(grad.dtype)
        return grad, None, None, None, None
