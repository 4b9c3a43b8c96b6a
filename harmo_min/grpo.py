r"""The GRPO update: group advantages, token log-probs from a training forward, the clipped loss with KL.

For a group of G responses to one prompt with rewards R_1..R_G (rewards.py):

    A_i = R_i − mean(R)                 [paper]      or   (R_i − mean(R)) / (std(R) + 1e-4)   (scale_std)

Every token t of response i shares A_i. With logp = log π_θ(token)/T from a training forward (same positions and
temperature as the sampler; see `token_logprobs`), logp_old from before the update and logp_ref from the frozen
reference:

    ratio = exp(logp − logp_old)
    ℓ_t   = −min(ratio · A, clip(ratio, 1 − ε_low, 1 + ε_high) · A) + β · k3          [ε_low 0.2, ε_high 0.28]
    k3    = exp(logp_ref − logp) − (logp_ref − logp) − 1     (≥ 0, = 0 iff logp = logp_ref; unbiased KL estimate)

Aggregation over the response-token mask m (EOS included, so the policy learns to stop):

    token_mean  L = Σ_{i,t} m·ℓ / Σ_{i,t} m              over the *global* batch (all micro-batches, all ranks)
    seq_mean    L = (1/N) Σ_i (Σ_t m·ℓ / Σ_t m)            original GRPO: a token of a short answer weighs more
    constant    L = Σ_{i,t} m·ℓ / (N · C)                  Dr. GRPO, C = constant_divisor (max_new_tokens)

`grpo_loss` returns the micro-batch's *share* of the global L, so summing the gradients of all micro-batches on all
ranks gives ∇L exactly, whatever the micro-batch split (the normaliser is counted before the first backward).
With one update per rollout batch logp_old = logp.detach() (ratio ≡ 1, only the clip-free gradient remains);
with several epochs logp_old is stored from a no-grad forward before the first update.

Log-probs are computed without materialising a float32 (B, T, V) log-softmax: `TokenLogProb` keeps only the
model-dtype logits the forward produced anyway plus one float per token, and recomputes the softmax row-chunk by
row-chunk in backward.

Left out: value functions, PPO's GAE, off-policy importance weighting across rollout batches, sequence-level
ratios (GSPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harmo_min.model import mrope_positions, placeholder_ids

AGGREGATIONS = ("token_mean", "seq_mean", "constant")


# ---------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_std: bool = False,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = R_i − mean of its group (optionally / (std + eps)); rows of a group are adjacent. (B,) -> (B,)"""
    grouped = rewards.view(-1, group_size).float()                            # (N, G)
    adv = grouped - grouped.mean(-1, keepdim=True)
    if scale_std:
        adv = adv / (grouped.std(-1, keepdim=True, unbiased=False) + eps)
    return adv.view(-1)


def zero_variance_groups(accuracy: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) accuracies -> (N,) True where every response of the group got the same accuracy (no signal).

    Filter on accuracy, not on the shaped total: a group where all answers are wrong but lengths differ still has
    total-reward variance from the length penalty, yet nothing to learn about correctness (DAPO's dynamic sampling).
    """
    grouped = accuracy.view(-1, group_size)
    return (grouped.max(-1).values - grouped.min(-1).values) == 0


# ---------------------------------------------------------------------------------------------------------------
# Token log-probs from a training forward
# ---------------------------------------------------------------------------------------------------------------

class TokenLogProb(torch.autograd.Function):
    """log softmax(logits / T)[target] per row, saving only the logits (model dtype) and one lse per row.

    The autograd of `log_softmax(x.float())` would keep a float32 (rows, V) tensor alive until backward; for a
    152k vocabulary that is 0.6 MB per token. Here backward recomputes softmax in chunks instead.
    """

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


@dataclass
class PromptBatch:
    """The encoded prompts of one rollout (left padded) and where each prompt's images and patches start."""
    input_ids: torch.Tensor            # (N, P)
    attention_mask: torch.Tensor       # (N, P)
    mm_token_type_ids: torch.Tensor    # (N, P)
    pixel_values: torch.Tensor | None  # (sum of patches, D)
    image_grid_thw: torch.Tensor | None  # (images, 3)
    image_start: list[int]             # (N + 1,) prompt p owns images image_start[p]:image_start[p + 1]
    patch_start: list[int]             # (images + 1,) image j owns pixel rows patch_start[j]:patch_start[j + 1]

    def rows(self, prompt_index: torch.Tensor) -> dict:
        """Prompt tensors for the given rows (several rows may share a prompt), trimmed of all-pad columns."""
        mask = self.attention_mask[prompt_index]
        first = int((mask.cumsum(-1) == 0).sum(-1).min())                      # leading pad shared by all rows
        out = {"input_ids": self.input_ids[prompt_index][:, first:], "attention_mask": mask[:, first:],
               "mm_token_type_ids": self.mm_token_type_ids[prompt_index][:, first:]}
        images = [j for p in prompt_index.tolist() for j in range(self.image_start[p], self.image_start[p + 1])]
        if images:
            s = self.patch_start
            out["pixel_values"] = torch.cat([self.pixel_values[s[j]:s[j + 1]] for j in images])
            out["image_grid_thw"] = self.image_grid_thw[images]
        return out


def _starts(counts: list[int]) -> list[int]:
    starts = [0]
    for k in counts:
        starts.append(starts[-1] + k)
    return starts


def prompt_batch(encoded: dict, images_per_prompt: list[int]) -> PromptBatch:
    """Index the batch once, so every micro-batch of every epoch slices it without recounting."""
    grid = encoded.get("image_grid_thw")
    patches = grid.prod(-1).tolist() if grid is not None else []
    return PromptBatch(encoded["input_ids"], encoded["attention_mask"], encoded["mm_token_type_ids"],
                       encoded.get("pixel_values"), grid, _starts(images_per_prompt), _starts(patches))


def token_logprobs(model, prompts: dict, response_ids: torch.Tensor, response_mask: torch.Tensor, *,
                   temperature: float = 1.0, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(response token)/T (B, T) and per-token entropy (B, T) from one forward of prompt+response.

    Positions are M-RoPE positions of the concatenated sequence, which for the response tokens are exactly the
    sampler's decode positions ((real tokens so far − 1) + rope delta); tokens after EOS are masked out of the
    attention and of every result.
    """
    T = response_ids.shape[1]
    full = {
        "input_ids": torch.cat([prompts["input_ids"], response_ids], 1),                           # (B, P + T)
        "attention_mask": torch.cat([prompts["attention_mask"], response_mask.to(prompts["attention_mask"].dtype)], 1),
        "mm_token_type_ids": torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(response_ids)], 1),
        "pixel_values": prompts.get("pixel_values"), "image_grid_thw": prompts.get("image_grid_thw"),
    }
    position_ids, _ = mrope_positions(model, full)                                                # (3, B, P + T)
    out = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"], position_ids=position_ids,
                pixel_values=full["pixel_values"], image_grid_thw=full["image_grid_thw"], use_cache=False,
                logits_to_keep=T + 1)
    logits = out.logits[:, :-1]                                          # (B, T, V): position P−1+t predicts token t
    B, _, V = logits.shape
    logp, entropy = TokenLogProb.apply(logits.reshape(B * T, V), response_ids.reshape(-1), temperature, chunk,
                                       placeholder_ids(model))
    mask = response_mask.float()
    return logp.view(B, T) * mask, entropy.view(B, T) * mask


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------

def grpo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    ref_logp: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.28, kl_coef: float = 0.0,
    aggregation: str = "token_mean", normalizer: float, world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the global loss, plus summed metrics (divide by `normalizer` counts to log).

    logp, old_logp, ref_logp, mask: (b, T); advantages: (b,). `normalizer` is the *global* count the aggregation
    divides by: total valid tokens (token_mean), total sequences (seq_mean) or sequences · C (constant).
    `world_size` undoes FSDP's gradient averaging over ranks so the result is the global sum / normalizer.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo.aggregation: unknown {aggregation!r}; expected one of {AGGREGATIONS}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("grpo.kl_coef > 0 needs reference log-probs")
    mask = mask.float()
    adv = advantages[:, None].float()                                         # (b, 1)
    ratio = torch.exp(logp - old_logp)                                         # (b, T)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)                            # (b, T)
    kl = torch.zeros_like(per_token)
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1                                      # (b, T) k3 >= 0
        per_token = per_token + kl_coef * kl
    per_token = per_token * mask
    if aggregation == "seq_mean":
        total = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    else:
        total = per_token.sum()
    loss = total * world_size / normalizer
    with torch.no_grad():
        # The clip is active where the clipped branch was chosen and differs: that token passes no gradient.
        is_clipped = (clipped < unclipped) & (mask > 0)
        metrics = {
            "clip_frac": is_clipped.float().sum(), "kl": (kl * mask).sum(),
            "ratio_mean": (ratio * mask).sum(), "ratio_max": (ratio * mask).max(),
            "tokens": mask.sum(),
        }
    return loss, metrics
