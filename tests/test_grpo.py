"""GRPO: advantages, the loss on hand-computed cases, clipping, the KL estimators, aggregation, the normaliser, and
the training forward (log-probs equal the sampler's, one vision pass per micro-batch, text-only and image rows)."""

import math

import pytest
import torch

from harmo_min.data import Example, encode_prompts
from harmo_min.distributed import World
from harmo_min.grpo import (TokenLogProb, group_advantages, grpo_loss, kl_estimate, loss_normalizer, micro_batches,
                            token_logprobs, training_inputs, zero_variance_groups)
from harmo_min.rollout import sample
from harmo_min.synthetic import synthetic_examples

WORLD = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))


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


def test_kl_estimators_hand_computed_and_zero_at_the_reference():
    ref, logp = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-0.5, -2.5]])
    r = ref - logp                                                             # [-0.5, 0.5]
    assert torch.allclose(kl_estimate(logp, ref, "k1"), -r)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), torch.tensor([[0.125, 0.125]]))
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.exp(r) - r - 1)
    for k in ("k1", "k2", "k3"):
        assert kl_estimate(ref, ref, k).abs().max() == 0
    loss, m = grpo_loss(ref.clone(), ref, torch.zeros(1), torch.ones(1, 2), ref_logp=ref, kl_coef=1.0, normalizer=2)
    assert loss.item() == 0 and m["kl"].item() == 0


@pytest.mark.parametrize("estimator,direction", [("k2", "reverse"), ("k3", "forward"), ("k1", "none")])
def test_kl_estimator_gradients_in_the_loss_are_the_documented_kl_gradients(estimator, direction):
    """The exact expectation over π of each estimator's per-sample gradient, on a 5-token categorical π_θ = softmax(θ):
    k2 gives ∇KL(π‖ref), k3 gives ∇KL(ref‖π), k1 gives 0 (grpo.py's docstring)."""
    torch.manual_seed(0)
    theta, ref_logp = torch.randn(5, requires_grad=True), torch.log_softmax(torch.randn(5), -1)
    def grad(objective):  # ∇_θ objective(log π_θ)
        return torch.autograd.grad(objective(torch.log_softmax(theta, -1)), theta)[0]

    p = torch.softmax(theta, -1).detach()
    # Σ_y π(y) · ∇ k(y): the estimator evaluated at every token y, weighted by its (detached) sampling probability.
    expected = grad(lambda logp: (p * kl_estimate(logp, ref_logp, estimator)).sum())
    reverse = grad(lambda logp: (logp.exp() * (logp - ref_logp)).sum())                     # ∇ KL(π‖ref)
    forward = grad(lambda logp: (ref_logp.exp() * (ref_logp - logp)).sum())                 # ∇ KL(ref‖π)
    target = {"reverse": reverse, "forward": forward, "none": torch.zeros(5)}[direction]
    assert torch.allclose(expected, target, atol=1e-6), (expected, target)


def test_loss_normalizer_counts_tokens_rows_and_skips_dropped_groups():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])                     # the third row's group was dropped
    assert loss_normalizer(mask, WORLD, aggregation="token_mean", constant_divisor=8) == 3
    assert loss_normalizer(mask, WORLD, aggregation="seq_mean", constant_divisor=8) == 2
    assert loss_normalizer(mask, WORLD, aggregation="constant", constant_divisor=8) == 16
    assert loss_normalizer(torch.zeros(2, 3), WORLD, aggregation="token_mean", constant_divisor=8) == 0


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


def _rollout(tiny, n=3, T=8, eos_ids=None, temperature=1.0, examples=None):
    model, processor = tiny
    if examples is None:
        examples = synthetic_examples(3, seed=11)
        examples[0].images = [examples[0].images[0].resize((56, 84))]
    encoded = encode_prompts(processor, examples)
    r = sample(model, encoded, n=n, max_new_tokens=T, temperature=temperature, eos_ids=eos_ids,
               generator=torch.Generator().manual_seed(0))
    return model, encoded, [len(ex.images) for ex in examples], r


def _logprobs(model, encoded, images, r, rows, **kw):
    return token_logprobs(model, training_inputs(encoded, images, r, rows), **kw)


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_training_forward_logprobs_equal_sampler_logprobs(tiny, temperature, share_prompt):
    model, encoded, images, r = _rollout(tiny, temperature=temperature)
    # Micro-batches of rows from different prompts, in a shuffled order, trimmed of shared left pad.
    rows = torch.tensor([4, 0, 8, 5])
    with torch.no_grad():
        logp, _ = _logprobs(model, encoded, images, r, rows, temperature=temperature, share_prompt=share_prompt)
    T = logp.shape[1]
    assert torch.allclose(logp, r.logprobs[rows, :T], atol=1e-4), (logp - r.logprobs[rows, :T]).abs().max()
    assert r.logprobs[rows, T:].abs().sum() == 0  # trimmed columns (if any) hold nothing


@pytest.mark.parametrize("share_prompt", [False, True])
def test_text_only_and_image_rows_in_one_micro_batch_equal_their_separate_forwards(tiny, share_prompt):
    examples = synthetic_examples(2, seed=4, kinds=("colour",))
    examples.insert(1, Example(id="text", problem="What is the sum of 2 and 3?", answer="5"))
    model, encoded, images, r = _rollout(tiny, n=2, examples=examples)
    with torch.no_grad():
        mixed, _ = _logprobs(model, encoded, images, r, torch.arange(6), share_prompt=share_prompt)
        for rows in (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])):
            alone, _ = _logprobs(model, encoded, images, r, rows, share_prompt=share_prompt)
            assert torch.allclose(mixed[rows, :alone.shape[1]], alone, atol=1e-5)
    assert torch.allclose(mixed, r.logprobs[:, :mixed.shape[1]], atol=1e-4)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_each_micro_batch_encodes_a_prompts_images_once(tiny, share_prompt):
    model, encoded, images, r = _rollout(tiny, n=3)
    seen = []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        _logprobs(model, encoded, images, r, torch.arange(6), share_prompt=share_prompt)  # 2 prompts x 3 responses
    finally:
        hook.remove()
    patches = encoded["image_grid_thw"].prod(-1).tolist()
    assert seen == [patches[0] + patches[1]]  # one tower call on the two prompts' images, not six


@pytest.mark.parametrize("share_prompt", [False, True])
def test_text_only_micro_batch_still_runs_the_vision_tower_with_a_zero_gradient_path(tiny, share_prompt):
    model, processor = tiny
    examples = [Example(id="t1", problem="What is 2 plus 2?", answer="4"), Example(id="t2", problem="Say hi.")]
    model, encoded, images, r = _rollout(tiny, n=2, examples=examples)
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        logp, _ = _logprobs(model, encoded, images, r, torch.arange(4), share_prompt=share_prompt)
        logp.sum().backward()
    finally:
        hook.remove()
    assert calls == [1]  # FSDP2 lockstep: the rank without images still runs (and back-propagates through) the tower
    tower = [q.grad for q in model.model.visual.parameters()]
    assert all(g is not None and g.abs().max() == 0 for g in tower)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_forward_gives_the_same_logprobs_entropies_and_gradients(tiny, checkpointing):
    """share_prompt runs each prompt once and its responses against the repeated cache: the same function of the
    weights. Rows of three prompts (images of two sizes, a text-only one) in a shuffled order, one response cut
    short by EOS, so prompts of different lengths share the left pad and responses the right pad. With activation
    checkpointing (the GPU configs' setting) too, where transformers drops an ordinary cache."""
    examples = synthetic_examples(2, seed=4, kinds=("count",))
    examples[1].images = [examples[1].images[0].resize((56, 84))]
    examples.insert(1, Example(id="text", problem="What is the sum of 2 and 3?", answer="5"))
    model, encoded, images, free = _rollout(tiny, n=3, T=10, examples=examples)
    eos = int(free.response_ids[4, 3])
    model, encoded, images, r = _rollout(tiny, n=3, T=10, examples=examples, eos_ids=[eos])
    assert 0 < r.response_mask.sum(-1).min() < r.response_mask.sum(-1).max()
    rows = torch.tensor([5, 0, 3, 8, 1, 4, 6])
    results = []
    if checkpointing:
        model.train()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for share_prompt in (False, True):
        model.zero_grad(set_to_none=True)
        logp, entropy = _logprobs(model, encoded, images, r, rows, share_prompt=share_prompt)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        results.append((logp.detach(), entropy, {k: q.grad.clone() for k, q in model.named_parameters()}))
    (logp_a, ent_a, grad_a), (logp_b, ent_b, grad_b) = results
    assert torch.allclose(logp_a, logp_b, atol=1e-5) and torch.allclose(ent_a, ent_b, atol=1e-5)
    for name in grad_a:
        assert torch.allclose(grad_a[name], grad_b[name], rtol=1e-4, atol=1e-6), name
    assert any(grad_b[k].abs().max() > 0 for k in grad_b if "visual" in k)  # the images' gradient path is intact
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.activation_checkpointing_disable()
        model.eval()


def test_micro_batches_keep_a_prompts_rows_together_longest_first():
    prompt_index = torch.tensor([0, 0, 1, 1, 2, 2])
    lengths = torch.tensor([3, 2, 9, 1, 5, 5])
    assert [b.tolist() for b in micro_batches(prompt_index, lengths, 4)] == [[2, 3, 4, 5], [0, 1]]


def test_eos_is_inside_the_loss_mask_and_gets_gradient(tiny):
    model, encoded, images, free = _rollout(tiny)
    eos = int(free.response_ids[0, 2])
    model, encoded, images, r = _rollout(tiny, eos_ids=[eos])
    stop = r.response_ids[0].tolist().index(eos)
    assert r.response_mask[0, stop] == 1 and r.response_mask[0, stop + 1:].sum() == 0
    logp, _ = _logprobs(model, encoded, images, r, torch.tensor([0]))
    logp.retain_grad()
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0]), r.response_mask[:1, :logp.shape[1]], normalizer=1)
    loss.backward()
    assert logp.grad[0, stop] != 0 and (logp.grad[0, stop + 1:] == 0).all()
    model.zero_grad(set_to_none=True)


def test_micro_batch_split_does_not_change_the_gradient(tiny):
    model, encoded, images, r = _rollout(tiny)
    adv = torch.linspace(-1, 1, r.response_ids.shape[0])
    normalizer = r.response_mask.sum().item()

    def grads(splits):
        model.zero_grad(set_to_none=True)
        for idx in splits:
            logp, _ = _logprobs(model, encoded, images, r, idx)
            loss, _ = grpo_loss(logp, logp.detach(), adv[idx], r.response_mask[idx, :logp.shape[1]], normalizer=normalizer)
            loss.backward()
        out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return out

    whole = grads([torch.arange(9)])
    split = grads([torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])])
    assert len(whole) == len(split) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, split))
