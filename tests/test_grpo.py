"""GRPO: advantages, the loss on hand-computed cases, clipping, k3, aggregation, and the training-forward log-probs."""

import math

import pytest
import torch

from harmo_min.data import encode_prompts

from harmo_min.synthetic import synthetic_examples
from harmo_min.grpo import (TokenLogProb, group_advantages, grpo_loss, prompt_batch, token_logprobs,
                            zero_variance_groups)
from harmo_min.rollout import sample


def test_group_advantages_exact():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    assert group_advantages(r, 4).tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    scaled = group_advantages(r, 4, scale_std=True)
    assert torch.allclose(scaled[:4], torch.tensor([1, -1, -1, 1]) * 0.5 / (0.5 + 1e-4))
    assert scaled[4:].abs().max() == 0  # equal rewards: no signal, no division blow-up
    assert zero_variance_groups(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]), 4).tolist() == [False, True]


def _loss(ratios, adv, **kw):
    logp = torch.log(torch.tensor([ratios]))
    mask = torch.ones_like(logp)
    return grpo_loss(logp, torch.zeros_like(logp), torch.tensor([adv]), mask, normalizer=mask.sum().item(), **kw)


def test_loss_hand_computed_positive_and_negative_advantage():
    # A = +1: min(r·A, clip(r, 0.8, 1.28)·A) = [min(1.5, 1.28), min(0.5, 0.8)] = [1.28, 0.5] -> mean of negatives
    loss, m = _loss([1.5, 0.5], 1.0)
    assert math.isclose(loss.item(), -(1.28 + 0.5) / 2, rel_tol=1e-6)
    assert m["clip_frac"].item() == 1  # only the 1.5 token is clipped
    # A = -1: min(-r, -clip(r)) = [min(-1.5, -1.28), min(-0.5, -0.8)] = [-1.5, -0.8]
    loss, m = _loss([1.5, 0.5], -1.0)
    assert math.isclose(loss.item(), (1.5 + 0.8) / 2, rel_tol=1e-6)
    assert m["clip_frac"].item() == 1  # only the 0.5 token is clipped


@pytest.mark.parametrize("adv,ratio,has_grad", [
    (1.0, 1.5, False),   # A > 0 above 1 + ε_high: clipped, no push further up
    (1.0, 0.5, True),    # A > 0 below 1 − ε_low: the unclipped branch, still pulled up
    (-1.0, 0.5, False),  # A < 0 below 1 − ε_low: clipped, no push further down
    (-1.0, 1.5, True),   # A < 0 above 1 + ε_high: unclipped, pulled down
    (1.0, 1.1, True), (-1.0, 0.9, True),  # inside the trust region: always a gradient
])
def test_clipping_stops_gradient_on_the_right_side(adv, ratio, has_grad):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), normalizer=1.0)
    loss.backward()
    assert (logp.grad.abs().item() > 0) == has_grad
    if has_grad:  # descent raises logp when A > 0, lowers it when A < 0
        assert math.copysign(1, -logp.grad.item()) == math.copysign(1, adv)


def test_k3_is_nonnegative_zero_at_reference_and_pulls_toward_it():
    ref = torch.tensor([[-1.0, -2.0, -0.5]])
    zero_adv = torch.zeros(1)
    loss, m = grpo_loss(ref.clone(), ref, zero_adv, torch.ones(1, 3), ref_logp=ref, kl_coef=1.0, normalizer=3)
    assert loss.item() == 0 and m["kl"].item() == 0
    logp = torch.tensor([[-0.2, -3.0, -0.5]], requires_grad=True)
    loss, m = grpo_loss(logp, logp.detach(), zero_adv, torch.ones(1, 3), ref_logp=ref, kl_coef=1.0, normalizer=3)
    d = ref - logp.detach()
    assert torch.allclose(m["kl"], (torch.exp(d) - d - 1).sum()) and m["kl"] > 0
    loss.backward()
    stepped = logp.detach() - 0.1 * logp.grad
    assert ((stepped - ref).abs() <= (logp.detach() - ref).abs()).all()
    assert ((stepped - ref).abs() < (logp.detach() - ref).abs())[0, :2].all()


def test_token_mean_and_seq_mean_weigh_tokens_as_the_length_bias_analysis_says():
    # Sequence 0 has 1 token, sequence 1 has 3; ratio 1 so each token's loss is −A.
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([-2.0, -1.0])
    token, _ = grpo_loss(logp, logp.detach(), adv, mask, normalizer=4)
    seq, _ = grpo_loss(logp, logp.detach(), adv, mask, aggregation="seq_mean", normalizer=2)
    const, _ = grpo_loss(logp, logp.detach(), adv, mask, aggregation="constant", normalizer=2 * 3)
    assert math.isclose(token.item(), (2 + 3) / 4, rel_tol=1e-6)
    assert math.isclose(seq.item(), (2 / 1 + 3 / 3) / 2, rel_tol=1e-6)
    assert math.isclose(const.item(), (2 + 3) / 6, rel_tol=1e-6)
    g_token = torch.autograd.grad(token, logp, retain_graph=True)[0]
    g_seq = torch.autograd.grad(seq, logp)[0]
    # token_mean: every token weighs 1/4; seq_mean: a token of the short answer weighs 1/2, of the long one 1/6.
    assert torch.allclose(g_token.abs(), torch.tensor([[2 / 4, 0, 0], [1 / 4, 1 / 4, 1 / 4]]))
    assert torch.allclose(g_seq.abs(), torch.tensor([[2 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6]]))


def test_world_size_undoes_fsdp_gradient_averaging():
    logp = torch.zeros(1, 2)
    one, _ = grpo_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2), normalizer=4)
    two, _ = grpo_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2), normalizer=4, world_size=2)
    assert math.isclose(two.item(), 2 * one.item())


def test_bad_aggregation_and_missing_reference_raise():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="grpo.aggregation"):
        grpo_loss(z, z, torch.zeros(1), z + 1, aggregation="mean", normalizer=1)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(z, z, torch.zeros(1), z + 1, kl_coef=0.1, normalizer=1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprob_function_matches_log_softmax_and_its_gradient(temperature):
    torch.manual_seed(0)
    logits = torch.randn(7, 50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (7,))
    weights = torch.randn(7, dtype=torch.float64)
    ours, entropy = TokenLogProb.apply(logits, target, temperature, 3, [5])
    masked = (logits / temperature).masked_fill(torch.arange(50) == 5, float("-inf"))
    ref = torch.log_softmax(masked, -1).gather(-1, target[:, None]).squeeze(-1)
    assert torch.allclose(ours, ref)
    p = masked.softmax(-1)
    assert torch.allclose(entropy, -(p * torch.log_softmax(masked, -1).masked_fill(p == 0, 0)).sum(-1))
    g_ours = torch.autograd.grad((ours * weights).sum(), logits)[0]
    g_ref = torch.autograd.grad((ref * weights).sum(), logits)[0]
    assert torch.allclose(g_ours, g_ref)


def _rollout(tiny, n=3, T=8, eos_ids=None, temperature=1.0):
    model, processor = tiny
    examples = synthetic_examples(3, seed=11)
    examples[0].images = [examples[0].images[0].resize((56, 84))]
    encoded = encode_prompts(processor, examples)
    r = sample(model, encoded, n=n, max_new_tokens=T, temperature=temperature, eos_ids=eos_ids,
               generator=torch.Generator().manual_seed(0))
    return model, encoded, prompt_batch(encoded, [1, 1, 1]), r


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_training_forward_logprobs_equal_sampler_logprobs(tiny, temperature):
    model, encoded, prompts, r = _rollout(tiny, temperature=temperature)
    # Micro-batches of rows from different prompts, in a shuffled order, trimmed of shared left pad.
    rows = torch.tensor([4, 0, 8, 5])
    with torch.no_grad():
        logp, _ = token_logprobs(model, prompts.rows(r.prompt_index[rows]), r.response_ids[rows],
                                 r.response_mask[rows], temperature=temperature)
    assert torch.allclose(logp, r.logprobs[rows], atol=1e-4), (logp - r.logprobs[rows]).abs().max()


def test_eos_is_inside_the_loss_mask_and_gets_gradient(tiny):
    model, encoded, prompts, free = _rollout(tiny)
    eos = int(free.response_ids[0, 2])
    model, encoded, prompts, r = _rollout(tiny, eos_ids=[eos])
    stop = r.response_ids[0].tolist().index(eos)
    assert r.response_mask[0, stop] == 1 and r.response_mask[0, stop + 1:].sum() == 0
    logp, _ = token_logprobs(model, prompts.rows(r.prompt_index[:1]), r.response_ids[:1], r.response_mask[:1])
    logp.retain_grad()
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0]), r.response_mask[:1], normalizer=1)
    loss.backward()
    assert logp.grad[0, stop] != 0 and (logp.grad[0, stop + 1:] == 0).all()
    model.zero_grad(set_to_none=True)


def test_micro_batch_split_does_not_change_the_gradient(tiny):
    model, encoded, prompts, r = _rollout(tiny)
    adv = torch.linspace(-1, 1, r.response_ids.shape[0])
    normalizer = r.response_mask.sum().item()

    def grads(splits):
        model.zero_grad(set_to_none=True)
        for idx in splits:
            logp, _ = token_logprobs(model, prompts.rows(r.prompt_index[idx]), r.response_ids[idx], r.response_mask[idx])
            loss, _ = grpo_loss(logp, logp.detach(), adv[idx], r.response_mask[idx], normalizer=normalizer)
            loss.backward()
        out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return out

    whole = grads([torch.arange(9)])
    split = grads([torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, split))
