"""A fuzz guard that stays in CI: seeded random and adversarial text through the verifier and the combiner.

Every call must return (no exception) within 2 s, whatever the text: unicode soup, 200 KB responses, runs of
whitespace and braces, deep nesting, huge numbers, LaTeX and tag soup, and golds made of the same. Then the
verdicts on random symbolic identities must be the same inside a multiprocessing.Pool worker as in this process.
The whole file is bounded to about 30 s on a busy 2-core machine; a failure names the seed and the case index.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import random
import time
from dataclasses import dataclass, field

import pytest

from harmo_min import rewards as R
from harmo_min.verifier import Verdict, verify, verify_batch

SEED = 20261201
BOUND_S = 2.0
REASONS = {"exact", "numeric", "symbolic", "choice", "string", "unit", "no_answer", "gold_unparseable", "too_large",
           "timeout", "error"}
LATEX = ["\\frac", "\\dfrac", "\\sqrt", "\\boxed", "\\fbox", "\\left(", "\\right)", "\\text{", "\\pi", "^", "_", "{",
         "}", "(", ")", "[", "]", "\\cdot", "\\times", "\\begin{pmatrix}", "\\\\", "$", "\\infty", "\\le", "\\{", "\\}",
         "\\circ", "\\%", "\\,", "!", "=", "+", "-", "/", ",", "x", "y", "2", "10", "0.5", " ", "  ", "\n", "\\log_",
         "\\binom", "\\mathrm{cm}", "∪", "√", "½", "²", "°", "π"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<ANSWER>", "</Answer>", "<THINK>", "</THINK>", "answer:",
        "The answer is", "Final Answer:", "\\boxed{", "}", "\n", " ", "B", "5", "(C)"]
GOLDS = ["5", "-3", "0.5", "\\frac{1}{2}", "x^2+1", "2\\sqrt{3}", "B", "Paris", "\\{1, 2\\}", "(1, 2]", "60^\\circ",
         "15%", "5 cm", "x = 3", "1,000", "\\infty", "yes"]
CHOICES = [None, None, ["3 cm", "5 cm", "7 cm", "9 cm"], ["Paris", "Rome"], ["1/2", "\\sqrt{2}", "x^2", "none"]]


def _soup(rng: random.Random, n: int) -> str:
    """Unicode from every corner: ASCII, control characters, Latin-1 to CJK, lone surrogates, emoji."""
    ranges = [(0x20, 0x7F), (0x00, 0x20), (0xA0, 0x3000), (0x4E00, 0x9FFF), (0xD800, 0xE000), (0x1F300, 0x1FA00)]
    return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(n))


def _tokens(rng: random.Random, n: int, vocab: list[str]) -> str:
    return "".join(rng.choice(vocab) for _ in range(n))


def _run(rng: random.Random, n: int) -> str:
    """A long run of one hostile character (the shape that made quadratic regexes take minutes)."""
    char = rng.choice([" ", "\t", "\n", "{", "}", "(", "\\", "$", ",", "0", "a", "<", "^", "_", "!", "."])
    return rng.choice(["", "1", "x", "option", "the", "answer is"]) + char * n + rng.choice(["", "2", "x", "!", "}"])


def _nested(rng: random.Random, depth: int) -> str:
    opener, closer = rng.choice([("(", ")"), ("{", "}"), ("[", "]"), ("\\sqrt{", "}"), ("\\frac{1}{", "}"),
                                 ("<answer>", "</answer>"), ("\\left(", "\\right)")])
    return opener * depth + rng.choice(["1", "x", "", "\\pi"]) + closer * rng.choice([depth, depth // 2, 0])


def _huge(rng: random.Random) -> str:
    k = rng.randrange(1, 7)
    return rng.choice([
        "9" * 10**k, "1e" + "9" * k, "10^{" * k + "10" + "}" * k, "9" + "!" * k * 3, "2^" * (k * 5) + "2",
        f"\\binom{{{10**k}}}{{{10**k // 2}}}", "0." + "3" * 10**k, f"{rng.randrange(10**k)}/{rng.randrange(10**k)}",
        "-" * 10**k + "1", "x^{" + "9" * k + "}", f"\\sin(10^{{{10**k}}})"])


def _answer(rng: random.Random) -> str:
    """One hostile candidate answer or gold, of any kind and size."""
    kind = rng.randrange(7)
    if kind == 0:
        return _soup(rng, rng.choice([1, 10, 300, 5000]))
    if kind == 1:
        return _tokens(rng, rng.choice([3, 30, 300, 3000]), LATEX)
    if kind == 2:
        return _run(rng, rng.choice([100, 5000, 50_000]))
    if kind == 3:
        return _nested(rng, rng.choice([5, 40, 2000]))
    if kind == 4:
        return _huge(rng)
    if kind == 5:
        return _tokens(rng, rng.choice([5, 50, 5000]), TAGS)
    return rng.choice(GOLDS)


def _response(rng: random.Random) -> str:
    a = _answer(rng)
    return rng.choice([a, f"<answer>{a}</answer>", f"\\boxed{{{a}}}", f"The answer is {a}.", f"<think>{a}</think>"
                       f"<answer>{_answer(rng)}</answer>", f"{a} so \\boxed{{{rng.choice(GOLDS)}}}"])


def _big(rng: random.Random) -> str:
    """About 200 KB: a long reasoning in one of the hostile shapes, with an answer somewhere or nowhere."""
    body = rng.choice([_soup(rng, 1000) * 200, _run(rng, 200_000), _tokens(rng, 40_000, LATEX),
                       _tokens(rng, 30_000, TAGS), _nested(rng, 60_000), "Let me think. " * 15_000])
    return body + rng.choice(["", "<answer>5</answer>", "\\boxed{\\frac{1}{2}}", "The answer is B."])


def _cases(seed: int, n: int, n_big: int) -> list[tuple[str, object, list[str] | None]]:
    rng = random.Random(seed)
    cases = []
    for k in range(n + n_big):
        response = _big(rng) if k < n_big else _response(rng)
        gold = rng.choice(GOLDS) if rng.random() < 0.7 else rng.choice([_answer(rng), None, 5, 2.5, 10**400])
        cases.append((response, gold, rng.choice(CHOICES)))
    return cases


def test_verify_survives_fuzz_within_the_bound():
    slowest = (0.0, None)
    for k, (response, gold, choices) in enumerate(_cases(SEED, n=1500, n_big=30)):
        t = time.perf_counter()
        v = verify(response, gold, choices=choices, timeout_s=0.5)
        dt = time.perf_counter() - t
        where = f"seed {SEED} case {k}: {response[:60]!r} vs {str(gold)[:60]!r}"
        assert isinstance(v, Verdict) and v.reason in REASONS and 0.0 <= v.confidence <= 1.0, where
        assert v.reason != "error", where  # a crash we caught is still a bug to find
        assert dt < BOUND_S, f"{where} took {dt:.2f} s"
        slowest = max(slowest, (dt, k))
    print(f"slowest verify: {slowest[0] * 1e3:.0f} ms (case {slowest[1]})")


@dataclass
class Ex:
    id: str
    answer: object
    choices: list[str] | None = None
    task: str = "verifiable"
    constraints: list[dict] = field(default_factory=list)


CONSTRAINTS = [{"kind": "max_words", "value": 30}, {"kind": "min_words", "value": 5},
               {"kind": "must_include", "value": "circle"}, {"kind": "must_not_include", "value": "x"},
               {"kind": "answer_is_choice_letter"}, {"kind": "answer_is_number"}, {"kind": "language", "value": "zh"}]


@pytest.mark.parametrize("answer_format", R.CHECKED_FORMATS)
def test_score_group_survives_fuzz_within_the_bound(answer_format):
    rng = random.Random(SEED + 1)
    cases = _cases(SEED + 1, n=200, n_big=8)
    cfg = R.RewardConfig.from_dict({"weights": {"overlong": 1.0}, "overlong_max_len": 512, "overlong_buffer": 128,
                                    "accuracy_requires_format": True, "verifier_timeout_s": 0.5},
                                   answer_format=answer_format)
    for g in range(0, len(cases), 4):
        group = cases[g:g + 4]
        _, gold, choices = group[0]
        ex = Ex(f"fuzz{g}", gold, choices, task=rng.choice(["verifiable", "open"]), constraints=CONSTRAINTS)
        responses = [r for r, _, _ in group]
        scores = [rng.choice([None, 0.0, 3.5, -1e300, float("nan"), float("inf"), 10**400]) for _ in group]
        t = time.perf_counter()
        out = R.score_group(ex, responses, lengths=[rng.randrange(0, 600) for _ in group],
                            finish_reasons=[rng.choice(["eos", "length"]) for _ in group], model_scores=scores, cfg=cfg)
        dt = time.perf_counter() - t
        where = f"seed {SEED + 1} group {g}"
        assert all(math.isfinite(x) for x in out.total) and set(out.route) <= set(R.ROUTES), where
        assert dt < BOUND_S * len(group), f"{where} took {dt:.2f} s"


def _identities(seed: int, n: int) -> list[tuple[str, str, None]]:
    """Random symbolic cases, half of them true: expanded products, trig and log identities, rescaled roots."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randrange(1, 9), rng.randrange(-9, 9), rng.randrange(2, 50)
        wrong = rng.random() < 0.5
        pred, gold = rng.choice([
            (f"(x+{a})(x{b:+d})", f"x^2{a + b + wrong:+d}x{a * b:+d}"),
            (f"\\sin^2 {a}x + \\cos^2 {a}x", f"{1 + wrong}"),
            (f"\\sqrt{{{c * a * a}}}", f"{a + wrong}\\sqrt{{{c}}}"),
            (f"\\log({a}) + \\log({c})", f"\\log({a * c + wrong})"),
            (f"\\frac{{x^2-{a * a}}}{{x-{a}}}", f"x+{a + wrong}"),
        ])
        out.append((f"<answer>{pred}</answer>", gold, None))
    return out


def test_pool_worker_verdicts_equal_this_process_on_symbolic_cases():
    items = _identities(SEED + 2, 40)
    here = verify_batch(items)
    assert sum(v.reason == "symbolic" for v in here) >= 20 and any(v.correct for v in here)
    with mp.get_context("fork").Pool(2) as pool:
        assert pool.map(verify_batch, [items[:20], items[20:]]) == [here[:20], here[20:]]
        assert pool.apply(verify_batch, (items,), {"workers": 2}) == here
