"""train.py end to end on the tiny model: learning, reward-model routing, precision, and the run's bookkeeping
(resume, logged LR, dropped groups, run_dir protection, prepared stages)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import train
from harmo_min.model import build_tiny
from harmo_min.rollout import sample

FAST = "tests/configs/fast.yaml"


def _run(run_dir, *overrides, resume=False):
    return train.main(["--config", FAST, f"run_dir={run_dir}", *overrides] + (["--resume"] if resume else []))


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(folder):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict()


def test_tiny_grpo_run_learns_the_colour_task(tmp_path):
    # One-token colour names from random weights (8 prompts x 16 responses): a clear rise from ~0 within 25 steps.
    # Over seeds 0-4 the mean of steps 21-25 was 0.175-0.375 at this lr (at lr 1e-2: 0.055-0.33, too seed-dependent).
    _run(tmp_path, "rollout.n=16", "rollout.max_new_tokens=1", "grpo.prompts_per_step=8", "grpo.micro_batch_size=64",
         "data.n_train=512", "train.steps=25", "train.sample_every=5", "train.export=true", "optim.lr=2e-2")
    metrics = _metrics(tmp_path)
    accuracy = [m["accuracy"] for m in metrics]
    assert len(metrics) == 25
    assert sum(accuracy[:3]) / 3 <= 0.05, accuracy  # random policy: right once in ~500 samples
    assert sum(accuracy[-5:]) / 5 >= 0.12, accuracy  # found the colour words, starts reading the image
    for key in ("reward/total", "reward/accuracy", "response_length", "length/correct", "length/wrong", "kl",
                "clip_frac", "loss", "grad_norm", "step_time_s", "tokens_per_s", "route/rule", "lr", "entropy",
                "time/rollout", "time/rewards", "time/update", "time/optimizer", "memory/peak_gb"):
        assert key in metrics[-1], key
    assert (tmp_path / "final" / "model.safetensors").is_file()
    sample_line = json.loads((tmp_path / "samples" / "step_000025_rank0.jsonl").read_text().splitlines()[0])
    assert {"prompt", "response", "gold", "total", "accuracy", "route"} <= set(sample_line)


def test_open_items_are_routed_to_a_configured_reward_model(tmp_path):
    from harmo_min.reward_model import HeadConfig, RewardModel

    backbone, processor = build_tiny(seed=3)
    RewardModel(backbone, processor, HeadConfig(aspects=["score"], gate="fixed")).save_pretrained(tmp_path / "rm")
    _run(tmp_path / "run", "train.steps=2", f"reward_model.path={tmp_path / 'rm'}", "data.kinds=[colour, describe]",
         "grpo.prompts_per_step=8")
    last = _metrics(tmp_path / "run")[-1]
    # 8 shuffled prompts, colour (rule) or describe (open -> reward model), 4 responses each: whole groups per route.
    assert last["route/rule"] + last["route/model"] == 8 * 4 and last["route/none"] == 0
    assert last["route/rule"] % 4 == 0 and last["route/model"] % 4 == 0 and last["route/model"] > 0
    assert 0.0 < last["reward/accuracy"] < 1.0 and "time/reward_model" in last  # sigmoid of real scores


@pytest.mark.parametrize("source,expect", [("rule", {"rule": 12, "none": 20, "model": 0}),  # 3 colour, 5 describe
                                           ("model", {"rule": 0, "none": 0, "model": 32})])
def test_single_source_accuracy_ablations_route_every_response_as_configured(tmp_path, source, expect, monkeypatch):
    from harmo_min.reward_model import HeadConfig, RewardModel

    backbone, processor = build_tiny(seed=3)
    RewardModel(backbone, processor, HeadConfig(aspects=["score"], gate="fixed")).save_pretrained(tmp_path / "rm")
    if source == "rule":  # the paper's rule-only arm: the reward model is never loaded, open items get 0
        monkeypatch.setattr(train, "load_scorer", lambda *a, **k: pytest.fail("rule-only loaded the reward model"))
    _run(tmp_path / "run", "train.steps=1", f"reward_model.path={tmp_path / 'rm'}", "data.kinds=[colour, describe]",
         "grpo.prompts_per_step=8", f"reward.accuracy_source={source}")
    last = _metrics(tmp_path / "run")[-1]
    assert {k: last[f"route/{k}"] for k in expect} == expect
    with pytest.raises(ValueError, match="reward_model.path"):
        _run(tmp_path / "bad", "reward.accuracy_source=model")


@pytest.fixture
def fixed_update(monkeypatch):
    """Greedy rollouts and advantages linspace(-1, 1): every step has a gradient, whatever the random policy says."""
    monkeypatch.setattr(train, "sample", lambda model, prompts, **kw: sample(model, prompts, **{**kw, "temperature": 0}))
    monkeypatch.setattr(train, "group_advantages", lambda total, n, scale_std=False: torch.linspace(-1, 1, len(total)))


def test_bf16_compute_keeps_fp32_master_weights_so_lr_1e6_updates_every_weight(tmp_path, fixed_update):
    """The 3B recipe's AdamW step at lr 1e-6 is below half a bf16 ulp for most weights: with bf16 master weights
    (the old `model.dtype: bfloat16`) 20-50 steps changed ~2 % of matrix elements and no norm weight."""
    _run(tmp_path, "model.compute_dtype=bfloat16", "optim.lr=1e-6", "optim.beta2=0.99", "train.steps=2",
         "train.export=true", "train.export_dtype=float32")
    before, after = build_tiny(0)[0].state_dict(), _weights(tmp_path / "final")
    matrices = [k for k, v in before.items() if v.dim() >= 2 and "visual" not in k]
    norms = [k for k in before if "norm" in k and "visual" not in k]
    changed = lambda keys: sum(int((after[k] != before[k]).sum()) for k in keys) / sum(before[k].numel() for k in keys)
    assert changed(matrices) > 0.95 and changed(norms) > 0.95, (changed(matrices), changed(norms))


def test_a_step_whose_groups_were_all_dropped_does_not_step_the_optimizer(tmp_path, fixed_update):
    """Dynamic sampling masked every group: AdamW must not step on its stale momentum from the step before."""
    _run(tmp_path, "train.steps=1", "train.save_every=1", "train.export=true")  # one real step: momentum
    step1 = _weights(tmp_path / "final")
    # Describe items without a reward model: accuracy 0 everywhere, every group has zero accuracy variance.
    _run(tmp_path, "train.steps=2", "train.export=true", "grpo.drop_zero_variance_groups=true",
         "data.kinds=[describe]", resume=True)
    step2 = _weights(tmp_path / "final")
    assert _metrics(tmp_path)[-1]["skipped_step"] == 1.0
    assert max((step2[k] - step1[k]).abs().max().item() for k in step1) == 0


def test_logged_lr_is_the_rate_the_step_used(tmp_path):
    _run(tmp_path, "optim.lr=1e-3", "optim.warmup_steps=4", "train.steps=2")
    assert [m["lr"] for m in _metrics(tmp_path)] == pytest.approx([0.25e-3, 0.5e-3])


def test_resume_rewrites_the_steps_after_the_checkpoint_instead_of_repeating_them(tmp_path):
    _run(tmp_path, "train.steps=3", "train.save_every=2")  # checkpoint at 2, metrics written through 3
    _run(tmp_path, "train.steps=4", "train.save_every=2", resume=True)
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3, 4]


def test_a_fresh_run_refuses_a_run_dir_holding_an_earlier_run(tmp_path):
    _run(tmp_path, "train.steps=3", "train.save_every=2")
    with pytest.raises(FileExistsError, match=r"already holds \['checkpoints', 'metrics.jsonl'.*--resume.*--overwrite"):
        _run(tmp_path, "train.steps=1")
    (tmp_path / "notes.txt").write_text("mine")
    train.main(["--config", FAST, f"run_dir={tmp_path}", "train.steps=1", "--overwrite"])
    assert [m["step"] for m in _metrics(tmp_path)] == [1] and not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files are deleted


def test_grad_clip_null_trains_without_clipping(tmp_path):
    _run(tmp_path, "optim.grad_clip=null", "train.steps=1")
    assert _metrics(tmp_path)[0]["grad_norm"] >= 0


def test_prepare_builds_a_missing_model_folder_once_then_reuses_it(tmp_path):
    script = tmp_path / "make_model.py"
    script.write_text("import sys\nfrom harmo_min.model import build_tiny\n"
                      "model, processor = build_tiny(0)\nmodel.save_pretrained(sys.argv[1])\n"
                      "processor.save_pretrained(sys.argv[1])\nprint('built')\n")
    folder = tmp_path / "policy"
    args = [f"model.path={folder}", f"model.prepare={script} {folder}", "train.steps=1"]
    _run(tmp_path / "a", *args)
    assert (folder / "config.json").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    _run(tmp_path / "b", *args)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # cached: not rebuilt
    with pytest.raises(FileNotFoundError, match="did not create"):
        _run(tmp_path / "c", f"model.path={tmp_path / 'nowhere'}", f"model.prepare={script} {tmp_path / 'elsewhere'}")


def test_bf16_export_says_bf16_and_stores_the_tied_embedding_once(tmp_path):
    """Found by the full-width rehearsal: config.json claimed float32 (the master weights' dtype) and the tied
    lm_head was written as a second copy of the embedding (622 MB extra at 3B)."""
    from safetensors import safe_open

    _run(tmp_path, "train.steps=1", "train.export=true", "train.export_dtype=bfloat16")
    folder = tmp_path / "final"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_kl_in_reward_moves_the_penalty_out_of_the_loss(tmp_path, monkeypatch):
    """`grpo.kl_in_reward` (grpo.py: "the penalty moves out of the loss into the reward instead") must not also
    leave β·k(estimator) in the loss: the update would then pay the KL twice. The reward side is checked too: the
    advantages see R − β Σ_t k1, so the total reward the step logs is lower than without a reference."""
    seen = []
    real_loss = train.grpo_loss
    monkeypatch.setattr(train, "grpo_loss", lambda *a, **kw: seen.append(kw["kl_coef"]) or real_loss(*a, **kw))
    real_advantages = train.group_advantages
    totals = []
    monkeypatch.setattr(train, "group_advantages",
                        lambda total, n, scale_std=False: totals.append(total.clone()) or real_advantages(total, n))
    _run(tmp_path, "grpo.kl_in_reward=true", "grpo.kl_coef=0.5", "train.steps=2")
    assert seen and set(seen) == {0.0}
    logged = [m["reward/total"] for m in _metrics(tmp_path)]
    # step 1: policy == reference, k1 = 0 exactly; step 2: the policy moved (lr 1e-2), the sampled k1 sums are
    # not all zero, so some reward handed to the advantage differs from the logged (unpenalised) total.
    assert totals[0].mean().item() == pytest.approx(logged[0], abs=1e-4)
    assert not torch.allclose(totals[1].mean(), torch.tensor(logged[1]))


def test_an_empty_synthetic_task_list_is_a_config_error_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_model_sharded", lambda *a, **kw: pytest.fail("a model loaded"))
    with pytest.raises(ValueError, match=r"data.kinds: no synthetic task kinds; expected some of \['count'"):
        _run(tmp_path, "data.kinds=[]")  # was ZeroDivisionError in synthetic_examples
