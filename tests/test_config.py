"""Config loading: YAML + dotted overrides, unknown keys named with the nearest valid one, types checked."""

import re

import pytest

import train
from harmo_min.config import load_config, parse_overrides


def _load(path=None, overrides=()):
    return load_config(path, list(overrides), defaults=train.GRPO_DEFAULTS, open_keys=train.OPEN_KEYS, rules=train.RULES)


def test_overrides_are_parsed_as_yaml_and_applied_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  n: 4\noptim:\n  lr: 1e-5\n")
    cfg = _load(path, ["rollout.n=8", "reward.weights.length=0.5", "data.kinds=[count, colour]"])
    assert cfg["rollout"]["n"] == 8 and cfg["optim"]["lr"] == 1e-5  # YAML 1.1's "1e-5" string becomes a float
    assert cfg["reward"] == {"weights": {"length": 0.5}} and cfg["data"]["kinds"] == ["count", "colour"]
    assert cfg["rollout"]["max_new_tokens"] == train.GRPO_DEFAULTS["rollout"]["max_new_tokens"]
    assert parse_overrides(["a.b=null"]) == {"a": {"b": None}}


def test_unknown_key_names_the_nearest_valid_key(tmp_path):
    with pytest.raises(ValueError, match=r"command line: unknown config key 'rollout.nn' \(did you mean 'rollout.n'\?\)"):
        _load(None, ["rollout.nn=8"])
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  clip_hihg: 0.3\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown config key 'grpo.clip_hihg' \(did you mean 'grpo.clip_high'\?\)"):
        _load(path)


def test_wrong_types_and_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="rollout.n: expected int, got str"):
        _load(None, ["rollout.n=eight"])
    with pytest.raises(ValueError, match="override 'rollout.n'"):
        _load(None, ["rollout.n"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        _load(bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        _load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("override,key", [
    ("grpo.aggregation=mean", "grpo.aggregation"), ("rollout.n=1", "rollout.n"), ("model.compute_dtype=fp8", "model.compute_dtype"),
    # issue 11: each of these used to fail only after the model loaded (or never)
    ("rollout.temperature=-1", "rollout.temperature"), ("rollout.top_p=0", "rollout.top_p"),
    ("data.answer_format=foo", "data.answer_format"), ("optim.lr=-1e-3", "optim.lr"), ("train.log_every=0", "train.log_every"),
    ("model.path=null", "model.path"), ("grpo.kl_coef=-1", "grpo.kl_coef"), ("optim.warmup_steps=-5", "optim.warmup_steps"),
    # issue 10: grad_clip 0 zeroed every gradient silently
    ("optim.grad_clip=0", "optim.grad_clip"), ("grpo.kl_estimator=k4", "grpo.kl_estimator"),
])
def test_bad_values_are_named_with_their_key_before_any_model_loads(override, key, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error")
    monkeypatch.setattr(train, "load_model_sharded", no_model)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train.main(["--config", "tests/configs/fast.yaml", override])


def test_world_size_and_reward_section_are_checked_before_any_model_loads():
    for overrides, key in [(["reward.weights.lenght=1"], "reward.weights.lenght"), (["grpo.prompts_per_step=3"], "prompts_per_step")]:
        with pytest.raises(ValueError, match=key):
            train.check_config(_load(None, overrides), world_size=2)


def test_shipped_configs_are_valid():
    for name, world in [("tiny", 1), ("qwen2_5_vl_3b", 8), ("qwen2_5_vl_7b", 8)]:
        train.check_config(_load(f"configs/{name}.yaml"), world_size=world)


def test_flags_may_follow_the_overrides():
    from harmo_min.config import parse_run_args

    args = parse_run_args(["--config", "x.yaml", "a.b=1", "--overwrite", "c=2"], description="", default_config="d")
    assert args.overwrite and args.overrides == ["a.b=1", "c=2"] and args.config == "x.yaml"


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=1", "optim.lr.x=2"], "override 'optim.lr.x=2': optim.lr is a value (set by an earlier override), "
                                     "not a section"),
    (["rollout.n=[1,"], "override 'rollout.n=[1,': not a YAML value"),
])
def test_overrides_that_cannot_be_read_are_named(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_overrides(overrides)
