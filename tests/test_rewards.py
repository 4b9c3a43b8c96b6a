"""Tests of the multi-aspect reward combiner (harmo_min/rewards.py): exact numbers on hand-computed groups."""

from __future__ import annotations

import dataclasses
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from harmo_min import rewards as R
from harmo_min.verifier import Verdict, answer_block, extract_answer, last_boxed

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass
class Ex:
    """The attributes of data.Example that the combiner reads (data.py itself is not imported)."""
    id: str = "ex"
    answer: str | None = "4"
    choices: list[str] | None = None
    task: str = "verifiable"
    constraints: list[dict] = field(default_factory=list)


def V(correct: bool, confidence: float = 1.0, reason: str = "test") -> Verdict:
    return Verdict(correct=correct, confidence=confidence, pred=None, reason=reason)


def config(d: dict | None = None, answer_format: str = "think_answer") -> R.RewardConfig:
    return R.RewardConfig.from_dict(d, answer_format=answer_format)


def score(ex, responses, *, lengths=None, finish=None, cfg=None, **kw) -> R.GroupRewards:
    n = len(responses)
    return R.score_group(ex, responses, lengths=lengths or [10] * n, finish_reasons=finish or ["eos"] * n,
                         cfg=cfg or R.RewardConfig(), **kw)


GOOD = "<think>\nstep 1\nstep 2\n</think>\n<answer>\n4\n</answer>"


@pytest.fixture
def scratch_aspects():
    """Aspects registered inside a test are removed afterwards, so the registry stays as the module built it."""
    before = set(R.ASPECTS)
    yield
    for name in set(R.ASPECTS) - before:
        del R.ASPECTS[name]


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch, scratch_aspects):
    """A folder on sys.path for plugin modules; the modules imported from it are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n, m in sys.modules.items() if str(tmp_path) in str(getattr(m, "__file__", None))]:
        del sys.modules[name]


# ---------------------------------------------------------------------------------------------------- config
def test_defaults_follow_design():
    cfg = config({})
    assert cfg.weights == {"accuracy": 1.0, "format": 0.1, "instruction": 0.1, "length": 1.0, "overlong": 0.0}
    assert (cfg.combine, cfg.answer_format, cfg.accuracy_requires_format) == ("sum_then_normalize", "think_answer",
                                                                              False)
    assert (cfg.accuracy_source, cfg.plugins) == ("hybrid", ())
    assert (cfg.min_confidence, cfg.rm_temperature, cfg.correct_threshold) == (0.5, 1.0, 0.5)
    assert (cfg.length_p_max, cfg.length_tau, cfg.overlong_max_len, cfg.overlong_buffer) == (0.5, 0.5, None, 0)
    assert (cfg.verifier_timeout_s, cfg.workers) == (1.0, 0)
    assert config(None) == cfg == R.RewardConfig()


def test_from_dict_overrides_weights_one_by_one():
    cfg = config({"weights": {"length": 0.0, "overlong": 0.5}, "combine": "normalize_then_sum"})
    assert cfg.weights == {"accuracy": 1.0, "format": 0.1, "instruction": 0.1, "length": 0.0, "overlong": 0.5}
    assert cfg.combine == "normalize_then_sum"


@pytest.mark.parametrize("d, message", [
    ({"weights": {"lenght": 1.0}}, "reward.weights.lenght: unknown aspect 'lenght' (did you mean 'length'?)"),
    ({"rm_temperatur": 1.0}, "reward.rm_temperatur: unknown key (did you mean 'rm_temperature'?)"),
    ({"rm_temperature": -1.0}, "reward.rm_temperature: must be a number > 0, got -1.0"),
    ({"rm_temperature": 0}, "reward.rm_temperature: must be a number > 0, got 0"),
    ({"weights": {"accuracy": 0, "format": 0, "instruction": 0, "length": 0}}, "reward.weights: all weights are zero"),
    ({"weights": {"format": float("nan")}}, "reward.weights.format: must be a number"),
    ({"weights": {"format": True}}, "reward.weights.format: must be a number"),
    ({"weights": [1, 2]}, "reward.weights: must be a mapping"),
    ({"combine": "sum_then_normalise"}, "reward.combine: 'sum_then_normalise' is not one of"),
    ({"format": "boxed"}, "reward.format: not a reward key; the answer format (and so the format checked) is "
                          "data.answer_format, one of ('think_answer', 'boxed', 'bare')"),
    ({"answer_format": "boxed"}, "reward.answer_format: not a reward key"),
    ({"accuracy_source": "rules"}, "reward.accuracy_source: 'rules' is not one of ('hybrid', 'rule', 'model') "
                                   "(did you mean 'rule'?)"),
    ({"plugins": "my_rewards"}, "reward.plugins: must be a list of module names, got 'my_rewards'"),
    ({"plugins": ""}, "reward.plugins: must be a list of module names, got ''"),  # not the default list
    ({"weights": []}, "reward.weights: must be a mapping of aspect name to weight, got []"),
    ({"plugins": ["harmo_min.verifier", ""]}, "reward.plugins[1]: must be a module name such as my_rewards"),
    ({"plugins": ["no_such_module_for_harmo"]}, "reward.plugins[0]: cannot import 'no_such_module_for_harmo' "
                                                "(ModuleNotFoundError: No module named 'no_such_module_for_harmo')"),
    ({"accuracy_requires_format": "false"}, "reward.accuracy_requires_format: must be true or false"),
    ({"min_confidence": 1.5}, "reward.min_confidence: must be a number in [0, 1]"),
    ({"correct_threshold": 0}, "reward.correct_threshold: must be a number in (0, 1]"),
    ({"length_p_max": -0.1}, "reward.length_p_max: must be a number ≥ 0"),
    ({"length_tau": 0.0}, "reward.length_tau: must be a number > 0"),
    ({"overlong_max_len": 0}, "reward.overlong_max_len: must be an integer > 0"),
    ({"overlong_max_len": 512.0}, "reward.overlong_max_len: must be an integer"),
    ({"overlong_buffer": -1}, "reward.overlong_buffer: must be an integer ≥ 0"),
    ({"overlong_max_len": 100, "overlong_buffer": 200}, "reward.overlong_buffer: 200 exceeds overlong_max_len 100"),
    ({"norm_eps": 0}, "reward.norm_eps: must be a number > 0"),
    ({"verifier_timeout_s": 0}, "reward.verifier_timeout_s: must be a number > 0"),
    ({"workers": -2}, "reward.workers: must be an integer ≥ 0"),
    ({"min_confidence": 10**400}, "reward.min_confidence: must be a number in [0, 1], got 1000"),  # no float holds it
    ({"weights": {"format": -10**400}}, "reward.weights.format: must be a number (finite), got -1000"),
    ("not a dict", "reward: must be a mapping"),
])
def test_config_errors_name_the_full_key(d, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(d)


def test_config_prefix_and_replace_are_validated():
    with pytest.raises(ValueError, match=re.escape("train.reward.weights.acuracy: unknown aspect 'acuracy' "
                                                   "(did you mean 'accuracy'?)")):
        R.RewardConfig.from_dict({"weights": {"acuracy": 1}}, answer_format="boxed", prefix="train.reward")
    with pytest.raises(ValueError, match="reward.length_tau"):
        dataclasses.replace(R.RewardConfig(), length_tau=-1)


def test_answer_format_is_data_answer_format():
    assert config({}, "boxed").answer_format == "boxed"
    assert config({"weights": {"format": 0}}, "bare").weights["format"] == 0
    with pytest.raises(ValueError, match=re.escape("reward.weights.format: must be 0 when data.answer_format is "
                                                   "bare (there is no format to check), got 0.1")):
        config({}, "bare")  # the default weight too: say so rather than reward a format nobody asked for
    with pytest.raises(ValueError, match=re.escape("reward.accuracy_requires_format: must be false when "
                                                   "data.answer_format is bare")):
        config({"weights": {"format": 0}, "accuracy_requires_format": True}, "bare")
    with pytest.raises(ValueError, match=re.escape("data.answer_format: 'xml' is not one of")):
        config({}, "xml")
    with pytest.raises(TypeError, match="answer_format"):
        R.RewardConfig.from_dict({})  # the trainer must say which format the prompts asked for


def test_resolve_fills_only_a_null_max_len():
    assert R.RewardConfig().resolve(256).overlong_max_len == 256
    assert R.RewardConfig(overlong_max_len=100).resolve(256).overlong_max_len == 100


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="aspect 'length' is already registered"):
        R.register_aspect("length")(lambda example, response, ctx: 0.0)


# ---------------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("response, expected", [
    (GOOD, 1.0),  # multi-line blocks: the regex must be DOTALL
    ("  <think></think><answer>B</answer>  \n", 1.0),  # empty reasoning is allowed, whitespace around is too
    ("<think>a</think> <answer>4</answer><answer>5</answer>", 0.0),  # duplicated answer tag
    ("<think>a</think><think>b</think><answer>4</answer>", 0.0),  # duplicated think tag
    ("<think>a <think> b</think><answer>4</answer>", 0.0),  # an unbalanced extra opening tag
    ("<think>a</think><answer>   </answer>", 0.0),  # empty answer
    ("<think>a</think>so<answer>4</answer>", 0.0),  # text between the blocks
    ("Sure! <think>a</think><answer>4</answer>", 0.0),  # text before
    ("<think>a</think><answer>4</answer> hope this helps", 0.0),  # text after
    ("<answer>4</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a</think>", 0.0),
    ("4", 0.0),
    ("<THINK>a</THINK>\n<Answer>4</Answer>", 1.0),  # any ASCII case, as the verifier reads the tags
    ("<think>a</think><answer>4</answer></answer>", 0.0),
    ("<think>a</think><answer>4<think>b</think></answer>", 0.0),  # a block inside the answer
])
def test_format_think_answer(response, expected):
    assert score(Ex(), [response], verdicts=[V(True)]).breakdown["format"] == [expected]


@pytest.mark.parametrize("response, expected", [
    ("so \\boxed{\\frac{1}{2}}", 1.0),
    ("first \\boxed{3}, then \\boxed{\\sqrt{4}} done", 1.0),
    ("\\boxed{\\frac{1}{2}", 0.0),  # unbalanced
    ("\\boxed{ }", 0.0),
    ("<think>a</think><answer>4</answer>", 0.0),
    ("The answer is \\fbox{5}.", 1.0),  # a box to the verifier is a box to the format check
    ("so \\boxed 5", 1.0),
    ("\\boxed{3} and a broken \\boxed{4", 0.0),  # the last box is malformed: no earlier box stands in
])
def test_format_boxed(response, expected):
    cfg = R.RewardConfig(answer_format="boxed")
    assert score(Ex(), [response], cfg=cfg, verdicts=[V(True)]).breakdown["format"] == [expected]


def test_format_and_accuracy_read_the_answer_with_one_parser():
    # Under answer_format boxed, "\fbox{5}" got accuracy 1 (the verifier's box) and format 0 (another parser's).
    cfg = R.RewardConfig(answer_format="boxed")
    out = score(Ex(answer="5"), ["The answer is \\fbox{5}.", "so \\boxed 5", "so \\boxed{5"], cfg=cfg)
    assert out.breakdown["accuracy"] == [1.0, 1.0, 0.0]
    assert out.breakdown["format"] == [1.0, 1.0, 0.0]


def test_instruction_checks_read_answer_tags_in_any_case():
    # The verifier found <ANSWER>…</ANSWER>; the instruction checks did not, and counted the tags as words.
    ex = Ex(constraints=[{"kind": "max_words", "value": 1}, {"kind": "must_not_include", "value": "answer"}])
    response = "<THINK>long reasoning here</THINK><ANSWER> four </ANSWER>"
    assert extract_answer(response) == "four"
    assert score(ex, [response], verdicts=[V(True)]).breakdown["instruction"] == [1.0]
    assert score(ex, ["<think>x</think> four <Think>a b c"], verdicts=[V(True)]).breakdown["instruction"] == [1.0]


AGREEMENT = [GOOD, "<THINK>a</THINK><ANSWER>B</ANSWER>", "<answer>1</answer><answer>2</answer>", "x \\fbox{3}",
             "\\boxed 7", "\\boxed{1} \\boxed{2", "<Answer>\\boxed{4}</ANSWER>", "<think>a</think><answer> </answer>",
             "no tags", "<answer>open"]


@pytest.mark.parametrize("response", AGREEMENT)
def test_format_instruction_and_verifier_agree_on_where_the_answer_is(response):
    block, box = answer_block(response), last_boxed(response)
    if R.format_ok(response, "think_answer"):  # format 1: the verifier and the instruction checks read that block
        assert block.strip() and R.visible_text(response) == block
    assert R.format_ok(response, "boxed") == bool(box and box.strip())
    if block is None and box and box.strip():  # format 1: the box is the answer the verifier reads
        assert extract_answer(response) == box.strip()


def test_format_ok_refuses_a_format_without_a_shape():
    with pytest.raises(ValueError, match="'bare' has no format to check"):
        R.format_ok("5", "bare")


# ---------------------------------------------------------------------------------------------------- constraints
@pytest.mark.parametrize("constraint, response, expected", [
    ({"kind": "max_words", "value": 3}, "<think>many many many many words</think><answer>one two three</answer>", 1),
    ({"kind": "max_words", "value": 3}, "<answer>one two three four</answer>", 0),
    ({"kind": "max_words", "value": 3}, "<think>long long long long</think> one two", 1),  # no answer tags
    ({"kind": "max_words", "value": 3}, "a b <think>unclosed reasoning goes on and on", 1),
    ({"kind": "min_words", "value": 5}, "<answer>a circle of radius two</answer>", 1),
    ({"kind": "min_words", "value": 5}, "<think>one two three four five six</think><answer>4</answer>", 0),
    ({"kind": "must_include", "value": "circle"}, "<answer>A CIRCLE.</answer>", 1),
    ({"kind": "must_include", "value": "circle"}, "<think>a circle?</think><answer>a square</answer>", 0),
    ({"kind": "must_not_include", "value": "As an AI"}, "<answer>as an ai, I think 4</answer>", 0),
    ({"kind": "must_not_include", "value": "As an AI"}, "<answer>4</answer>", 1),
    ({"kind": "answer_is_choice_letter"}, "<answer>B</answer>", 1),
    ({"kind": "answer_is_choice_letter"}, "<answer> (C) </answer>", 1),
    ({"kind": "answer_is_choice_letter"}, "<answer>D.</answer>", 1),
    ({"kind": "answer_is_choice_letter"}, "<answer>E</answer>", 0),  # only A-D exist
    ({"kind": "answer_is_choice_letter"}, "<answer>B) red</answer>", 0),
    ({"kind": "answer_is_choice_letter"}, "<answer>b</answer>", 0),
    ({"kind": "answer_is_choice_letter"}, "no answer at all", 0),
    ({"kind": "answer_is_number"}, "<answer>-2.5</answer>", 1),
    ({"kind": "answer_is_number"}, "<answer>1,000</answer>", 1),
    ({"kind": "answer_is_number"}, "<answer>$3/4$</answer>", 1),
    ({"kind": "answer_is_number"}, "<answer>\\frac{3}{4}</answer>", 1),
    ({"kind": "answer_is_number"}, "<answer>15%</answer>", 1),
    ({"kind": "answer_is_number"}, "<answer>3e8</answer>", 1),
    ({"kind": "answer_is_number"}, "<answer>x = 4</answer>", 0),
    ({"kind": "answer_is_number"}, "<answer>nan</answer>", 0),
    ({"kind": "language", "value": "en"}, "<answer>The shape is a red circle.</answer>", 1),
    ({"kind": "language", "value": "en"}, "<answer>这是一个红色的圆形。</answer>", 0),
    ({"kind": "language", "value": "zh"}, "<answer>设 x 为边长，则 x = 4，所以面积是十六。</answer>", 1),
    ({"kind": "language", "value": "zh"}, "<answer>The answer is 16.</answer>", 0),
    ({"kind": "language", "value": "ja"}, "<answer>答えは四です。</answer>", 1),
    ({"kind": "language", "value": "ru"}, "<answer>Ответ: четыре.</answer>", 1),
    ({"kind": "language", "value": "en"}, "<answer>42</answer>", 0),  # no letters: no evidence of any language
])
def test_each_constraint_kind(constraint, response, expected):
    ex = Ex(answer="B", choices=["red", "green", "blue", "yellow"], constraints=[constraint])
    assert score(ex, [response], verdicts=[V(False)]).breakdown["instruction"] == [float(expected)]


def test_instruction_is_the_fraction_satisfied_and_1_without_constraints():
    ex = Ex(constraints=[{"kind": "max_words", "value": 2}, {"kind": "must_include", "value": "four"},
                         {"kind": "answer_is_number"}])
    out = score(ex, ["<answer>4</answer>", "<answer>four</answer>", "<answer>it is four</answer>"],
                verdicts=[V(True)] * 3)
    assert out.breakdown["instruction"] == [2 / 3, 2 / 3, 1 / 3]
    assert score(Ex(), ["anything"], verdicts=[V(False)]).breakdown["instruction"] == [1.0]


def test_choice_letter_without_choices_accepts_any_capital():
    ex = Ex(answer="F", constraints=[{"kind": "answer_is_choice_letter"}])
    assert score(ex, ["<answer>F</answer>"], verdicts=[V(True)]).breakdown["instruction"] == [1.0]


@pytest.mark.parametrize("c, message", [
    ({"kind": "max_word", "value": 3}, "constraint.kind: unknown kind 'max_word' (did you mean 'max_words'?)"),
    ({"value": 3}, "constraint.kind: unknown kind None"),
    ({"kind": ["max_words"], "value": 3}, "constraint.kind: unknown kind ['max_words']"),
    ({"kind": "max_words"}, "constraint max_words.value: must be a non-negative integer, got None"),
    ({"kind": "max_words", "value": -1}, "constraint max_words.value: must be a non-negative integer, got -1"),
    ({"kind": "max_words", "value": "30"}, "constraint max_words.value: must be a non-negative integer"),
    ({"kind": "must_include", "value": ""}, "constraint must_include.value: must be a non-empty string"),
    ({"kind": "language", "value": "english"}, "constraint language.value: must be one of"),
    ({"kind": "language", "value": ["en"]}, "constraint language.value: must be one of"),
    ({"kind": "answer_is_number", "value": 1}, "constraint answer_is_number: unexpected key(s) ['value']"),
    ({"kind": "max_words", "value": 3, "max": 4}, "constraint max_words: unexpected key(s) ['max']"),
    (["max_words", 30], "constraint: must be a dict"),
])
def test_validate_constraint_errors(c, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        R.validate_constraint(c)


def test_every_documented_constraint_kind_exists_and_validates():
    for c in [{"kind": "max_words", "value": 30}, {"kind": "min_words", "value": 5},
              {"kind": "must_include", "value": "circle"}, {"kind": "must_not_include", "value": "x"},
              {"kind": "answer_is_choice_letter"}, {"kind": "answer_is_number"}, {"kind": "language", "value": "en"}]:
        R.validate_constraint(c)
    assert len(R.CONSTRAINT_KINDS) == 7


def test_a_malformed_constraint_in_an_example_raises_instead_of_scoring_zero():
    with pytest.raises(ValueError, match="max_words.value"):
        score(Ex(constraints=[{"kind": "max_words", "value": "many"}]), ["x"], verdicts=[V(False)])


# ---------------------------------------------------------------------------------------------------- length penalty
def test_length_penalty_exact_values():
    # Correct at 100 and 200 tokens: L* = 100, τ·L* = 50. The texts are deliberately unrelated to the token counts.
    verdicts = [V(True), V(True), V(False), V(False), V(False), V(False), V(False)]
    lengths = [200, 100, 75, 50, 10, 100, 150]
    out = score(Ex(), ["x"] * 7, lengths=lengths, verdicts=verdicts)
    assert out.breakdown["length"] == [0.0, 0.0, -0.25, -0.5, -0.5, 0.0, 0.0]
    #            correct never penalised ^    ^  25/50 ^  clamp ^  ^ at L* and above: 0


def test_length_penalty_uses_its_parameters():
    cfg = R.RewardConfig(length_p_max=1.0, length_tau=0.25)
    out = score(Ex(), ["x"] * 3, lengths=[100, 90, 70], cfg=cfg, verdicts=[V(True), V(False), V(False)])
    assert out.breakdown["length"] == pytest.approx([0.0, -0.4, -1.0])


def test_length_penalty_without_a_correct_response_is_zero():
    out = score(Ex(), ["x"] * 3, lengths=[5, 500, 50], verdicts=[V(False)] * 3)
    assert out.breakdown["length"] == [0.0, 0.0, 0.0]


def test_length_penalty_correct_threshold_applies_to_model_scores():
    # Open item, T = 1: sigmoid(1) ≈ 0.73 counts as correct, sigmoid(-1) ≈ 0.27 does not.
    out = score(Ex(answer=None, task="open"), ["a", "b"], lengths=[100, 40], model_scores=[1.0, -1.0])
    assert out.breakdown["length"] == [0.0, -0.5]
    cfg = R.RewardConfig(correct_threshold=0.8)
    out = score(Ex(answer=None, task="open"), ["a", "b"], lengths=[100, 40], model_scores=[1.0, -1.0], cfg=cfg)
    assert out.breakdown["length"] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------------- overlong
@pytest.mark.parametrize("length, finish, expected", [
    (0, "eos", 0.0), (79, "eos", 0.0), (80, "eos", 0.0), (90, "eos", -0.5), (99, "eos", -0.95),
    (100, "eos", -1.0), (100, "length", -1.0), (50, "length", -1.0), (120, "eos", -1.0),
])
def test_overlong_soft_punishment_boundaries(length, finish, expected):
    cfg = config({"weights": {"overlong": 1.0}, "overlong_max_len": 100, "overlong_buffer": 20})
    out = score(Ex(), ["x"], lengths=[length], finish=[finish], cfg=cfg, verdicts=[V(False)])
    assert out.breakdown["overlong"] == [pytest.approx(expected)]


def test_overlong_with_no_buffer_is_a_step_at_the_limit():
    cfg = config({"weights": {"overlong": 1.0}}).resolve(100)
    out = score(Ex(), ["x"] * 3, lengths=[99, 100, 100], finish=["eos", "eos", "length"], cfg=cfg,
                verdicts=[V(False)] * 3)
    assert out.breakdown["overlong"] == [0.0, -1.0, -1.0]


def test_overlong_switched_on_without_max_len_names_the_key():
    cfg = config({"weights": {"overlong": 1.0}})
    with pytest.raises(ValueError, match=r"reward\.overlong_max_len: null"):
        score(Ex(), ["x"], cfg=cfg, verdicts=[V(False)])
    assert "overlong" not in score(Ex(), ["x"], verdicts=[V(False)]).breakdown  # weight 0: off, not computed


# ---------------------------------------------------------------------------------------------------- routing
def test_routing_table_with_hand_made_verdicts():
    cfg = R.RewardConfig(min_confidence=0.7, rm_temperature=2.0)
    verdicts = [V(True, 1.0), V(False, 1.0), V(True, 0.6), V(True, 0.6), V(False, 0.0, "gold_unparseable"),
                V(False, 0.0, "timeout"), V(True, 0.0, "timeout")]
    scores = [None, 5.0, 2.0, None, -2.0, None, float("nan")]
    out = score(Ex(), ["x"] * 7, cfg=cfg, verdicts=verdicts, model_scores=scores)
    assert out.route == ["rule", "rule", "model", "rule_low_confidence", "model", "none", "none"]
    assert out.breakdown["accuracy"] == pytest.approx([1.0, 0.0, 1 / (1 + math.exp(-1)), 1.0,
                                                       1 / (1 + math.exp(1)), 0.0, 0.0])


def test_open_items_use_the_model_and_say_none_without_one():
    ex = Ex(answer=None, task="open")
    out = score(ex, ["a", "b", "c"], model_scores=[0.0, 1000.0, -1000.0])
    assert out.route == ["model"] * 3
    assert out.breakdown["accuracy"] == [0.5, 1.0, 0.0]  # the stable sigmoid neither overflows nor NaNs
    out = score(ex, ["a", "b"])
    assert out.route == ["none", "none"] and out.breakdown["accuracy"] == [0.0, 0.0]
    out = score(ex, ["a", "b"], model_scores=[None, float("inf")])
    assert out.route == ["none", "none"] and out.breakdown["accuracy"] == [0.0, 0.0]


def test_a_score_beyond_float_range_is_missing_not_a_crash():
    # 10**400 is a valid Python int that no float holds (it raised OverflowError); like inf, it is no usable score.
    out = score(Ex(answer=None, task="open"), ["a", "b", "c"], model_scores=[10**400, -10**400, 10**300])
    assert out.route == ["none", "none", "model"] and out.breakdown["accuracy"] == [0.0, 0.0, 1.0]
    out = score(Ex(), ["x"], verdicts=[V(True, 0.3)], model_scores=[10**400])
    assert out.route == ["rule_low_confidence"] and out.breakdown["accuracy"] == [1.0]


def test_accuracy_source_rule_ignores_the_reward_model():
    cfg = R.RewardConfig(accuracy_source="rule", min_confidence=0.7)
    verdicts = [V(True, 1.0), V(False, 1.0), V(True, 0.6), V(False, 0.0, "timeout")]
    out = score(Ex(), ["x"] * 4, cfg=cfg, verdicts=verdicts, model_scores=[-5.0, 5.0, -5.0, 5.0])
    assert out.route == ["rule", "rule", "rule_low_confidence", "none"]
    assert out.breakdown["accuracy"] == [1.0, 0.0, 1.0, 0.0]
    out = score(Ex(answer=None, task="open"), ["a", "b"], cfg=cfg, model_scores=[5.0, None])
    assert out.route == ["none", "none"] and out.breakdown["accuracy"] == [0.0, 0.0]


def test_accuracy_source_model_scores_every_item_with_the_reward_model(monkeypatch):
    cfg = R.RewardConfig(accuracy_source="model", rm_temperature=2.0)
    monkeypatch.setattr(R, "verify", None)  # the verifier must not run: calling it would raise TypeError
    out = score(Ex(answer="4"), [GOOD, "<answer>5</answer>", GOOD], cfg=cfg, model_scores=[2.0, -2.0, None])
    assert out.route == ["model", "model", "none"]
    assert out.breakdown["accuracy"] == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 0.0])
    examples, groups, lengths, finish, scores = _mixed_batch()
    batch = R.score_batch(examples, groups, lengths=lengths, finish_reasons=finish, model_scores=scores, cfg=cfg)
    assert [b.route for b in batch] == [["none", "none"], ["none", "none"], ["model", "model"]]


def test_task_is_inferred_from_the_answer_when_absent():
    @dataclass
    class Bare:
        id: str
        answer: str | None
    assert score(Bare("a", None), ["x"]).route == ["none"]
    assert score(Bare("b", "4"), ["x"], verdicts=[V(True)]).route == ["rule"]
    with pytest.raises(ValueError, match="task must be 'verifiable' or 'open'"):
        score(Ex(task="math"), ["x"], verdicts=[V(True)])


def test_real_verifier_routes_a_checkable_answer_by_rule():
    out = score(Ex(answer="4"), [GOOD, "<think>hmm</think><answer>5</answer>", "no final answer here"])
    assert out.route == ["rule"] * 3
    assert out.breakdown["accuracy"] == [1.0, 0.0, 0.0]


UNPARSEABLE_RESPONSES = ["<think>a</think><answer>??</answer>", "<answer></answer>", "?", "", GOOD,
                         "<answer>\\frac{1}{</answer>", "\\boxed{1"]


@pytest.mark.parametrize("gold", ["", None, "\\frac{1}{", "{{x}"])
def test_real_verifier_unparseable_gold_never_gives_accuracy_1(gold):
    out = score(Ex(answer=gold), UNPARSEABLE_RESPONSES)
    assert out.route == ["none"] * 7 and out.breakdown["accuracy"] == [0.0] * 7
    out = score(Ex(answer=gold), UNPARSEABLE_RESPONSES, model_scores=[0.0] * 7)  # routed on to the reward model
    assert out.route == ["model"] * 7 and out.breakdown["accuracy"] == [0.5] * 7


def test_real_verifier_placeholder_gold_never_gives_accuracy_1():
    # "???" is balanced, so the verifier gets as far as the prediction: no answer is a confident 0 (route rule),
    # anything else fails to parse the gold (route none). (Echoing "???" exactly is the verifier's call.)
    out = score(Ex(answer="???"), UNPARSEABLE_RESPONSES)
    assert max(out.breakdown["accuracy"]) == 0.0 and set(out.route) <= {"rule", "none"}


def test_real_verifier_weak_match_routes_by_min_confidence():
    # A plain-text gold is decided by a normalised string match: a weak verdict (confidence below 1).
    ex, responses = Ex(answer="Eiffel Tower"), ["<answer>the eiffel tower</answer>", "<answer>Big Ben</answer>"]
    assert score(ex, responses).route == ["rule", "rule"]  # default min_confidence 0.5 trusts it
    strict = R.RewardConfig(min_confidence=0.9)
    out = score(ex, responses, cfg=strict)
    assert out.route == ["rule_low_confidence"] * 2 and out.breakdown["accuracy"] == [1.0, 0.0]
    out = score(ex, responses, cfg=strict, model_scores=[-3.0, 3.0])
    assert out.route == ["model"] * 2 and out.breakdown["accuracy"] == pytest.approx([1 / (1 + math.exp(3)),
                                                                                      1 / (1 + math.exp(-3))])


def test_route_counts_and_aspect_means():
    a = score(Ex(), ["x", "y"], verdicts=[V(True), V(False, 0.0)])
    b = score(Ex(answer=None, task="open"), ["z"], model_scores=[0.0])
    assert R.route_counts([a, b]) == {"rule": 1, "model": 1, "rule_low_confidence": 0, "none": 1}
    assert R.route_counts([]) == {"rule": 0, "model": 0, "rule_low_confidence": 0, "none": 0}
    assert R.aspect_means([a, b])["accuracy"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------- combination
def test_sum_then_normalize_total_is_the_weighted_breakdown():
    out = score(Ex(), [GOOD, "<answer>5</answer>", "4"], lengths=[100, 20, 60], verdicts=[V(True), V(False), V(True)])
    # accuracy (1, 0, 1); format (1, 0, 0); instruction 1; length: L* = 60, wrong at 20 -> -0.5·min(1, 40/30)
    assert out.breakdown == {"accuracy": [1.0, 0.0, 1.0], "format": [1.0, 0.0, 0.0], "instruction": [1.0] * 3,
                             "length": [0.0, -0.5, 0.0]}
    assert out.total == pytest.approx([1.2, -0.4, 1.1])


@pytest.fixture
def probe(scratch_aspects):
    values = {}
    R.register_aspect("probe")(lambda example, response, ctx: values[response])
    return values


def test_the_two_combination_modes_differ_where_they_should(probe):
    probe.update({"a": 0.0, "b": 2.0, "c": 1.0})
    weights = {"accuracy": 0.0, "format": 0.0, "instruction": 0.0, "length": 0.0, "probe": 1.0}
    plain = config({"weights": weights})
    gdpo = config({"weights": weights, "combine": "normalize_then_sum"})
    wide, narrow = ["a", "b"], ["a", "c"]  # aspect vectors (0, 2) and (0, 1)
    assert score(Ex(), wide, cfg=plain, verdicts=[V(False)] * 2).total == [0.0, 2.0]
    assert score(Ex(), narrow, cfg=plain, verdicts=[V(False)] * 2).total == [0.0, 1.0]
    # Normalised within the group, both become (-1, 1) up to eps: the scale of an aspect no longer matters.
    wide_total = score(Ex(), wide, cfg=gdpo, verdicts=[V(False)] * 2).total
    narrow_total = score(Ex(), narrow, cfg=gdpo, verdicts=[V(False)] * 2).total
    assert wide_total == pytest.approx([-1 / (1 + 1e-4), 1 / (1 + 1e-4)])
    assert narrow_total == pytest.approx([-0.5 / (0.5 + 1e-4), 0.5 / (0.5 + 1e-4)])
    assert wide_total == pytest.approx(narrow_total, rel=1e-3)


def test_normalize_then_sum_keeps_a_small_aspect_from_being_drowned(probe):
    # accuracy (1, 0) with weight 1 against probe (0, 10) with weight 0.1: equal weight in sum mode, but
    # normalised, each aspect contributes ±w, so accuracy dominates as its weight says.
    probe.update({"right": 0.0, "wrong": 10.0})
    weights = {"format": 0.0, "instruction": 0.0, "length": 0.0, "probe": 0.1}
    plain = score(Ex(), ["right", "wrong"], cfg=config({"weights": weights}),
                  verdicts=[V(True), V(False)])
    gdpo = score(Ex(), ["right", "wrong"], cfg=config({"weights": weights,
                                                                          "combine": "normalize_then_sum"}),
                 verdicts=[V(True), V(False)])
    assert plain.total == pytest.approx([1.0, 1.0])
    assert gdpo.total == pytest.approx([1 / (1 + 2e-4) - 0.1 * 5 / (5 + 1e-4), -1 / (1 + 2e-4) + 0.1 * 5 / (5 + 1e-4)])
    assert gdpo.breakdown["probe"] == [0.0, 10.0]  # the breakdown stays unnormalised


def test_constant_aspect_contributes_nothing_when_normalised():
    cfg = R.RewardConfig(combine="normalize_then_sum")
    out = score(Ex(), [GOOD, GOOD], verdicts=[V(True), V(True)], cfg=cfg)
    assert out.total == [0.0, 0.0]


def test_accuracy_gate_on_format():
    cfg = R.RewardConfig(accuracy_requires_format=True)
    out = score(Ex(), [GOOD, "<answer>4</answer>", "4"], lengths=[100, 10, 40], cfg=cfg,
                verdicts=[V(True), V(True), V(True)])
    assert out.breakdown["accuracy"] == [1.0, 0.0, 0.0]
    # the gated responses are no longer correct, so they are shorter-than-L* failures
    assert out.breakdown["length"] == [0.0, -0.5, -0.5]
    assert out.route == ["rule"] * 3


# ---------------------------------------------------------------------------------------------------- registry
def _readme_blocks(section: str) -> dict[str, str]:
    """The first code block of each language (python, yaml) in a README section: the text a user copies."""
    text = README.read_text(encoding="utf-8")
    assert f"### {section}\n" in text, f"README lost its '{section}' section"
    body = text.split(f"### {section}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = {}
    for lang, code in re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S):
        blocks.setdefault(lang, code)
    return blocks


def test_readme_example_adds_an_aspect_exactly_as_shown(plugin_dir):
    # The module and the config lines, copied from the README: no edit of train.py, nothing else registered.
    blocks = _readme_blocks("Adding a reward aspect")
    (plugin_dir / "my_rewards.py").write_text(blocks["python"], encoding="utf-8")
    reward_section = yaml.safe_load(blocks["yaml"])["reward"]
    assert reward_section["plugins"] == ["my_rewards"] and "repetition" not in R.ASPECTS
    cfg = R.RewardConfig.from_dict(reward_section, answer_format="think_answer")
    loop = "the answer is 4 " * 5  # 20 words, 17 4-grams, 4 of them distinct
    out = R.score_group(Ex(), [GOOD, loop], lengths=[50, 50], finish_reasons=["eos", "eos"], cfg=cfg,
                        verdicts=[V(True), V(True)])
    assert out.breakdown["repetition"] == [0.0, pytest.approx(-(1 - 4 / 17))]
    weighted = [sum(cfg.weights[a] * out.breakdown[a][i] for a in out.breakdown) for i in range(2)]
    assert out.total == pytest.approx(weighted) and out.total[0] - out.total[1] == pytest.approx(0.1 + 0.5 * 13 / 17)


def test_plugins_are_imported_before_the_weights_are_checked(plugin_dir):
    (plugin_dir / "probe_plugin.py").write_text(
        "from harmo_min.rewards import register_aspect\n\n\n@register_aspect('chars')\n"
        "def chars(example, response, ctx):\n    return float(len(response))\n", encoding="utf-8")
    with pytest.raises(ValueError, match="reward.weights.chars: unknown aspect"):
        config({"weights": {"chars": 1.0}})  # without the plugin the aspect does not exist
    cfg = config({"plugins": ["probe_plugin"], "weights": {"chars": 1.0}})
    assert cfg.plugins == ("probe_plugin",)
    assert score(Ex(), ["ab", "abcd"], cfg=cfg, verdicts=[V(False)] * 2).breakdown["chars"] == [2.0, 4.0]
    assert config({"plugins": ["probe_plugin"], "weights": {"chars": 1.0}}) == cfg  # imported once, no re-register


def test_a_plugin_that_fails_names_its_config_entry(plugin_dir):
    (plugin_dir / "broken_plugin.py").write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("reward.plugins[1]: cannot import 'broken_plugin' "
                                                   "(RuntimeError: boom)")):
        config({"plugins": ["harmo_min.verifier", "broken_plugin"]})


def test_group_aspect_sees_the_whole_group(scratch_aspects):
    @R.register_aspect("rank", group=True)
    def rank(example, group):
        return [float(sorted(group.lengths).index(n)) for n in group.lengths]
    cfg = config({"weights": {"rank": 1.0}})
    assert score(Ex(), ["x"] * 3, lengths=[30, 10, 20], cfg=cfg, verdicts=[V(False)] * 3).breakdown["rank"] == [
        2.0, 0.0, 1.0]


def test_a_broken_user_aspect_fails_loudly(scratch_aspects):
    R.register_aspect("nan")(lambda example, response, ctx: float("nan"))
    R.register_aspect("short", group=True)(lambda example, group: [0.0])
    for name, message in (("nan", r"aspect nan\[0\]: must be a finite number"), ("short", "aspect short: expected 2")):
        cfg = config({"weights": {name: 1.0}})
        with pytest.raises(ValueError, match=message):
            score(Ex(), ["x", "y"], cfg=cfg, verdicts=[V(False)] * 2)


# ---------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("kw, message", [
    ({"model_scores": [0.0]}, r"model_scores: expected 2 entries \(one per response\), got 1"),
    ({"model_scores": [0.0, "high"]}, r"model_scores\[1\]: must be a number or None, got 'high'"),
    ({"model_scores": [True, 0.0]}, r"model_scores\[0\]: must be a number or None"),
])
def test_bad_model_scores_raise_naming_the_entry(kw, message):
    args = {"lengths": [1, 2], "finish_reasons": ["eos", "eos"], "verdicts": [V(True)] * 2, **kw}
    with pytest.raises(ValueError, match=message):
        R.score_group(Ex(), ["a", "b"], cfg=R.RewardConfig(), **args)


@pytest.mark.parametrize("kw", [{"lengths": [1]}, {"finish_reasons": ["eos"]}, {"verdicts": [V(True)]}])
def test_inputs_the_trainer_builds_are_asserted(kw):
    args = {"lengths": [1, 2], "finish_reasons": ["eos", "eos"], "verdicts": [V(True)] * 2, **kw}
    with pytest.raises(AssertionError):
        R.score_group(Ex(), ["a", "b"], cfg=R.RewardConfig(), **args)
    with pytest.raises(AssertionError):
        R.score_group(Ex(), [], lengths=[], finish_reasons=[], cfg=R.RewardConfig())


def test_a_long_response_is_scored_in_bounded_time():
    # 16 KB with a run of spaces in the answer: 7 s in score_group when the verifier's regexes were quadratic.
    constraints = [{"kind": "max_words", "value": 30}, {"kind": "answer_is_number"},
                   {"kind": "language", "value": "en"}]
    responses = ["<think>" + "x " * 2000 + "</think><answer>4" + " " * 16_000 + "5</answer>",
                 "<think>" + " " * 16_000 + "</think><answer>" + "{" * 16_000 + "</answer>"]
    cfg = config({"weights": {"overlong": 1.0}, "overlong_max_len": 1000})
    t = time.perf_counter()
    out = score(Ex(constraints=constraints), responses, cfg=cfg)
    assert time.perf_counter() - t < 1.0
    assert out.breakdown["accuracy"] == [0.0, 0.0]


def _garbage() -> list[str]:
    rng = random.Random(0)
    return [
        bytes(rng.randrange(256) for _ in range(4096)).decode("latin-1"),  # binary
        bytes(rng.randrange(256) for _ in range(4096)).decode("utf-8", errors="replace"),
        "x" * 200_000,  # 200 KB
        "<think>" + "\\frac{" * 20_000 + "</think><answer>\\boxed{\\frac{1}{" + "{" * 5000 + "</answer>",
        "\\boxed{" * 30_000,  # unbalanced LaTeX, 210 KB
        "<answer>" * 10_000 + "</answer>" * 3,
        "<think>\ud800\x00\x1b[31m</think><answer>\udfff 4 \x00</answer>",  # lone surrogates, NUL, escapes
        "",
        "   \n\t ",
        "<think>" * 50_000,
    ]


def test_garbage_output_never_raises():
    constraints = [{"kind": k, "value": v} if v is not None else {"kind": k} for k, v in [
        ("max_words", 30), ("min_words", 5), ("must_include", "circle"), ("must_not_include", "x"),
        ("answer_is_choice_letter", None), ("answer_is_number", None), ("language", "zh")]]
    responses = _garbage()
    lengths = [len(r) // 4 for r in responses]
    for ex in (Ex(answer="4", constraints=constraints), Ex(answer="\\frac{1}{2}", choices=["a", "b"]),
               Ex(answer=None, task="open", constraints=constraints)):
        for c in ("sum_then_normalize", "normalize_then_sum"):
            for fmt in R.CHECKED_FORMATS:
                run_cfg = config({"weights": {"overlong": 1.0}, "combine": c, "overlong_max_len": 1000,
                                  "accuracy_requires_format": True}, fmt)
                out = R.score_group(ex, responses, lengths=lengths, finish_reasons=["length"] * len(responses),
                                    model_scores=[0.0] * len(responses), cfg=run_cfg)
                assert all(math.isfinite(t) for t in out.total)
                assert all(0.0 <= a <= 1.0 for a in out.breakdown["accuracy"])


# ---------------------------------------------------------------------------------------------------- batch
def _mixed_batch():
    examples = [Ex("m", answer="4"), Ex("c", answer="B", choices=["x", "y", "z"],
                                       constraints=[{"kind": "answer_is_choice_letter"}]),
                Ex("o", answer=None, task="open", constraints=[{"kind": "max_words", "value": 3}])]
    groups = [[GOOD, "<think>a</think><answer>5</answer>"],
              ["<think>a</think><answer>B</answer>", "<answer>C</answer>"],
              ["<think>a</think><answer>a red circle</answer>", "<answer>a big red circle here</answer>"]]
    lengths = [[40, 10], [30, 5], [20, 25]]
    finish = [["eos", "eos"]] * 3
    scores = [[None, None], [None, None], [1.0, -1.0]]
    return examples, groups, lengths, finish, scores


def test_score_batch_equals_score_group_and_calls_the_verifier_once(monkeypatch):
    examples, groups, lengths, finish, scores = _mixed_batch()
    cfg = R.RewardConfig()
    calls = []
    real = R.verify_batch
    monkeypatch.setattr(R, "verify_batch", lambda items, **kw: calls.append((len(items), kw)) or real(items, **kw))
    batch = R.score_batch(examples, groups, lengths=lengths, finish_reasons=finish, model_scores=scores, cfg=cfg)
    # one call, for the verifiable items' responses only, with the config's workers and timeout
    assert calls == [(4, {"workers": 0, "timeout_s": 1.0})]
    single = [R.score_group(ex, g, lengths=n, finish_reasons=f, model_scores=s, cfg=cfg)
              for ex, g, n, f, s in zip(examples, groups, lengths, finish, scores)]
    assert batch == single
    assert [b.route for b in batch] == [["rule", "rule"], ["rule", "rule"], ["model", "model"]]
    assert R.route_counts(batch) == {"rule": 4, "model": 2, "rule_low_confidence": 0, "none": 0}


def test_score_batch_parallel_matches_serial():
    examples, groups, lengths, finish, scores = _mixed_batch()
    kw = dict(lengths=lengths, finish_reasons=finish, model_scores=scores, cfg=R.RewardConfig())
    assert R.score_batch(examples, groups, workers=2, **kw) == R.score_batch(examples, groups, workers=0, **kw)


def test_score_batch_checks_the_number_of_groups():
    examples, groups, lengths, finish, _ = _mixed_batch()
    with pytest.raises(ValueError, match="lengths: expected 3 groups"):
        R.score_batch(examples, groups, lengths=lengths[:2], finish_reasons=finish, cfg=R.RewardConfig())
