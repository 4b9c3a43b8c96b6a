"""The hand-written sampler against Hugging Face `generate` and a plain full forward."""

import contextlib
import inspect

import pytest
import torch

from benchmarks.bench_rollout import build_qwen25_vl_3b, measure_decode
from harmo_min import rollout
from harmo_min.data import Example, encode_prompts
from harmo_min.model import build_tiny, placeholder_ids
from harmo_min.rollout import sample
from harmo_min.synthetic import synthetic_examples


def _greedy_generate(model, batch, max_new_tokens):
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens,
                         suppress_tokens=placeholder_ids(model))
    return out[:, batch["input_ids"].shape[1]:]


def _prompts(processor, examples):
    return encode_prompts(processor, examples, "think_answer")


def test_greedy_equals_generate_single_prompt(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(1, seed=3))
    ours = sample(model, batch, n=1, max_new_tokens=16, temperature=0, eos_ids=[-1])
    assert torch.equal(ours.response_ids, _greedy_generate(model, batch, 16))


def test_greedy_equals_generate_left_padded_batch_with_different_image_sizes(tiny):
    model, processor = tiny
    examples = synthetic_examples(3, seed=5)
    examples[0].images = [examples[0].images[0].resize((56, 56))]   # 4 image tokens
    examples[2].images = [examples[2].images[0].resize((84, 112))]  # 12 image tokens
    batch = _prompts(processor, examples)
    assert (batch["attention_mask"] == 0).any(), "the batch must really be left padded"
    assert len(set(batch["image_grid_thw"].prod(-1).tolist())) == 3
    ours = sample(model, batch, n=1, max_new_tokens=16, temperature=0, eos_ids=[-1])
    assert torch.equal(ours.response_ids, _greedy_generate(model, batch, 16))


def test_greedy_equals_generate_text_only(tiny):
    model, processor = tiny
    batch = _prompts(processor, [Example("t", problem="What is the sum of 2 and 3?", answer="5")])
    assert "pixel_values" not in batch
    ours = sample(model, batch, n=1, max_new_tokens=16, temperature=0, eos_ids=[-1])
    assert torch.equal(ours.response_ids, _greedy_generate(model, batch, 16))


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=0))
    run = lambda seed: sample(model, batch, n=4, max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50,
                              generator=torch.Generator().manual_seed(seed)).response_ids
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_group_samples_differ_and_prompt_index_groups_rows(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=0))
    r = sample(model, batch, n=4, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert r.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for p in range(2):
        group = r.response_ids[r.prompt_index == p]
        assert len({tuple(row.tolist()) for row in group}) > 1


def test_prompt_is_prefilled_once_not_n_times(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=0))
    calls = []
    handle = model.model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        sample(model, batch, n=8, max_new_tokens=4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert calls == [batch["pixel_values"].shape[0]]  # one vision pass over the 2 prompts' patches, not 16


def test_response_mask_covers_exactly_through_first_eos(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(3, seed=2))
    # Seeded sampling replays the same tokens; declare a token of row 0 (first drawn at step k >= 2) the EOS,
    # and row 0 must stop exactly there.
    run = lambda **kw: sample(model, batch, n=1, max_new_tokens=10, generator=torch.Generator().manual_seed(0), **kw)
    k, eos = _first_new_token(run(eos_ids=[-1]).response_ids[0].tolist(), at_least=2)
    r = run(eos_ids=[eos], pad_id=0)
    for row in range(3):
        ids, mask = r.response_ids[row].tolist(), r.response_mask[row].tolist()
        if eos in ids:
            first = ids.index(eos)
            assert mask == [1] * (first + 1) + [0] * (len(ids) - first - 1)
            assert all(t == 0 for t in ids[first + 1:]), "tokens after EOS are pad"
            assert r.finish_reason[row] == "eos"
        else:
            assert mask == [1] * len(ids) and r.finish_reason[row] == "length"
    assert r.finish_reason[0] == "eos" and r.lengths[0] == k + 1


def _first_new_token(ids, at_least):
    for k in range(at_least, len(ids)):
        if ids[k] not in ids[:k]:
            return k, ids[k]
    raise AssertionError(f"row {ids} repeats itself: pick another seed")


def test_pad_equal_to_eos_keeps_only_first_eos_in_mask(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=2))
    run = lambda **kw: sample(model, batch, n=1, max_new_tokens=8, generator=torch.Generator().manual_seed(0), **kw)
    k, eos = _first_new_token(run(eos_ids=[-1]).response_ids[0].tolist(), at_least=1)
    # pad == eos (Qwen's <|endoftext|> is both): the rows' later pads must not count as more EOS tokens.
    r = run(eos_ids=[eos], pad_id=eos)
    assert r.response_mask[0].tolist() == [1] * (k + 1) + [0] * (r.response_ids.shape[1] - k - 1)
    assert r.response_ids[0, k:].eq(eos).all()


def test_max_new_tokens_is_respected(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=0))
    r = sample(model, batch, n=3, max_new_tokens=7, temperature=1.0, generator=torch.Generator().manual_seed(0),
               eos_ids=[-1])
    assert r.response_ids.shape == (6, 7)
    assert r.finish_reason == ["length"] * 6 and r.lengths.tolist() == [7] * 6


def _full_forward_logprobs(model, batch, r, temperature):
    """Log-probs of the sampled tokens from one plain forward of prompt+response; HF computes the positions."""
    n = r.response_ids.shape[0] // batch["input_ids"].shape[0]
    ids = torch.cat([batch["input_ids"].repeat_interleave(n, 0), r.response_ids], 1)
    mask = torch.cat([batch["attention_mask"].repeat_interleave(n, 0), torch.ones_like(r.response_ids)], 1)
    mm = torch.cat([batch["mm_token_type_ids"].repeat_interleave(n, 0), torch.zeros_like(r.response_ids)], 1)
    per_prompt = batch["image_grid_thw"].prod(-1).tolist()
    chunks = torch.split(batch["pixel_values"], per_prompt)
    pixels = torch.cat([chunks[i] for i in range(len(chunks)) for _ in range(n)])
    grid = batch["image_grid_thw"].repeat_interleave(n, 0)
    model.model.rope_deltas = None
    logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=pixels,
                   image_grid_thw=grid).logits.float()
    T = r.response_ids.shape[1]
    logits = logits[:, -T - 1:-1] / temperature
    logits[..., placeholder_ids(model)] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, r.response_ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampler_logprobs_equal_full_forward(tiny, temperature, top_p):
    model, processor = tiny
    examples = synthetic_examples(3, seed=7)
    examples[1].images = [examples[1].images[0].resize((56, 84))]
    batch = _prompts(processor, examples)
    r = sample(model, batch, n=2, max_new_tokens=10, temperature=temperature, top_p=top_p,
               generator=torch.Generator().manual_seed(0), eos_ids=[-1])
    with torch.no_grad():
        ref = _full_forward_logprobs(model, batch, r, temperature)
    assert torch.allclose(r.logprobs, ref * r.response_mask, atol=1e-4), (r.logprobs - ref).abs().max()


def test_rollout_tensors_can_be_saved_for_backward(tiny):
    # The sampler decodes in inference mode; what it returns must still be usable by the training step's autograd.
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(1, seed=2))
    r = sample(model, batch, n=2, max_new_tokens=5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    weight = torch.ones((), requires_grad=True)
    (weight * r.logprobs * r.response_mask).sum().backward()  # mul saves both operands for backward
    assert not any(t.is_inference() for t in (r.prompt_index, r.response_ids, r.response_mask, r.logprobs))


def test_texts_are_decoded_without_pad(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(1, seed=2))
    r = sample(model, batch, n=2, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(0),
               tokenizer=processor.tokenizer)
    for row, text in enumerate(r.texts):
        kept = r.response_ids[row][r.response_mask[row].bool()]
        assert text == processor.tokenizer.decode(kept, skip_special_tokens=True)


def test_top_k_one_is_greedy(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=4))
    greedy = sample(model, batch, n=1, max_new_tokens=8, temperature=0, eos_ids=[-1]).response_ids
    topk = sample(model, batch, n=1, max_new_tokens=8, temperature=1.0, top_k=1, eos_ids=[-1],
                  generator=torch.Generator().manual_seed(0)).response_ids
    assert torch.equal(greedy, topk)


@pytest.mark.parametrize("top_k, top_p, kept", [(0, 1.0, [0, 1, 2, 3, 4]), (3, 1.0, [0, 1, 3]), (0, 0.8, [0, 1])])
def test_sample_next_draws_from_the_tempered_softmax_and_its_truncations(top_k, top_p, kept):
    """Frequencies over 40,000 seeded draws against the law by hand: softmax(logits / T) over the tokens top-k /
    top-p keep, renormalised; the suppressed id (5) never drawn. Worked case at T = 0.5: p = softmax([4, 2.6, 0.4,
    1.4, -2]) = (0.740, 0.183, 0.020, 0.055, 0.002); top-k 3 keeps ids 0, 1, 3; top-p 0.8 keeps 0 and 1 (the mass
    before 1 is 0.740 < 0.8) and drops 3, 2, 4 (0.923 >= 0.8 before 3)."""
    logits = torch.tensor([2.0, 1.3, 0.2, 0.7, -1.0, 3.0]).expand(40_000, -1)         # (B, V); id 5 is a placeholder
    token, logp = rollout.sample_next(logits, temperature=0.5, top_p=top_p, top_k=top_k,
                                      generator=torch.Generator().manual_seed(0), suppress=torch.tensor([5]))
    law = torch.zeros(6)
    law[kept] = torch.softmax(logits[0, kept] / 0.5, -1)
    freq = torch.bincount(token, minlength=6) / token.numel()
    assert torch.all((freq - law).abs() <= 4 * (law * (1 - law) / token.numel()).sqrt() + 1e-4), (freq, law)
    # The returned log-prob is the untruncated tempered policy's (what the training forward recomputes).
    full = torch.log_softmax(logits[0, :5] / 0.5, -1)
    assert torch.allclose(logp, full[token])


def test_sample_next_never_draws_a_dropped_token_when_a_uniform_draw_is_zero(monkeypatch):
    """torch.rand may return exactly 0 (2^-24 per float): E = -log 0 would be inf, p / E 0 for every token of a
    one-token nucleus, and argmax would fall on id 0, which top-k dropped. The draw is clamped off 0 instead."""
    logits = torch.tensor([[0.0, 5.0, 1.0]])                                            # (1, V)
    monkeypatch.setattr(torch, "rand", lambda size, generator=None, device=None: torch.zeros(size, device=device))
    token, _ = rollout.sample_next(logits, temperature=1.0, top_p=1.0, top_k=1, generator=None,
                                   suppress=torch.tensor([], dtype=torch.long))
    assert token.tolist() == [1]


def test_bad_arguments_raise(tiny):
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(1, seed=0))
    with pytest.raises(ValueError, match="top_p"):
        sample(model, batch, n=1, max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(model, batch, n=1, max_new_tokens=0)
    del batch["mm_token_type_ids"]
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        sample(model, batch, n=1, max_new_tokens=4)


@contextlib.contextmanager
def _keywords_ignored(model, *names):
    """Simulate a transformers release that no longer knows the keyword(s) `names` (as 5.40 drops
    `past_key_values`): every module whose forward takes a `cache` argument silently drops them from its keyword
    arguments, as an unknown keyword landing in `**kwargs` would be ignored."""
    wrapped = []
    for module in model.modules():
        if "cache" not in inspect.signature(module.forward).parameters:
            continue
        original = module.forward

        def forward(*args, _original=original, **kwargs):
            for name in names:
                kwargs.pop(name, None)
            return _original(*args, **kwargs)

        module.forward = forward
        wrapped.append(module)
    assert wrapped, "no module takes a cache argument: the simulation would test nothing"
    try:
        yield
    finally:
        for module in wrapped:
            del module.forward


def test_sampler_survives_the_removal_of_past_key_values(tiny):
    # transformers 5.40 removes the `past_key_values=` alias of `cache=`: the sampler must not depend on it.
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(3, seed=5))
    expected = _greedy_generate(model, batch, 12)
    with _keywords_ignored(model, "past_key_values"):
        ours = sample(model, batch, n=1, max_new_tokens=12, temperature=0, eos_ids=[-1])
    assert torch.equal(ours.response_ids, expected)


def test_a_cache_the_model_never_fills_raises_instead_of_decoding_wrong(tiny):
    # A future rename of the cache keyword must never decode silently with an empty cache.
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=5))
    with _keywords_ignored(model, "past_key_values", "cache"):
        with pytest.raises(RuntimeError, match="cache"):
            sample(model, batch, n=2, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(0))


def test_decode_writes_in_place_into_buffers_allocated_once(tiny, monkeypatch):
    # The static cache: every step writes into the same preallocated (B, H_kv, P + max_new - 1, D) buffers and
    # attends under the same preallocated mask; nothing is concatenated or reallocated per step.
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=1))
    seen = []
    original = rollout.StaticKVCache.update

    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = original(self, key, value, layer_idx, *args, **kwargs)
        seen.append((layer_idx, keys.data_ptr(), values.data_ptr(), tuple(keys.shape), self.mask.data_ptr()))
        return keys, values

    monkeypatch.setattr(rollout.StaticKVCache, "update", update)
    r = sample(model, batch, n=3, max_new_tokens=7, temperature=1.0, generator=torch.Generator().manual_seed(0),
               eos_ids=[-1])
    layers = model.config.text_config.num_hidden_layers
    assert len(seen) == 6 * layers, "one write per layer per decode step (the 7th token is never fed)"
    per_layer = {layer: {entry[1:] for entry in seen if entry[0] == layer} for layer in range(layers)}
    heads = model.config.text_config.num_key_value_heads
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    for layer, entries in per_layer.items():
        assert len(entries) == 1, f"layer {layer}: buffers moved or changed shape between steps: {entries}"
        assert next(iter(entries))[2] == (6, heads, batch["input_ids"].shape[1] + 6, head_dim)
    assert r.response_ids.shape == (6, 7)


def test_eager_attention_takes_the_additive_mask_and_equals_generate():
    # `eager` attention adds its mask to the scores (sdpa takes booleans): the sampler builds the right kind.
    model, processor = build_tiny(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)  # peaked logits, as conftest.sharpen does for the shared fixture
    model.set_attn_implementation("eager")
    batch = _prompts(processor, synthetic_examples(3, seed=5))
    ours = sample(model, batch, n=1, max_new_tokens=12, temperature=0, eos_ids=[-1])
    assert torch.equal(ours.response_ids, _greedy_generate(model, batch, 12))
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        sample(model, batch, n=1, max_new_tokens=4)


def test_compiled_decode_equals_generate_without_recompiling(tiny):
    # The one compiled test (compiling takes tens of seconds on a CPU): same tokens as generate, and every
    # decode step of a rollout reuses one graph (static shapes), so a recompile within the rollout is an error.
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=3))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        ours = sample(model, batch, n=1, max_new_tokens=8, temperature=0, eos_ids=[-1], compile=True)
    torch._dynamo.reset()
    assert torch.equal(ours.response_ids, _greedy_generate(model, batch, 8))


def test_measure_decode_reports_ratio_and_bandwidth_fraction(tiny):
    # The benchmark core the GPU acceptance script imports runs on a CPU too: same token count on both sides.
    model, processor = tiny
    batch = _prompts(processor, synthetic_examples(2, seed=0))
    r = measure_decode(model, batch, n=2, max_new_tokens=8, peak_gbps=10.0)
    assert r["rows"] == 4 and r["new_tokens"] == 8
    assert r["ratio"] == pytest.approx(r["ours_tok_s"] / r["generate_tok_s"])
    # Only the arithmetic is checked: the step time is (call - separately timed prefill) / 7, noisy on a busy CPU.
    assert r["hbm_fraction"] == pytest.approx(r["achieved_gbps"] / 10.0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    assert r["weight_gb"] * 1e9 == pytest.approx(weight_bytes)


def test_benchmark_builds_the_full_size_3b_architecture():
    # The GPU benchmark's model, built on the meta device: Qwen2.5-VL-3B-Instruct's published parameter count.
    model, _ = build_qwen25_vl_3b("meta")
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976
