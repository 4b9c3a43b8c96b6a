"""The memory plan (harmo_min/memory.py) against what the tiny model really allocates and saves, and the shipped
3B / 7B configs against the margin their comments state."""

import re
from pathlib import Path

import pytest
import torch

import train
from harmo_min import memory
from harmo_min.config import load_config
from harmo_min.data import encode_prompts
from harmo_min.distributed import apply_fsdp, cleanup, gathered_params, init_distributed
from harmo_min.grpo import token_logprobs, training_inputs
from harmo_min.model import build_tiny
from harmo_min.rollout import StaticKVCache, decode_one, prefill, sample
from harmo_min.synthetic import synthetic_examples

ROOT = Path(__file__).resolve().parents[1]


def _cfg(path="configs/tiny.yaml", *overrides):
    # configs/tiny.yaml trains a prepared warm-up policy with the tiny architecture; plan the architecture itself
    tiny = ["model.path=tiny", "reward_model.path=null"] if path == "configs/tiny.yaml" else []
    return load_config(ROOT / path, tiny + list(overrides), defaults=train.GRPO_DEFAULTS, open_keys=train.OPEN_KEYS,
                       rules=train.RULES)


def _row(plan, prefix):
    (n,) = [n for what, n, _ in plan.rows if what.startswith(prefix)]
    return n


@pytest.fixture(scope="module")
def arch():
    return memory.Arch.of("tiny", "model.path")


def test_parameters_gradients_and_adamw_state_match_real_tensors_after_a_step(arch):
    model, processor = build_tiny(0)
    prompts = encode_prompts(processor, synthetic_examples(2, seed=0))
    model.train()
    model(**prompts).logits.float().square().mean().backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    plan = memory.plan(_cfg(), world_size=1)
    assert arch.params * 4 == params == _row(plan, "master weights")
    assert grads == _row(plan, "gradients")  # every parameter gets a gradient, the vision tower's too
    assert state == _row(plan, "AdamW state")


def test_rollout_weights_are_one_full_compute_dtype_copy_under_fsdp2(arch):
    world = init_distributed("cpu")  # a world of one: FSDP2 still wraps it when compute and master dtypes differ
    try:
        model = apply_fsdp(build_tiny(0)[0], world, compute_dtype=torch.bfloat16)
        with gathered_params(model):
            gathered = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    finally:
        cleanup()
    cfg = _cfg("configs/tiny.yaml", "model.compute_dtype=bfloat16")
    assert sum(gathered.values()) == arch.params * 2 == _row(memory.plan(cfg, world_size=1), "rollout weights")
    # grpo.share_prompt holds the same full copy through the update (distributed.unsharded), in place of two units
    shared = _cfg("configs/tiny.yaml", "model.compute_dtype=bfloat16", "grpo.share_prompt=true")
    held = _row(memory.plan(shared, world_size=1), "all weights gathered")
    units = _row(memory.plan(cfg, world_size=1), "FSDP units gathered")
    assert held - units == 2 * (arch.params - arch.root - 2 * max(arch.vision, arch.layer))


def test_kv_cache_bytes_match_a_real_cache_after_prefill_and_decode(arch):
    model, processor = build_tiny(0)
    model = model.to(torch.bfloat16)
    prompts = encode_prompts(processor, synthetic_examples(3, seed=0))
    prompts["pixel_values"] = prompts["pixel_values"].to(torch.bfloat16)
    logits, deltas, prompt_cache = prefill(model, prompts)
    n, new_tokens = 2, 6
    cache = StaticKVCache(prompt_cache, prompts["attention_mask"], n=n, length=prompts["input_ids"].shape[1] + new_tokens,
                          boolean_mask=True)
    position = prompts["attention_mask"].sum(-1, keepdim=True).repeat_interleave(n, 0) + deltas.repeat_interleave(n, 0)
    for t in range(new_tokens):
        logits = decode_one(model, logits.argmax(-1).repeat_interleave(n, 0) if t == 0 else logits.argmax(-1),
                            position + t, cache)
    real = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    rows, positions = cache.mask.shape
    assert real == memory.kv_cache_bytes(arch, 2, rows=rows, positions=positions)


@pytest.fixture(scope="module")
def micro_batch():
    """A padded bf16 micro-batch: 3 image prompts of different lengths x 2 sampled responses, as train.py builds it."""
    model, processor = build_tiny(0)
    model = model.to(torch.bfloat16)
    examples = synthetic_examples(3, seed=0, kinds=("count", "arithmetic", "choice"))
    prompts = encode_prompts(processor, examples)
    prompts["pixel_values"] = prompts["pixel_values"].to(torch.bfloat16)
    rollout = sample(model, prompts, n=2, max_new_tokens=10, generator=torch.Generator().manual_seed(0))
    x = training_inputs(prompts, [1, 1, 1], rollout, torch.arange(6))
    assert x["attention_mask"].min() == 0  # padded: SDPA gets a mask, as in training
    return model, x


def _saved(model, x, checkpointing: bool):
    """Bytes of the distinct non-parameter tensors the training forward keeps for backward: what autograd saves
    (saved_tensors_hooks) plus, with checkpointing, every tensor handed to a checkpointed block (kept to recompute it).
    Also returns the bytes first saved inside each text decoder layer, and the logits TokenLogProb saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, region, per_layer, logits = {}, ["outside"], {}, []

    def keep(t, where):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() not in seen:
            seen[s.data_ptr()] = s.nbytes()
            per_layer[where] = per_layer.get(where, 0) + s.nbytes()
            if t.dim() == 2 and t.shape[-1] == model.config.text_config.vocab_size:
                logits.append(s.nbytes())
        return t

    def block_inputs(module, args, kwargs):
        for v in list(args) + list(kwargs.values()):
            for t in v if isinstance(v, tuple) else (v,):
                if isinstance(t, torch.Tensor):
                    keep(t, "inputs")

    hooks = []
    for i, layer in enumerate(model.model.language_model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: region.__setitem__(0, f"layer{i}")))
        hooks.append(layer.register_forward_hook(lambda m, a, o: region.__setitem__(0, "outside")))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for block in list(model.model.language_model.layers) + list(model.model.visual.blocks):
            hooks.append(block.register_forward_pre_hook(block_inputs, with_kwargs=True))
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: keep(t, region[0]), lambda t: t):
            token_logprobs(model, x)
    finally:
        for h in hooks:
            h.remove()
        model.activation_checkpointing_disable()
    return sum(seen.values()), per_layer, sum(logits)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_activation_and_logits_bytes_match_what_autograd_keeps(arch, micro_batch, checkpointing):
    model, x = micro_batch
    (b, seq), resp, patches = x["input_ids"].shape, x["response_ids"].shape[1], x["pixel_values"].shape[0]
    vocab, c = model.config.text_config.vocab_size, 2
    measured, per_layer, logits = _saved(model, x, checkpointing)
    assert logits == b * resp * vocab * c  # TokenLogProb keeps one model-dtype copy of the response logits
    # The plan counts it twice: in backward the kept logits and their gradient are alive together.
    assert memory.logits_bytes(arch, c, rows=b, resp=resp) == 2 * logits + 4 * b * resp * vocab * 4
    planned = memory.activation_bytes(arch, c, rows=b, seq=seq, resp=resp, patches=patches, checkpointing=checkpointing)
    s = memory.saved_bytes(arch, c, seq)
    if checkpointing:  # one block at a time is recomputed in backward: not held after the forward
        planned -= max(b * seq * s["a"], patches * s["a_v"])
    else:  # one decoder layer saves exactly a bytes per token (layer 0 also holds the shared cos/sin)
        assert per_layer["layer1"] == b * seq * s["a"]
    assert measured - logits == pytest.approx(planned, rel=0.01)


def test_the_shipped_configs_fit_8_gpus_of_80_gb_with_the_margin_they_state():
    for name in ("configs/qwen2_5_vl_3b.yaml", "configs/qwen2_5_vl_7b.yaml"):
        text = (ROOT / name).read_text()
        stated = re.search(r"--plan --nproc 8\): margin >= (\d+) GB; with a\W+Skywork-VL-Reward-7B scorer >= (\d+) GB",
                           text)
        assert stated, f"{name}: the comment stating the plan's margin is missing"
        alone = memory.plan(_cfg(name), world_size=8, gpu_gb=80)
        scored = memory.plan(_cfg(name, "reward_model.path=/data/Skywork-VL-Reward-7B"), world_size=8, gpu_gb=80)
        assert alone.margin_gb >= int(stated.group(1)) and scored.margin_gb >= int(stated.group(2)), name
        assert scored.margin_gb >= 0.1 * 80, "keep 10 % spare for the CUDA context and fragmentation"


def test_train_plan_prints_the_table_and_loads_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    out = train.main(["--config", "configs/qwen2_5_vl_3b.yaml", "--plan", "--nproc", "8", f"run_dir={run_dir}"])
    table = capsys.readouterr().out
    assert out == [] and not run_dir.exists()
    assert "Qwen2.5-VL-3B-Instruct (public architecture: /data/Qwen2.5-VL-3B-Instruct not found)" in table
    assert re.search(r"KV cache \(128 rows x 2048 positions\)\s+9\.00", table) and "margin" in table


def test_plan_reads_config_json_alone_and_names_a_missing_path(tmp_path, arch):
    model, _ = build_tiny(0)
    model.config.save_pretrained(tmp_path)  # config.json only: no weights, no tokenizer
    assert memory.Arch.of(str(tmp_path), "model.path").params == arch.params
    with pytest.raises(FileNotFoundError, match=r"model.path=/nowhere/policy: no config.json"):
        memory.plan(_cfg("configs/tiny.yaml", "model.path=/nowhere/policy", "model.prepare=null"), world_size=1)
    with pytest.raises(ValueError, match=r"grpo.prompts_per_step=8 is not divisible by 3 rank"):
        memory.plan(_cfg(), world_size=3)


def test_plan_of_a_config_whose_stage_is_not_built_yet_names_the_prepare_command(tmp_path):
    missing = tmp_path / "warmup" / "final"
    with pytest.raises(FileNotFoundError, match=r"model.path=.*final does not exist yet: model.prepare builds it "
                                                r"\(`python warmup.py --config configs/tiny_warmup.yaml"):
        memory.plan(load_config(ROOT / "configs/tiny.yaml", [f"model.path={missing}"], defaults=train.GRPO_DEFAULTS,
                                open_keys=train.OPEN_KEYS, rules=train.RULES), world_size=1)
