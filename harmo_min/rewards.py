r"""The multi-aspect reward combiner of HARMO (arXiv 2510.05283): one group of G responses in, G rewards out.

Pure Python, no torch: reward-model scores come in as plain numbers, checkable answers go to the rule verifier.
Keys are `reward.<key>` [default]; the README's "Rewards" section is the user's guide to them.

    cfg = RewardConfig.from_dict(config["reward"], answer_format=config["data"]["answer_format"])
    cfg = cfg.resolve(max_new_tokens)
    out = score_batch(examples, groups_of(texts, G), lengths=groups_of(lengths, G),
                      finish_reasons=groups_of(finish_reasons, G), model_scores=None, cfg=cfg)
    out[k].total (G,), out[k].breakdown["length"] (G,), out[k].route (G,); route_counts(out) for the step log

Aspects (unweighted values, all in `GroupRewards.breakdown`)
  accuracy     in [0, 1], routed as below; always computed (length, dynamic sampling and the logs need it).
  format       1 when the response has the shape data.answer_format (ANSWER_FORMATS) asks for, read with the
               verifier's parsers: think_answer = the whole response is <think>…</think><answer>…</answer> (one of
               each tag, in that order, only whitespace outside them, a non-empty answer); boxed = the last box is
               well-formed and non-empty; bare = no shape, so weights.format must be 0.
  instruction  fraction of the example's constraints satisfied; 1 when it has none.
  length       HARMO: with L* the length in tokens of the shortest correct response (accuracy ≥ correct_threshold
               [0.5]), an incorrect response with L < L* gets r = −P_max · min(1, (L* − L) / (τ · L*)),
               P_max = length_p_max [0.5], τ = length_tau [0.5]; all others, and groups with none correct, get 0.
  overlong     DAPO: r = 0 for L ≤ L_max − L_buf, (L_max − L_buf − L) / L_buf in between, −1 for L ≥ L_max;
               L_max = overlong_max_len [null: max_new_tokens, by `cfg.resolve`], L_buf = overlong_buffer [0].
               A response cut off by the token limit (finish_reason "length") counts as L ≥ L_max.

Routing of the accuracy, accuracy_source [hybrid]; c = verdict confidence, s = reward-model score, "missing" when
there is no reward model or the entry is not a finite float (None, NaN, ±inf, 10**400):
  open item                            sigmoid(s / rm_temperature [1.0]), route "model"; 0, "none" when s is missing
  verifiable, c > 0 and c ≥ min_confidence [0.5]     1 if correct else 0, route "rule"
  verifiable, otherwise                sigmoid(s / T), "model"; without s: the verdict, "rule_low_confidence", if
                                       c > 0, else 0, "none" (c = 0: unparseable gold, timeout or error)
accuracy_source rule treats every s as missing; model routes every item like an open one (no verifier).

Combination (w_a = weights.<aspect> [accuracy 1.0, format 0.1, instruction 0.1, length 1.0, overlong 0.0])
  combine=sum_then_normalize [default]:  R_i = Σ_a w_a · r_a,i       (grpo.py then normalises R within the group)
  combine=normalize_then_sum (GDPO):     R_i = Σ_a w_a · (r_a,i − mean_a) / (std_a + norm_eps [1e-4])
  accuracy_requires_format [false]: accuracy := accuracy · r_fmt before anything uses it (length, total, logs).
A weight of 0 switches an aspect off (not computed, not in the breakdown), accuracy excepted.

Constraints (`example.constraints`, a list of {"kind": …}, checked by `validate_constraint`, table CONSTRAINT_KINDS)
read the visible text (`visible_text`: the last answer block, else the response without <think> blocks) or the
final answer the verifier extracts: max_words / min_words (whitespace-separated words), must_include /
must_not_include (case-insensitive), answer_is_choice_letter, answer_is_number, language (more than half of the
visible letters in the language's script: the script, not the language).

New aspects: `@register_aspect("name")` on fn(example, response, ctx) -> float, or `group=True` on
fn(example, group) -> list[float], in a module listed in `reward.plugins`; then `reward.weights.name: w`.
Left out: the reward-model forward, reference answers, parameters for user aspects, the advantage (grpo.py).
"""

from __future__ import annotations

import importlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real
from typing import Any, Callable, NamedTuple, Sequence

from harmo_min.config import NOT_EMPTY, Rule, check_rules, did_you_mean, one_of
from harmo_min.verifier import Verdict, answer_block, extract_answer, last_boxed, verify, verify_batch

ANSWER_FORMATS = ("think_answer", "boxed", "bare")  # data.answer_format (here: data.py imports this module)
CHECKED_FORMATS = ("think_answer", "boxed")  # the answer formats with a shape that format_ok checks
ACCURACY_SOURCES = ("hybrid", "rule", "model")
COMBINE_MODES = ("sum_then_normalize", "normalize_then_sum")
ROUTES = ("rule", "model", "rule_low_confidence", "none")
DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.1, "instruction": 0.1, "length": 1.0, "overlong": 0.0}


def _number(default: Any, what: str, test: Callable[[Any], bool], integer: bool = False) -> Any:
    """A field that must hold a finite number (an integer) passing `test`, or None where the default is None: a
    config.py rule, checked by __post_init__. A bool is an int to Python, but `true` for a number is a typo."""
    kind = Integral if integer else Real

    def ok(v: Any) -> bool:
        if v is None:
            return default is None
        return isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) and test(v)
    return field(default=default, metadata={"rule": (ok, f"must be {'an integer' if integer else 'a number'} {what}")})


@dataclass(frozen=True)
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    combine: str = "sum_then_normalize"
    answer_format: str = "think_answer"  # data.answer_format, passed in by the trainer: not a `reward:` key
    accuracy_source: str = "hybrid"
    accuracy_requires_format: bool = False
    min_confidence: float = _number(0.5, "in [0, 1]", lambda v: 0 <= v <= 1)
    rm_temperature: float = _number(1.0, "> 0", lambda v: v > 0)
    correct_threshold: float = _number(0.5, "in (0, 1]", lambda v: 0 < v <= 1)
    length_p_max: float = _number(0.5, "≥ 0", lambda v: v >= 0)
    length_tau: float = _number(0.5, "> 0", lambda v: v > 0)
    overlong_max_len: int | None = _number(None, "> 0 (or null)", lambda v: v > 0, integer=True)
    overlong_buffer: int = _number(0, "≥ 0", lambda v: v >= 0, integer=True)
    norm_eps: float = _number(1e-4, "> 0", lambda v: v > 0)
    verifier_timeout_s: float = _number(1.0, "> 0", lambda v: v > 0)
    workers: int = _number(0, "≥ 0 (0 = serial)", lambda v: v >= 0, integer=True)
    plugins: tuple[str, ...] = ()  # modules imported before the weights are checked: they register aspects
    prefix: str = field(default="reward", repr=False, compare=False)  # only for error messages

    @classmethod
    def from_dict(cls, d: dict | None, *, answer_format: str, prefix: str = "reward") -> RewardConfig:
        """From the `reward:` YAML section and data.answer_format; given weights override the defaults one by one."""
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ValueError(f"{prefix}: must be a mapping, got {type(d).__name__}")
        keys = [f.name for f in fields(cls) if f.name not in ("prefix", "answer_format")]
        for key in d:
            if key in ("format", "answer_format"):
                raise ValueError(f"{prefix}.{key}: not a reward key; the answer format (and so the format checked) "
                                 f"is data.answer_format, one of {ANSWER_FORMATS}")
            if key not in keys:
                raise ValueError(f"{prefix}.{key}: unknown key{did_you_mean(key, keys)}")
        weights = {} if d.get("weights") is None else d["weights"]  # `weights:` left empty: the defaults
        plugins = [] if d.get("plugins") is None else d["plugins"]
        if not isinstance(weights, dict):
            raise ValueError(f"{prefix}.weights: must be a mapping of aspect name to weight, got {weights!r}")
        if not isinstance(plugins, (list, tuple)):
            raise ValueError(f"{prefix}.plugins: must be a list of module names, got {plugins!r}")
        return cls(**{**d, "weights": {**DEFAULT_WEIGHTS, **weights}, "plugins": tuple(plugins)},
                   answer_format=answer_format, prefix=prefix)

    def __post_init__(self) -> None:  # runs for from_dict, the constructor and dataclasses.replace alike
        p = self.prefix
        for i, name in enumerate(self.plugins):  # first: the weights may name the aspects they register
            if not isinstance(name, str) or not name:
                raise ValueError(f"{p}.plugins[{i}]: must be a module name such as my_rewards, got {name!r}")
            try:
                importlib.import_module(name)
            except Exception as e:  # the user's module: whatever it raises, say which config entry it was
                raise ValueError(f"{p}.plugins[{i}]: cannot import {name!r} ({type(e).__name__}: {e})") from e
        for name, w in self.weights.items():
            if name not in ASPECTS:
                raise ValueError(f"{p}.weights.{name}: unknown aspect '{name}'{did_you_mean(name, ASPECTS)}")
            if not _is_number(w) or _finite(w) is None:
                raise ValueError(f"{p}.weights.{name}: must be a number (finite), got {w!r}")
        if all(w == 0 for w in self.weights.values()):
            raise ValueError(f"{p}.weights: all weights are zero, the reward would be constant")
        for key, value, options in ((f"{p}.combine", self.combine, COMBINE_MODES),
                                    (f"{p}.accuracy_source", self.accuracy_source, ACCURACY_SOURCES),
                                    ("data.answer_format", self.answer_format, ANSWER_FORMATS)):
            if value not in options:
                raise ValueError(f"{key}: {value!r} is not one of {options}{did_you_mean(value, options)}")
        if not isinstance(self.accuracy_requires_format, bool):
            raise ValueError(f"{p}.accuracy_requires_format: must be true or false, "
                             f"got {self.accuracy_requires_format!r}")
        if self.answer_format not in CHECKED_FORMATS:  # bare: a reward for a format nobody asked for is noise
            if self.weights.get("format", 0) != 0:
                raise ValueError(f"{p}.weights.format: must be 0 when data.answer_format is "
                                 f"{self.answer_format} (there is no format to check), got {self.weights['format']}")
            if self.accuracy_requires_format:
                raise ValueError(f"{p}.accuracy_requires_format: must be false when data.answer_format is "
                                 f"{self.answer_format} (there is no format to require)")
        rules = {f.name: f.metadata["rule"] for f in fields(self) if "rule" in f.metadata}
        check_rules({name: getattr(self, name) for name in rules}, rules, prefix=f"{p}.")
        if self.overlong_max_len is not None and self.overlong_buffer > self.overlong_max_len:
            raise ValueError(f"{p}.overlong_buffer: {self.overlong_buffer} exceeds "
                             f"overlong_max_len {self.overlong_max_len}")

    def resolve(self, max_new_tokens: int) -> RewardConfig:
        """The config with overlong_max_len filled in from the rollout when the YAML left it null."""
        return self if self.overlong_max_len is not None else replace(self, overlong_max_len=max_new_tokens)


@dataclass(frozen=True)
class Ctx:
    """What a per-response aspect knows about its response besides the text."""
    i: int
    length: int  # tokens
    finish_reason: str  # "eos" | "length"
    accuracy: float  # after routing and the format gate
    route: str
    cfg: RewardConfig


@dataclass(frozen=True)
class Group:
    """What a group aspect sees: the G responses and everything known about them."""
    responses: list[str]
    lengths: list[int]
    finish_reasons: list[str]
    accuracy: list[float]
    route: list[str]
    verdicts: list[Verdict | None]  # None where the verifier did not run (open items, accuracy_source model)
    model_scores: list[float | None]
    cfg: RewardConfig


ASPECTS: dict[str, Callable[[Any, Group], list]] = {}  # name -> fn(example, group); per-response ones mapped over it


def register_aspect(name: str, *, group: bool = False) -> Callable:
    """Decorator: add an aspect; `reward.weights.<name>: w` (w ≠ 0) switches it on."""
    def add(fn: Callable) -> Callable:
        if name in ASPECTS:
            raise ValueError(f"aspect '{name}' is already registered")

        def each(example: Any, g: Group) -> list:
            return [fn(example, r, Ctx(i, g.lengths[i], g.finish_reasons[i], g.accuracy[i], g.route[i], g.cfg))
                    for i, r in enumerate(g.responses)]
        ASPECTS[name] = fn if group else each
        return fn
    return add


_TAG = re.compile(r"</?(?:think|answer)>", re.I | re.A)  # ASCII case only, as verifier.answer_block
_THINK_BLOCK = re.compile(r"<think>.*?(</think>|\Z)", re.I | re.A | re.S)  # \Z: an unclosed block runs to the end,
# and ends the search there (a lazy <think>.*?</think> alone is quadratic on "<think>" * 50_000)


def format_ok(response: str, answer_format: str) -> bool:
    """Format 1 (module docstring), read with the verifier's parsers: the verifier finds the answer there."""
    if answer_format == "boxed":
        return bool((last_boxed(response) or "").strip())
    if answer_format != "think_answer":
        raise ValueError(f"format_ok: {answer_format!r} has no format to check; expected one of {CHECKED_FORMATS}")
    tags = list(_TAG.finditer(response))  # one pass; duplicated or nested tags fail the exact sequence below
    if [m.group().lower() for m in tags] != ["<think>", "</think>", "<answer>", "</answer>"]:
        return False
    outside = response[:tags[0].start()] + response[tags[1].end():tags[2].start()] + response[tags[3].end():]
    return not outside.strip() and bool(answer_block(response).strip())


def visible_text(response: str) -> str:
    """What the user reads (module docstring); tags in any ASCII case, an unclosed <think> hides all after it."""
    block = answer_block(response)
    if block is not None:
        return block
    return _THINK_BLOCK.sub(lambda m: " " if m[1] else "", response)  # a closed block leaves a word break


_COUNT: Rule = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0), "must be a non-negative integer"
_LETTER_RE = re.compile(r"\(?([A-Z])\)?\.?")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?%?"
                        r"|[-+]?\d+\s*/\s*\d+|[-+]?\\[dt]?frac\{\d+\}\{\d+\}")
_LATIN, _HAN = r"A-Za-z\u00C0-\u024F", r"\u3400-\u4DBF\u4E00-\u9FFF"
_SCRIPT = {lang: re.compile(f"[{letters}]") for lang, letters in {  # language -> the letters of its script(s)
    "en": _LATIN, "fr": _LATIN, "de": _LATIN, "es": _LATIN, "ru": r"\u0400-\u04FF", "zh": _HAN,
    "ja": r"\u3040-\u30FF" + _HAN, "ko": r"\u1100-\u11FF\uAC00-\uD7AF"}.items()}
_ANY_LETTER = re.compile(r"[^\W\d_]")


def _answer_is_choice_letter(example: Any, response: str, c: dict) -> bool:
    m = _LETTER_RE.fullmatch((extract_answer(response) or "").strip())
    n = len(getattr(example, "choices", None) or []) or 26
    return bool(m) and ord(m.group(1)) - ord("A") < n


def _answer_is_number(example: Any, response: str, c: dict) -> bool:
    return bool(_NUMBER_RE.fullmatch((extract_answer(response) or "").strip().strip("$").strip()))


def _language(example: Any, response: str, c: dict) -> bool:
    text = visible_text(response)
    letters = len(_ANY_LETTER.findall(text))
    own = len(_SCRIPT[c["value"]].findall(text))
    # A majority, not all: Chinese math answers name their variables in Latin letters.
    return letters > 0 and own / letters > 0.5


class Constraint(NamedTuple):
    check: Callable[[Any, str, dict], bool]  # (example, response, constraint) -> satisfied
    rule: Rule | None  # what its "value" must be; None: it takes no value


CONSTRAINT_KINDS: dict[str, Constraint] = {
    "max_words": Constraint(lambda ex, r, c: len(visible_text(r).split()) <= c["value"], _COUNT),
    "min_words": Constraint(lambda ex, r, c: len(visible_text(r).split()) >= c["value"], _COUNT),
    "must_include": Constraint(lambda ex, r, c: c["value"].casefold() in visible_text(r).casefold(), NOT_EMPTY),
    "must_not_include": Constraint(lambda ex, r, c: c["value"].casefold() not in visible_text(r).casefold(),
                                   NOT_EMPTY),
    "answer_is_choice_letter": Constraint(_answer_is_choice_letter, None),
    "answer_is_number": Constraint(_answer_is_number, None),
    "language": Constraint(_language, one_of(*sorted(_SCRIPT))),
}


def validate_constraint(c: dict) -> None:
    """Raise ValueError with a clear message unless `c` is a well-formed constraint (data.py calls this on load)."""
    if not isinstance(c, dict):
        raise ValueError(f"constraint: must be a dict like {{'kind': 'max_words', 'value': 30}}, got {c!r}")
    kind = c.get("kind")
    if not isinstance(kind, str) or kind not in CONSTRAINT_KINDS:
        raise ValueError(f"constraint.kind: unknown kind {kind!r}{did_you_mean(kind, CONSTRAINT_KINDS)}; "
                         f"known: {', '.join(CONSTRAINT_KINDS)}")
    rule = CONSTRAINT_KINDS[kind].rule
    extra = sorted(set(c) - {"kind"} - ({"value"} if rule else set()))
    if extra:
        raise ValueError(f"constraint {kind}: unexpected key(s) {extra}")
    if rule is not None:
        check_rules(c, {"value": rule}, prefix=f"constraint {kind}.")


def route_accuracy(task: str, verdict: Verdict | None, score: float | None, cfg: RewardConfig) -> tuple[float, str]:
    """(accuracy, route) of one response; the table in the module docstring, row by row."""
    s = None if cfg.accuracy_source == "rule" else _finite(score)
    model = None if s is None else _sigmoid(s / cfg.rm_temperature)
    if task == "open" or cfg.accuracy_source == "model":
        return (model, "model") if model is not None else (0.0, "none")
    c = verdict.confidence
    if c > 0 and c >= cfg.min_confidence:
        return float(verdict.correct), "rule"
    if model is not None:
        return model, "model"
    if c > 0:
        return float(verdict.correct), "rule_low_confidence"
    return 0.0, "none"


def _finite(score: float | None) -> float | None:
    """The score as a finite float, or None when it is missing: None, NaN, ±inf or an int beyond float range."""
    if score is None:
        return None
    try:
        x = float(score)
    except OverflowError:  # 10**400: no float holds it; like inf, it is no usable score
        return None
    return x if math.isfinite(x) else None


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))  # this branch keeps exp from overflowing on a very negative score


def _task(example: Any) -> str:
    task = getattr(example, "task", None)
    if task is None:  # the same inference data.py makes: a gold answer means a checkable item
        task = "open" if getattr(example, "answer", None) is None else "verifiable"
    if task not in ("verifiable", "open"):
        raise ValueError(f"example {getattr(example, 'id', '?')}: task must be 'verifiable' or 'open', got {task!r}")
    return task


def _gold(example: Any) -> str:
    answer = getattr(example, "answer", None)
    return "" if answer is None else str(answer)  # "" is an unparseable gold: the verifier says so, c = 0


@register_aspect("accuracy", group=True)
def accuracy(example: Any, group: Group) -> list[float]:
    return list(group.accuracy)  # routed, and gated by the format when accuracy_requires_format


@register_aspect("format")
def format_reward(example: Any, response: str, ctx: Ctx) -> float:
    return float(format_ok(response, ctx.cfg.answer_format))


@register_aspect("instruction")
def instruction(example: Any, response: str, ctx: Ctx) -> float:
    constraints = getattr(example, "constraints", None) or []
    satisfied = sum(CONSTRAINT_KINDS[c["kind"]].check(example, response, c) for c in constraints)
    return satisfied / len(constraints) if constraints else 1.0


@register_aspect("length", group=True)
def length_penalty(example: Any, group: Group) -> list[float]:
    cfg = group.cfg
    correct = [a >= cfg.correct_threshold for a in group.accuracy]
    correct_lengths = [n for n, ok in zip(group.lengths, correct) if ok]
    if not correct_lengths:
        return [0.0] * len(group.lengths)
    l_star = min(correct_lengths)
    return [-cfg.length_p_max * min(1.0, (l_star - n) / (cfg.length_tau * l_star)) if not ok and n < l_star else 0.0
            for n, ok in zip(group.lengths, correct)]


@register_aspect("overlong")
def overlong_penalty(example: Any, response: str, ctx: Ctx) -> float:
    cfg = ctx.cfg
    if cfg.overlong_max_len is None:
        raise ValueError(f"{cfg.prefix}.overlong_max_len: null; the trainer must call cfg.resolve(max_new_tokens)")
    l_max, buf = cfg.overlong_max_len, cfg.overlong_buffer
    n = max(ctx.length, l_max) if ctx.finish_reason == "length" else ctx.length
    if n >= l_max:
        return -1.0
    if n <= l_max - buf:
        return 0.0
    return (l_max - buf - n) / buf


@dataclass
class GroupRewards:
    total: list[float]  # (G,) the combined reward
    breakdown: dict[str, list[float]]  # aspect -> (G,) unweighted values
    route: list[str]  # (G,) which source decided the accuracy


def _is_number(v: Any) -> bool:
    # float and int first: isinstance against the Real ABC costs microseconds, and this runs for every response
    return type(v) in (float, int) or (isinstance(v, Real) and not isinstance(v, bool))


def combine(breakdown: dict[str, list[float]], cfg: RewardConfig) -> list[float]:
    n = len(next(iter(breakdown.values())))
    total = [0.0] * n
    for name, values in breakdown.items():
        w = cfg.weights.get(name, 0.0)
        if w == 0:
            continue
        if cfg.combine == "normalize_then_sum":
            mean = sum(values) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in values) / n)  # population std: G is the whole group
            values = [(x - mean) / (std + cfg.norm_eps) for x in values]
        total = [t + w * v for t, v in zip(total, values)]
    return total


def score_group(example: Any, responses: Sequence[str], *, lengths: Sequence[int], finish_reasons: Sequence[str],
                model_scores: Sequence[float | None] | None = None, cfg: RewardConfig,
                verdicts: Sequence[Verdict] | None = None) -> GroupRewards:
    """Score the G responses to one prompt; `verdicts` (one per response, as score_batch computes them) skips the
    verifier. Responses, lengths and finish reasons are the trainer's (asserted); the rest is checked by name."""
    n = len(responses)
    assert n > 0 and len(lengths) == n and len(finish_reasons) == n, (n, len(lengths), len(finish_reasons))
    scores = [None] * n if model_scores is None else list(model_scores)
    if len(scores) != n:  # the user's reward model: say which entry is wrong rather than mis-zip them
        raise ValueError(f"model_scores: expected {n} entries (one per response), got {len(scores)}")
    for i, v in enumerate(scores):
        if v is not None and not _is_number(v):
            raise ValueError(f"model_scores[{i}]: must be a number or None, got {v!r:.80}")
    task = _task(example)
    if cfg.weights.get("instruction", 0) != 0:
        for c in getattr(example, "constraints", None) or []:
            validate_constraint(c)  # data.py checks loaded data; an example built in code reaches us unchecked
    if task == "open" or cfg.accuracy_source == "model":
        verdicts = [None] * n
    elif verdicts is None:
        verdicts = [verify(r, _gold(example), choices=getattr(example, "choices", None),
                           timeout_s=cfg.verifier_timeout_s) for r in responses]
    assert len(verdicts) == n, (len(verdicts), n)

    routed = [route_accuracy(task, v, s, cfg) for v, s in zip(verdicts, scores)]
    acc, route = [a for a, _ in routed], [r for _, r in routed]
    if cfg.accuracy_requires_format:
        acc = [a if format_ok(r, cfg.answer_format) else 0.0 for a, r in zip(acc, responses)]
    group = Group(list(responses), list(lengths), list(finish_reasons), acc, route, list(verdicts), scores, cfg)

    breakdown: dict[str, list[float]] = {}
    for name in ["accuracy"] + [a for a, w in cfg.weights.items() if w != 0 and a != "accuracy"]:
        values = ASPECTS[name](example, group)
        # A NaN here would silently poison every advantage of the batch: fail loudly on a broken aspect.
        if len(values) != n:
            raise ValueError(f"aspect {name}: expected {n} values (one per response), got {len(values)}")
        for i, v in enumerate(values):
            if not _is_number(v) or not math.isfinite(v):
                raise ValueError(f"aspect {name}[{i}]: must be a finite number, got {v!r:.80}")
        breakdown[name] = [float(v) for v in values]
    return GroupRewards(combine(breakdown, cfg), breakdown, route)


def groups_of(values: Sequence, n: int) -> list[list]:
    """[a, b, c, d] -> [[a, b], [c, d]] for n = 2: score_batch's input, one list per prompt of its n responses."""
    return [list(values[i:i + n]) for i in range(0, len(values), n)]


def score_batch(examples: Sequence[Any], groups: Sequence[Sequence[str]], *, lengths: Sequence[Sequence[int]],
                finish_reasons: Sequence[Sequence[str]], model_scores: Sequence[Sequence[float | None]] | None = None,
                cfg: RewardConfig, workers: int | None = None) -> list[GroupRewards]:
    """score_group over many groups, with one verify_batch call for all of them (workers: None = cfg.workers)."""
    for key, seq in (("groups", groups), ("lengths", lengths), ("finish_reasons", finish_reasons),
                     ("model_scores", model_scores)):
        if seq is not None and len(seq) != len(examples):
            raise ValueError(f"{key}: expected {len(examples)} groups (one per example), got {len(seq)}")
    checked = [_task(ex) == "verifiable" and cfg.accuracy_source != "model" for ex in examples]
    items = [(r, _gold(ex), getattr(ex, "choices", None))
             for ex, group, ok in zip(examples, groups, checked) if ok for r in group]
    verdicts = iter(verify_batch(items, workers=cfg.workers if workers is None else workers,
                                 timeout_s=cfg.verifier_timeout_s))
    return [score_group(ex, group, lengths=lengths[k], finish_reasons=finish_reasons[k],
                        model_scores=None if model_scores is None else model_scores[k], cfg=cfg,
                        verdicts=[next(verdicts) for _ in group] if checked[k] else None)
            for k, (ex, group) in enumerate(zip(examples, groups))]


def route_counts(groups: Sequence[GroupRewards]) -> dict[str, int]:
    """Responses per accuracy route over a batch; every route present, so log keys stay stable."""
    return {**dict.fromkeys(ROUTES, 0), **Counter(r for g in groups for r in g.route)}


def aspect_means(groups: Sequence[GroupRewards]) -> dict[str, float]:
    """Mean unweighted value of every aspect over a batch (plus the total), for the step log."""
    sums: dict[str, list[float]] = {}
    for g in groups:
        for name, values in {**g.breakdown, "total": g.total}.items():
            sums.setdefault(name, []).extend(values)
    return {name: sum(v) / len(v) for name, v in sums.items()}
