r"""The multi-aspect reward combiner of HARMO (arXiv 2510.05283): one group of G responses in, G rewards out.

For each group of G responses to one prompt, every reward aspect is computed for every response and the aspects
are combined into one scalar per response. Pure Python, no torch: reward-model scores come in as plain numbers
and checkable answers go to the rule verifier (`harmo_min.verifier`). Config keys are `reward.<key>` [default].

    cfg = RewardConfig.from_dict(config["reward"]).resolve(max_new_tokens)
    out = score_batch(examples, texts, lengths=lengths, finish_reasons=finish_reasons, model_scores=None, cfg=cfg)
    out[k].total (G,), out[k].breakdown["length"] (G,), out[k].route (G,); route_counts(out) for the step log

Aspects (unweighted values, all reported in `GroupRewards.breakdown`)
  accuracy     hybrid, in [0, 1]; see the routing table. Always computed (the length penalty, dynamic sampling
               and the logs need it), whatever its weight.
  format       r_fmt ∈ {0, 1}. format=think_answer [default]: the whole response is
               `<think>…</think><answer>…</answer>` (DOTALL, only whitespace outside and between the blocks,
               exactly one of each of the four tags, non-empty answer). format=boxed: the last `\boxed{…}` has
               balanced braces and non-empty content.
  instruction  r_inst ∈ [0, 1]: fraction of the example's constraints satisfied; 1 when it has none.
  length       HARMO group length penalty. L* = length in tokens of the shortest *correct* response
               (accuracy ≥ correct_threshold [0.5]). An incorrect response with L < L* gets
                   r_len = −P_max · min(1, (L* − L) / (τ · L*))    P_max = length_p_max [0.5], τ = length_tau [0.5]
               every other response, and every group with no correct response, gets 0.
  overlong     DAPO soft overlong punishment, L_max = overlong_max_len [null: the rollout's max_new_tokens,
               filled in by `cfg.resolve(max_new_tokens)`], L_buf = overlong_buffer [0]:
                   r = 0 for L ≤ L_max − L_buf,  (L_max − L_buf − L) / L_buf in between,  −1 for L ≥ L_max.
               A response cut off by the token limit (finish_reason "length") counts as L ≥ L_max: it never
               finished. With L_buf = 0 it is a step: −1 for the responses that reach L_max, 0 for the rest.

Routing of the accuracy (c = verdict confidence, s = reward-model score, T = rm_temperature [1.0])
  task        verdict                         model score   route                 accuracy
  open        (not verified)                  given         model                 sigmoid(s / T)
  open        (not verified)                  missing       none                  0
  verifiable  c > 0 and c ≥ min_confidence    any           rule                  1 if correct else 0
  verifiable  c < min_confidence [0.5]        given         model                 sigmoid(s / T)
  verifiable  0 < c < min_confidence          missing       rule_low_confidence   1 if correct else 0
  verifiable  c = 0                           missing       none                  0
"missing" means no reward model (model_scores=None) or a None / NaN / inf entry. c = 0 is an unparseable gold,
a verifier timeout or error: such a verdict carries no information, so on its own it never gives accuracy 1.
Route "none" is a real outcome, counted by `route_counts`: a dataset of open items trained without a reward model
shows up in the logs instead of silently scoring 1 (or 0) everywhere.

Combination (w_a = weights.<aspect> [accuracy 1.0, format 0.1, instruction 0.1, length 1.0, overlong 0.0])
  combine=sum_then_normalize [default]:  R_i = Σ_a w_a · r_a,i       (grpo.py then normalises R within the group)
  combine=normalize_then_sum (GDPO):     R_i = Σ_a w_a · (r_a,i − mean_a) / (std_a + norm_eps)
                                         per-group mean and population std, norm_eps [1e-4]
  accuracy_requires_format [false]: accuracy := accuracy · r_fmt before anything uses it (length, total, logs).
A weight of 0 switches an aspect off (not computed, not in the breakdown), accuracy excepted.

Constraints (`example.constraints`, a list of {"kind": …, …}; checked by `validate_constraint`)
  Word counts and substring checks look at the *visible* text: the last <answer>…</answer> block when there is one,
  else the response minus its <think> blocks (an unclosed <think> hides everything after it). Words are
  whitespace-separated, so a run of CJK text without spaces is one word. The two answer checks read the final
  answer as the verifier extracts it (`extract_answer`).
  max_words {value: int ≥ 0}        min_words {value: int ≥ 0}
  must_include {value: str}         must_not_include {value: str}          (case-insensitive)
  answer_is_choice_letter           a single capital letter, optionally "(B)" or "B.", among the letters of the
                                    example's choices (A–Z when the choices live only in the prompt text)
  answer_is_number                  1, -2.5, 1,000, 3e8, 15%, 3/4 or \frac{3}{4}, optionally inside $…$
  language {value: en|fr|de|es|ru|zh|ja|ko}   more than half of the visible letters are in the language's script.
                                    Script, not language: en and fr look alike, Han-only Japanese looks like zh.

New aspects: decorate `fn(example, response, ctx) -> float` (per response) or `fn(example, group) -> list[float]`
(group=True) with `@register_aspect("name")`, then set `reward.weights.name: w`. Left out: the reward-model forward
(scores come in as numbers), reference answers, per-aspect parameters for user aspects, and the advantage (grpo.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Callable, Sequence

from harmo_min.verifier import Verdict, extract_answer, verify, verify_batch

COMBINE_MODES = ("sum_then_normalize", "normalize_then_sum")
FORMATS = ("think_answer", "boxed")
ROUTES = ("rule", "model", "rule_low_confidence", "none")
DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.1, "instruction": 0.1, "length": 1.0, "overlong": 0.0}


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_number(key: str, value: Any, ok: Callable[[Any], bool], rule: str, integer: bool = False) -> None:
    kind = Integral if integer else Real
    # bool is an int in Python; `true` in a YAML weight is a typo, not 1.0.
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{key}: must be {'an integer' if integer else 'a number'} {rule}, got {value!r}")


# ---------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    combine: str = "sum_then_normalize"
    format: str = "think_answer"
    accuracy_requires_format: bool = False
    min_confidence: float = 0.5
    rm_temperature: float = 1.0
    correct_threshold: float = 0.5
    length_p_max: float = 0.5
    length_tau: float = 0.5
    overlong_max_len: int | None = None
    overlong_buffer: int = 0
    norm_eps: float = 1e-4
    verifier_timeout_s: float = 1.0
    workers: int = 0
    prefix: str = field(default="reward", repr=False, compare=False)  # only for error messages

    @classmethod
    def from_dict(cls, d: dict | None, prefix: str = "reward") -> RewardConfig:
        """Build from the `reward:` YAML section. Given weights override the defaults one by one."""
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ValueError(f"{prefix}: must be a mapping, got {type(d).__name__}")
        keys = [f.name for f in dataclasses.fields(cls) if f.name != "prefix"]
        for key in d:
            if key not in keys:
                raise ValueError(f"{prefix}.{key}: unknown key{_did_you_mean(key, keys)}")
        weights = d.get("weights") or {}
        if not isinstance(weights, dict):
            raise ValueError(f"{prefix}.weights: must be a mapping of aspect name to weight, got {weights!r}")
        return cls(**{**d, "weights": {**DEFAULT_WEIGHTS, **weights}}, prefix=prefix)

    def __post_init__(self) -> None:  # runs for from_dict, the constructor and dataclasses.replace alike
        p = self.prefix
        for name, w in self.weights.items():
            if name not in ASPECTS:
                raise ValueError(f"{p}.weights.{name}: unknown aspect '{name}'{_did_you_mean(name, ASPECTS)}")
            _check_number(f"{p}.weights.{name}", w, lambda v: True, "(finite)")
        if all(w == 0 for w in self.weights.values()):
            raise ValueError(f"{p}.weights: all weights are zero, the reward would be constant")
        for key, options in (("combine", COMBINE_MODES), ("format", FORMATS)):
            if getattr(self, key) not in options:
                value = getattr(self, key)
                raise ValueError(f"{p}.{key}: {value!r} is not one of {options}{_did_you_mean(value, options)}")
        if not isinstance(self.accuracy_requires_format, bool):
            raise ValueError(f"{p}.accuracy_requires_format: must be true or false, "
                             f"got {self.accuracy_requires_format!r}")
        _check_number(f"{p}.min_confidence", self.min_confidence, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check_number(f"{p}.rm_temperature", self.rm_temperature, lambda v: v > 0, "> 0")
        _check_number(f"{p}.correct_threshold", self.correct_threshold, lambda v: 0 < v <= 1, "in (0, 1]")
        _check_number(f"{p}.length_p_max", self.length_p_max, lambda v: v >= 0, "≥ 0")
        _check_number(f"{p}.length_tau", self.length_tau, lambda v: v > 0, "> 0")
        if self.overlong_max_len is not None:
            _check_number(f"{p}.overlong_max_len", self.overlong_max_len, lambda v: v > 0, "> 0 (or null)", True)
        _check_number(f"{p}.overlong_buffer", self.overlong_buffer, lambda v: v >= 0, "≥ 0", True)
        if self.overlong_max_len is not None and self.overlong_buffer > self.overlong_max_len:
            raise ValueError(f"{p}.overlong_buffer: {self.overlong_buffer} exceeds "
                             f"overlong_max_len {self.overlong_max_len}")
        _check_number(f"{p}.norm_eps", self.norm_eps, lambda v: v > 0, "> 0")
        _check_number(f"{p}.verifier_timeout_s", self.verifier_timeout_s, lambda v: v > 0, "> 0")
        _check_number(f"{p}.workers", self.workers, lambda v: v >= 0, "≥ 0 (0 = serial)", True)

    def resolve(self, max_new_tokens: int) -> RewardConfig:
        """The config with overlong_max_len filled in from the rollout when the YAML left it null."""
        return self if self.overlong_max_len is not None else dataclasses.replace(self, overlong_max_len=max_new_tokens)


# ---------------------------------------------------------------------------------------------------- registries
@dataclass(frozen=True)
class Aspect:
    name: str
    fn: Callable  # group=False: (example, response, ctx) -> float;  group=True: (example, group) -> list[float]
    group: bool


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
    verdicts: list[Verdict | None]  # None for open items
    model_scores: list[float | None]
    cfg: RewardConfig


@dataclass(frozen=True)
class Constraint:
    check: Callable[[Any, str, dict], bool]  # (example, response, constraint) -> satisfied
    value: tuple[str, Callable[[Any], bool]] | None  # (description, test) of the "value" parameter, if it takes one


ASPECTS: dict[str, Aspect] = {}
CONSTRAINT_KINDS: dict[str, Constraint] = {}


def register_aspect(name: str, *, group: bool = False) -> Callable:
    """Decorator: add an aspect; `reward.weights.<name>: w` (w ≠ 0) switches it on."""
    def add(fn: Callable) -> Callable:
        if name in ASPECTS:
            raise ValueError(f"aspect '{name}' is already registered")
        ASPECTS[name] = Aspect(name, fn, group)
        return fn
    return add


def register_constraint(kind: str, value: tuple[str, Callable[[Any], bool]] | None = None) -> Callable:
    def add(check: Callable) -> Callable:
        if kind in CONSTRAINT_KINDS:
            raise ValueError(f"constraint kind '{kind}' is already registered")
        CONSTRAINT_KINDS[kind] = Constraint(check, value)
        return check
    return add


def validate_constraint(c: dict) -> None:
    """Raise ValueError with a clear message unless `c` is a well-formed constraint (data.py calls this on load)."""
    if not isinstance(c, dict):
        raise ValueError(f"constraint: must be a dict like {{'kind': 'max_words', 'value': 30}}, got {c!r}")
    kind = c.get("kind")
    if not isinstance(kind, str) or kind not in CONSTRAINT_KINDS:
        raise ValueError(f"constraint.kind: unknown kind {kind!r}{_did_you_mean(kind, CONSTRAINT_KINDS)}; "
                         f"known: {', '.join(CONSTRAINT_KINDS)}")
    spec = CONSTRAINT_KINDS[kind]
    extra = sorted(set(c) - {"kind"} - ({"value"} if spec.value else set()))
    if extra:
        raise ValueError(f"constraint {kind}: unexpected key(s) {extra}")
    if spec.value is not None:
        what, ok = spec.value
        if "value" not in c or not ok(c["value"]):
            raise ValueError(f"constraint {kind}.value: must be {what}, got {c.get('value')!r}")


# ---------------------------------------------------------------------------------------------------- reading the text
_THINK_ANSWER_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def visible_text(response: str) -> str:
    """What the user reads: the last <answer> block, else the response without its reasoning.
    Written with str.find, not regexes: a lazy `<think>.*?</think>` is quadratic on "<think>" * 50_000."""
    end = response.rfind("</answer>")
    start = response.rfind("<answer>", 0, max(end, 0))
    if end >= 0 and start >= 0:
        return response[start + len("<answer>"):end]
    parts, pos = [], 0
    while (start := response.find("<think>", pos)) >= 0:
        parts.append(response[pos:start])
        pos = response.find("</think>", start)
        if pos < 0:  # unclosed: everything after it is reasoning
            return " ".join(parts)
        pos += len("</think>")
    return " ".join(parts + [response[pos:]])


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{…} with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    open_at, depth = start + len("\\boxed"), 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:j]
    return None


def format_ok(response: str, fmt: str) -> bool:
    if fmt == "boxed":
        return bool((last_boxed(response) or "").strip())
    # Counting first keeps the regex linear and rejects duplicated or nested tags that a lazy match would accept.
    if any(response.count(tag) != 1 for tag in _TAGS):
        return False
    m = _THINK_ANSWER_RE.fullmatch(response)
    return bool(m and m.group(1).strip())


# ---------------------------------------------------------------------------------------------------- constraints
def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


@register_constraint("max_words", ("a non-negative integer", _is_count))
def _max_words(example: Any, response: str, c: dict) -> bool:
    return len(visible_text(response).split()) <= c["value"]


@register_constraint("min_words", ("a non-negative integer", _is_count))
def _min_words(example: Any, response: str, c: dict) -> bool:
    return len(visible_text(response).split()) >= c["value"]


@register_constraint("must_include", ("a non-empty string", _is_text))
def _must_include(example: Any, response: str, c: dict) -> bool:
    return c["value"].casefold() in visible_text(response).casefold()


@register_constraint("must_not_include", ("a non-empty string", _is_text))
def _must_not_include(example: Any, response: str, c: dict) -> bool:
    return c["value"].casefold() not in visible_text(response).casefold()


_LETTER_RE = re.compile(r"\(?([A-Z])\)?\.?")


@register_constraint("answer_is_choice_letter")
def _answer_is_choice_letter(example: Any, response: str, c: dict) -> bool:
    m = _LETTER_RE.fullmatch((extract_answer(response) or "").strip())
    n = len(getattr(example, "choices", None) or []) or 26
    return bool(m) and ord(m.group(1)) - ord("A") < n


_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?%?"
                        r"|[-+]?\d+\s*/\s*\d+|[-+]?\\[dt]?frac\{\d+\}\{\d+\}")


@register_constraint("answer_is_number")
def _answer_is_number(example: Any, response: str, c: dict) -> bool:
    return bool(_NUMBER_RE.fullmatch((extract_answer(response) or "").strip().strip("$").strip()))


_SCRIPTS = {
    "latin": re.compile(r"[A-Za-z\u00C0-\u024F]"),
    "cyrillic": re.compile(r"[\u0400-\u04FF]"),
    "han": re.compile(r"[\u3400-\u4DBF\u4E00-\u9FFF]"),
    "kana": re.compile(r"[\u3040-\u30FF]"),
    "hangul": re.compile(r"[\u1100-\u11FF\uAC00-\uD7AF]"),
}
LANGUAGE_SCRIPTS = {"en": ("latin",), "fr": ("latin",), "de": ("latin",), "es": ("latin",), "ru": ("cyrillic",),
                    "zh": ("han",), "ja": ("kana", "han"), "ko": ("hangul",)}
_ANY_LETTER = re.compile(r"[^\W\d_]")


@register_constraint("language", (f"one of {sorted(LANGUAGE_SCRIPTS)}",
                                  lambda v: isinstance(v, str) and v in LANGUAGE_SCRIPTS))
def _language(example: Any, response: str, c: dict) -> bool:
    text = visible_text(response)
    letters = len(_ANY_LETTER.findall(text))
    own = sum(len(_SCRIPTS[s].findall(text)) for s in LANGUAGE_SCRIPTS[c["value"]])
    # A majority, not all: Chinese math answers name their variables in Latin letters.
    return letters > 0 and own / letters > 0.5


# ---------------------------------------------------------------------------------------------------- hybrid accuracy
def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)  # this branch keeps exp from overflowing for very negative scores
    return z / (1.0 + z)


def route_accuracy(task: str, verdict: Verdict | None, score: float | None, cfg: RewardConfig) -> tuple[float, str]:
    """(accuracy, route) of one response; the table in the module docstring, row by row."""
    has_score = score is not None and math.isfinite(score)
    if task == "open":
        return (_sigmoid(score / cfg.rm_temperature), "model") if has_score else (0.0, "none")
    c = verdict.confidence
    if c > 0 and c >= cfg.min_confidence:
        return float(verdict.correct), "rule"
    if has_score:
        return _sigmoid(score / cfg.rm_temperature), "model"
    if c > 0:
        return float(verdict.correct), "rule_low_confidence"
    return 0.0, "none"


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


# ---------------------------------------------------------------------------------------------------- built-in aspects
@register_aspect("accuracy", group=True)
def accuracy(example: Any, group: Group) -> list[float]:
    return list(group.accuracy)


@register_aspect("format")
def format_reward(example: Any, response: str, ctx: Ctx) -> float:
    return float(format_ok(response, ctx.cfg.format))


@register_aspect("instruction")
def instruction(example: Any, response: str, ctx: Ctx) -> float:
    constraints = getattr(example, "constraints", None) or []
    if not constraints:
        return 1.0
    return sum(CONSTRAINT_KINDS[c["kind"]].check(example, response, c) for c in constraints) / len(constraints)


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


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class GroupRewards:
    total: list[float]  # (G,) the combined reward
    breakdown: dict[str, list[float]]  # aspect -> (G,) unweighted values
    route: list[str]  # (G,) which source decided the accuracy


def _check_list(key: str, values: Any, n: int, ok: Callable[[Any], bool], what: str) -> None:
    if values is None or len(values) != n:
        raise ValueError(f"{key}: expected {n} entries (one per response), got {values!r:.80}")
    for i, v in enumerate(values):
        if not ok(v):
            raise ValueError(f"{key}[{i}]: must be {what}, got {v!r:.80}")


def _normalize(xs: list[float], eps: float) -> list[float]:
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))  # population std: G is the whole group
    return [(x - mean) / (std + eps) for x in xs]


def combine(breakdown: dict[str, list[float]], cfg: RewardConfig) -> list[float]:
    n = len(next(iter(breakdown.values())))
    total = [0.0] * n
    for name, values in breakdown.items():
        w = cfg.weights.get(name, 0.0)
        if w == 0:
            continue
        if cfg.combine == "normalize_then_sum":
            values = _normalize(values, cfg.norm_eps)
        total = [t + w * v for t, v in zip(total, values)]
    return total


def score_group(example: Any, responses: Sequence[str], *, lengths: Sequence[int], finish_reasons: Sequence[str],
                model_scores: Sequence[float | None] | None = None, cfg: RewardConfig,
                verdicts: Sequence[Verdict] | None = None) -> GroupRewards:
    """Score the G responses to one prompt. `verdicts` (one per response) skips the verifier: score_batch
    passes verdicts computed in parallel, tests pass hand-made ones."""
    n = len(responses)
    if n == 0:
        raise ValueError(f"example {getattr(example, 'id', '?')}: empty group of responses")
    _check_list("responses", responses, n, lambda v: isinstance(v, str), "a str")
    _check_list("lengths", lengths, n, lambda v: isinstance(v, Integral) and not isinstance(v, bool) and v >= 0,
                "a non-negative integer number of tokens")
    _check_list("finish_reasons", finish_reasons, n, lambda v: isinstance(v, str), "a str")
    scores = [None] * n if model_scores is None else list(model_scores)
    _check_list("model_scores", scores, n, lambda v: v is None or (isinstance(v, Real) and not isinstance(v, bool)),
                "a number or None")
    task = _task(example)
    for c in getattr(example, "constraints", None) or []:
        validate_constraint(c)  # a bad constraint is a data bug: say so rather than score it 0 forever
    if task == "open":
        verdicts = [None] * n
    elif verdicts is None:
        verdicts = [verify(r, _gold(example), choices=getattr(example, "choices", None),
                           timeout_s=cfg.verifier_timeout_s) for r in responses]
    _check_list("verdicts", verdicts, n, lambda v: v is None or hasattr(v, "confidence"), "a Verdict")

    routed = [route_accuracy(task, v, s, cfg) for v, s in zip(verdicts, scores)]
    acc, route = [a for a, _ in routed], [r for _, r in routed]
    if cfg.accuracy_requires_format:
        acc = [a if format_ok(r, cfg.format) else 0.0 for a, r in zip(acc, responses)]
    group = Group(list(responses), list(lengths), list(finish_reasons), acc, route, list(verdicts), scores, cfg)

    breakdown: dict[str, list[float]] = {}
    for name in ["accuracy"] + [a for a, w in cfg.weights.items() if w != 0 and a != "accuracy"]:
        aspect = ASPECTS[name]
        if aspect.group:
            values = aspect.fn(example, group)
        else:
            values = [aspect.fn(example, r, Ctx(i, lengths[i], finish_reasons[i], acc[i], route[i], cfg))
                      for i, r in enumerate(responses)]
        # A NaN here would silently poison every advantage of the batch: fail loudly on a broken aspect.
        _check_list(f"aspect {name}", values, n, lambda v: isinstance(v, Real) and math.isfinite(v), "a finite number")
        breakdown[name] = [float(v) for v in values]
    return GroupRewards(combine(breakdown, cfg), breakdown, route)


def score_batch(examples: Sequence[Any], groups: Sequence[Sequence[str]], *, lengths: Sequence[Sequence[int]],
                finish_reasons: Sequence[Sequence[str]], model_scores: Sequence[Sequence[float | None]] | None = None,
                cfg: RewardConfig, workers: int | None = None) -> list[GroupRewards]:
    """score_group over many groups, with one verify_batch call for all of them (workers: None = cfg.workers)."""
    for key, seq in (("groups", groups), ("lengths", lengths), ("finish_reasons", finish_reasons),
                     ("model_scores", model_scores)):
        if seq is not None and len(seq) != len(examples):
            raise ValueError(f"{key}: expected {len(examples)} groups (one per example), got {len(seq)}")
    checkable = [_task(ex) == "verifiable" for ex in examples]
    items = [(r, _gold(ex), getattr(ex, "choices", None))
             for ex, group, ok in zip(examples, groups, checkable) if ok for r in group]
    verdicts = iter(verify_batch(items, workers=cfg.workers if workers is None else workers,
                                 timeout_s=cfg.verifier_timeout_s))
    out = []
    for k, (ex, group) in enumerate(zip(examples, groups)):
        out.append(score_group(ex, group, lengths=lengths[k], finish_reasons=finish_reasons[k],
                               model_scores=None if model_scores is None else model_scores[k], cfg=cfg,
                               verdicts=[next(verdicts) for _ in group] if checkable[k] else None))
    return out


# ---------------------------------------------------------------------------------------------------- logging
def route_counts(groups: Sequence[GroupRewards]) -> dict[str, int]:
    """Responses per accuracy route over a batch; every route present, so log keys stay stable."""
    counts = dict.fromkeys(ROUTES, 0)
    for g in groups:
        for r in g.route:
            counts[r] = counts.get(r, 0) + 1
    return counts


def aspect_means(groups: Sequence[GroupRewards]) -> dict[str, float]:
    """Mean unweighted value of every aspect over a batch (plus the total), for the step log."""
    sums: dict[str, list[float]] = {}
    for g in groups:
        for name, values in {**g.breakdown, "total": g.total}.items():
            sums.setdefault(name, []).extend(values)
    return {name: sum(v) / len(v) for name, v in sums.items()}
