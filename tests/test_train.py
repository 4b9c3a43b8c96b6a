"""End to end: train.py's GRPO loop on the tiny model must visibly learn (catches sign, mask, normaliser bugs)."""

import json

import train


def test_tiny_grpo_run_learns_the_colour_task(tmp_path):
    # The README's task and model on a smaller budget, with a larger constant step size (pinned here, not inherited
    # from tiny.yaml, whose schedule is tuned for its 200 steps): a clear rise from ~0 within 25 steps.
    train.main(["--config", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=25", "optim.lr=1.0e-2",
                "optim.schedule=constant", "optim.warmup_steps=0", "grpo.kl_coef=0.0", "train.sample_every=5"])
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accuracy = [m["accuracy"] for m in metrics]
    assert len(metrics) == 25
    assert sum(accuracy[:3]) / 3 <= 0.05, accuracy  # random policy: right once in ~500 samples
    assert sum(accuracy[-5:]) / 5 >= 0.15, accuracy  # found the colour words, starts reading the image
    for key in ("reward/total", "reward/accuracy", "response_length", "kl", "clip_frac", "loss", "grad_norm",
                "step_time_s", "tokens_per_s", "route/rule", "lr", "entropy"):
        assert key in metrics[-1], key
    assert (tmp_path / "final" / "model.safetensors").is_file()
    sample = json.loads((tmp_path / "samples" / "step_000025_rank0.jsonl").read_text().splitlines()[0])
    assert {"prompt", "response", "gold", "total", "accuracy", "route"} <= set(sample)


def test_open_items_are_routed_to_a_configured_reward_model(tmp_path):
    from harmo_min.model import build_tiny
    from harmo_min.reward_model import RewardConfig, RewardModel

    backbone, processor = build_tiny(seed=3)
    RewardModel(backbone, processor, RewardConfig(aspects=["score"], gate="fixed")).save_pretrained(tmp_path / "rm")
    train.main(["--config", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", "train.steps=2", "train.export=false",
                f"reward_model.path={tmp_path / 'rm'}", "data.kinds=[colour, describe]", "grpo.kl_coef=0.0"])
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # 8 shuffled prompts, colour (rule) or describe (open -> reward model), 16 responses each: whole groups per route.
    assert last["route/rule"] + last["route/model"] == 8 * 16 and last["route/none"] == 0
    assert last["route/rule"] % 16 == 0 and last["route/model"] % 16 == 0 and last["route/model"] > 0
    assert 0.0 < last["reward/accuracy"] < 1.0  # sigmoid of real model scores, not a constant
