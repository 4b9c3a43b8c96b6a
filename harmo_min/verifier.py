r"""The rule verifier: the rule-based half of HARMO's hybrid accuracy reward.

`verify(response, gold, choices=None)` decides whether a response's final answer matches the gold answer of a
checkable item (math, geometry, charts, multiple choice), with a confidence that tells the combiner when to trust
the decision. `verify_batch` scores a rollout batch, optionally in persistent worker processes.

    >>> verify(r"so the area is <answer>\frac{1}{2}</answer>", "0.5")
    Verdict(correct=True, confidence=1.0, pred='\\frac{1}{2}', reason='numeric')

Pipeline, cheapest first (most rollouts never reach sympy):
1. Extraction: the last <answer>...</answer> block (`answer_block`; a \boxed{} inside is unwrapped), else the last
   \boxed{} or \fbox{} (`last_boxed`; a malformed last box is no answer, an earlier one never counts), else the last
   "the answer is ..." / "Answer: ..." phrase, else a bare one-line reply. rewards.py reads answers the same way.
2. Size guards before any other work: a gold or prediction over MAX_ANSWER_CHARS is not an answer.
3. Exact match after light normalisation (whitespace, $, \left/\right, \dfrac).
4. Multiple choice (`choices` given, or a capital-letter gold): `B`, `(B)`, `Option B` or the option's own text.
5. Plain-text golds ("Yes", "Eiffel Tower"): normalised strings; case, punctuation and articles are ignored,
   brackets are not (an unbalanced or bracket-padded prediction never matches).
6. Math: our LaTeX/unicode normaliser; sets (order-free), tuples, intervals, unions; equations (`x = 5` vs `5`,
   sides swapped or scaled); units, degrees and percent; plain numbers as exact Fractions here, the rest in sympy
   through our own recursive-descent parser (no eval). Numbers are equal, or the gold has k decimals and a more
   precise prediction rounds to it (4/3 vs 1.33), or the prediction has >= 2 decimals and an exact gold rounds to
   it. Expressions: a - b is 0, or vanishes (relative 1e-9) at five points where each symbol gets its own value,
   else sympy.simplify decides.

Confidence: 1.0 when both sides were parsed and compared (exact, numeric, symbolic, choice) and for the
confidently wrong no_answer and too_large (a hostile answer that trips a size guard); WEAK when a fallback decided
(string, unit, a letter gold without option texts); 0.0 with correct=False when we cannot know (gold_unparseable,
timeout, error): the combiner routes it elsewhere. Only the exact stage comes before the gold-parsing check.

Bounded on any text: linear-time regexes, size guards first, and sympy in one persistent worker process per
calling process, forked with os.fork (allowed in daemon and multiprocessing.Pool workers, unlike
multiprocessing.Process), SIGKILLed after `timeout_s` (which stops even a C-level big-integer loop, unlike
signal.alarm) and forked afresh by the next call. Threads share it under a lock; waiting counts against their
timeout. A bug hit by hostile text becomes reason "error"; what propagates says nothing about the text: OSError
(cannot fork or pipe) and RuntimeError from verify_batch when a pool worker dies or hangs. Needs os.fork (POSIX).

Left out: matrices, \pm, unit conversion (0.5 m vs 50 cm), degrees vs radians, ratios (1:2), intervals vs
inequalities (`x > 3` vs `(3, \infty)`), log base conventions (log is natural), number words beyond twelve.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate
from multiprocessing.connection import Pipe
from typing import Callable, Sequence

import sympy

if not hasattr(os, "fork"):
    raise ImportError("harmo_min.verifier needs os.fork (Linux or macOS) for its bounded sympy worker")

WEAK = 0.6  # Above the combiner's default min_confidence (0.5), so yes/no and name answers are still scored by
# rule; below 1.0, so a stricter setting can route them to the reward model: a normalised-string match is a
# reliable "yes", but a mismatch may be a paraphrase ("a puppy" vs "dog") or LaTeX our parser does not cover.
MAX_ANSWER_CHARS = 3000  # any final answer or gold: longer is not an answer (checked before any other work)
MAX_MATH_CHARS = 300  # a predicted math answer: longer "final answers" are not answers; bounds the parser too
MAX_DEPTH = 30  # bracket nesting: keeps our recursive parser and sympy far from the recursion limit
MAX_BITS = 33_220  # ~10,000 decimal digits for any exact number we build
MAX_INT_ARG = 1000  # largest factorial / binomial argument and integer power of a non-number
MAX_ITEMS = 32  # elements of a set or tuple


# ----------------------------------------------------------------------------------------------------------- public API
@dataclass(frozen=True)
class Verdict:
    correct: bool
    confidence: float  # in [0, 1]
    pred: str | None  # extracted final answer (None when nothing extracted)
    reason: str


def verify(response: str, gold: str, *, choices: list[str] | None = None, timeout_s: float = 1.0) -> Verdict:
    """Score one response against its gold answer; returns within about `timeout_s` on any text."""
    pred = None
    try:
        pred = extract_answer(response)
        gold = _gold_text(gold)
        if gold is None:
            return Verdict(False, 0.0, pred, "gold_unparseable")
        if pred is None or len(pred) > MAX_ANSWER_CHARS:
            return Verdict(False, 1.0, pred, "no_answer" if pred is None else "too_large")
        if _canon(pred) == _canon(gold):
            return Verdict(True, 1.0, pred, "exact")
        choices = [str(c) for c in choices] if choices else None
        correct, confidence, reason = _decide(pred, gold, choices, time.monotonic() + timeout_s)
        return Verdict(correct, confidence, pred, reason)
    except OSError:
        raise  # fork or pipe failed: a fault of the machine, not a verdict on the text
    except Exception:  # the one boundary: untrusted text must never crash a training step
        return Verdict(False, 0.0, pred, "error")


def verify_batch(items: Sequence[tuple[str, str, list[str] | None]], *, workers: int = 0,
                 timeout_s: float = 1.0) -> list[Verdict]:
    """Verdicts for (response, gold[, choices]) items in input order. workers > 0 shares them between this
    process and that many worker processes, started on first use and reused by later calls."""
    if workers <= 0 or len(items) <= 1:
        return _verify_items((items, timeout_s))
    with _pool_lock:
        return _pool_map(list(items), workers, timeout_s)


def extract_answer(response: str) -> str | None:
    """The final answer of a response, or None (see the module docstring for the order of preference)."""
    if not isinstance(response, str):
        return None
    text = _CONTROL.sub("", response)
    if (inner := answer_block(text)) is not None:
        return _tidy(last_boxed(inner) if "\\boxed" in inner or "\\fbox" in inner else _phrase(inner) or inner)
    if "\\boxed" in text or "\\fbox" in text:
        return _tidy(last_boxed(text))
    phrase, bare = _phrase(text), text.strip()
    one_line = len(bare) <= 40 and "\n" not in bare and "<answer>" not in _ascii_lower(bare)
    return _tidy(bare if phrase is None and one_line else phrase)  # a bare one-line reply ("5", "(B)") is an answer


def answer_block(text: str) -> str | None:
    """Content of the last <answer>...</answer> block (tags in any case), or None when there is none."""
    low = _ascii_lower(text)
    end = low.rfind("</answer>")
    start = low.rfind("<answer>", 0, end) if end >= 0 else -1
    return text[start + len("<answer>"):end] if start >= 0 else None


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} or \fbox{...} (also `\boxed 5`); None when it is absent or malformed."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    k = i + (6 if text.startswith("\\boxed", i) else 5)
    j = _BLANKS.match(text, k).end()
    if text.startswith("{", j):
        got = _braced(text, j)
        return got[0] if got else None
    m = _NON_SPACE.match(text, j)
    return m.group() if m and j > k else None


# ----------------------------------------------------------------------------------------------------------- extraction
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_BRACE = re.compile(r"[{}]")
_BLANKS = re.compile(" *")
_NON_SPACE = re.compile(r"[^\s$]+")
_LINE = re.compile(r"[^\n]*")
_PHRASE = re.compile(r"(?:final answer|the (?:correct |final )?(?:answer|option|choice)|answer)"
                     r"[ \t]*(?:is\b|:|=)[ \t]*:?\s*", re.I)


def _ascii_lower(s: str) -> str:
    """A-Z to a-z, nothing else: str.lower may change the length ("İ"), which would shift tag indices."""
    return s.lower() if s.isascii() else s.translate(_ASCII_LOWER)


def _braced(s: str, i: int) -> tuple[str, int] | None:
    """Content of the balanced {...} group opening at s[i] and the index after it; None if unbalanced."""
    depth = 0
    for m in _BRACE.finditer(s, i):  # jumps from brace to brace: linear even on a 200 KB response
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return s[i + 1:m.start()], m.end()
    return None


def _phrase(s: str) -> str | None:
    last = max(_PHRASE.finditer(s), key=lambda m: m.start(), default=None)  # the last: "Final Answer: The answer is 5"
    if last is None:
        return None
    line = _LINE.match(s, last.end()).group()
    return re.split(r"\.\s", line, maxsplit=1)[0]  # "5. Because ..." -> "5"; a decimal point has no space


def _tidy(a: str | None) -> str | None:
    if a is None:
        return None
    a = a.strip().strip("*").strip().rstrip(".").strip()  # markdown bold: "**Answer:** B"
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(a) >= len(left) + len(right) and a.startswith(left) and a.endswith(right):
            a = a[len(left):len(a) - len(right)].strip()
    return a.rstrip(".").strip() or None


def _gold_text(gold) -> str | None:
    """The gold answer as text, or None when it cannot be an answer. A gold with no letter, digit or ∞/∅
    ("???", "(", "-") is a placeholder: it must never let a response that copies it score 1."""
    if isinstance(gold, (int, float, Fraction)) and not isinstance(gold, bool):
        gold = str(gold)  # JSON golds are often numbers
    if not isinstance(gold, str):
        return None
    gold = _CONTROL.sub("", gold)
    text = _tidy(last_boxed(gold) if "\\boxed" in gold or "\\fbox" in gold else gold)
    if (not text or len(text) > MAX_ANSWER_CHARS or not any(ch.isalnum() or ch in "∞∅" for ch in text)
            or not _balanced(text) or _too_deep(text)):
        return None
    return text


# -------------------------------------------------- normalisation: LaTeX and unicode to the plain math our parser reads
_FUNCS = {"sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh",
          "tanh", "log", "ln", "exp", "abs", "binomial"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
          "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
          "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Sigma", "Phi", "Psi", "Omega"}
_NAMES = _FUNCS | _GREEK | {"pi", "oo"}
_LATEX = {  # what a command without an argument becomes; \x01 \x02: set braces, apart from LaTeX groups till the end
    "cdot": "*", "times": "*", "ast": "*", "div": "/", "infty": "oo", "le": "<=", "leq": "<=", "leqslant": "<=",
    "ge": ">=", "geq": ">=", "geqslant": ">=", "ne": "!=", "neq": "!=", "lt": "<", "gt": ">", "approx": "=",
    "circ": "°", "degree": "°", "%": "%", "cup": "∪", "in": "∈", "{": "\x01", "}": "\x02", "lbrace": "\x01",
    "rbrace": "\x02", "mid": "|", "vert": "|", "lvert": "|", "rvert": "|", **{name: f" {name} " for name in _NAMES},
    **dict.fromkeys([",", ";", ":", "!", " ", "\\", "quad", "qquad", "displaystyle", "textstyle", "left", "right",
                     "big", "Big", "bigg", "Bigg", "bigl", "bigr", "Bigl", "Bigr", "angle", "measuredangle",
                     "triangle"], " ")}
_WRAP = {"text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "operatorname", "mbox", "boxed",
         "overline", "overrightarrow", "vec", "hat", "bar", "widehat", "underline", "mathbb", "boldsymbol"}
_UNICODE = {"π": "\\pi ", "∞": "\\infty ", "×": "\\times ", "·": "\\cdot ", "⋅": "\\cdot ", "÷": "/", "−": "-",
            "–": "-", "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "≈": "=", "∪": "\\cup ", "²": "^2", "³": "^3",
            "°": "^\\circ ", "α": "\\alpha ", "β": "\\beta ", "θ": "\\theta ", "φ": "\\phi ", "∠": "", "△": ""}
_VULGAR = {"½": "1/2", "⅓": "1/3", "⅔": "2/3", "¼": "1/4", "¾": "3/4", "⅕": "1/5", "⅖": "2/5", "⅗": "3/5",
           "⅘": "4/5", "⅙": "1/6", "⅚": "5/6", "⅛": "1/8", "⅜": "3/8", "⅝": "5/8", "⅞": "7/8"}
_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven "
                                          "twelve".split())}
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_SPACES = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")
_ARG = re.compile(r" *(\{|\\[A-Za-z]+|[^ ])", re.S)  # one LaTeX argument: a {group}, a \command or one character
_CMD = re.compile(r"([^\\]+)|\\([A-Za-z]+|.)", re.S)  # plain text, or one LaTeX command


def _canon(s: str) -> str:
    """Light normalisation for the exact stage: only differences that never change the meaning."""
    s = re.sub(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[,;:! ]|\$", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s).strip()

    def run(m: re.Match) -> str:  # a whitespace run next to punctuation goes, any other becomes one space
        i, j = m.start(), m.end()  # (one match per run: linear, where \s*([^\w\s])\s* is quadratic on a long run)
        return "" if (i > 0 and _PUNCT.match(s, i - 1)) or (j < len(s) and _PUNCT.match(s, j)) else " "
    return _SPACES.sub(run, s).rstrip(".")


def _text_norm(s: str) -> str:
    """Case, punctuation and articles ignored; brackets kept, so "}}5{{" or "\\frac{1}{2" match nothing balanced."""
    s = re.sub(r"(?<=\w)[.'’](?=\w)", "", _TEXT_CMD.sub(r"\1", s).lower())  # U.S.A. -> usa
    return " ".join(w for w in re.sub(r"[^\w\s()\[\]{}]|_", " ", s).split() if w not in ("a", "an", "the"))


def _is_prose(s: str) -> bool:
    """Words and punctuation only, one of them not a math name ("pi"): compare as a string, not as math."""
    s = _TEXT_CMD.sub(r"\1", s)
    return not re.search(r"[\d\\^=+*/<>{}()\[\]|_%]", s) and any(
        w not in _NAMES for w in re.findall(r"[A-Za-z]{2,}", s))


def _nesting(brackets) -> list[int]:
    """The bracket depth after each character ((, [ and { alike; any other character leaves it)."""
    return list(accumulate((c in "([{") - (c in ")]}") for c in brackets))


def _balanced(s: str) -> bool:
    """Whether the unescaped LaTeX braces of s are balanced."""
    depth = _nesting(re.findall(r"(?<!\\)[{}]", s))
    return not depth or (min(depth) >= 0 and depth[-1] == 0)


def _too_deep(s: str) -> bool:
    return max(_nesting(s), default=0) > MAX_DEPTH


def _group(s: str, i: int) -> tuple[str, int]:
    """The LaTeX argument at s[i:] after any spaces, and the index after it."""
    m = _ARG.match(s, i)
    got = None if m is None else _braced(s, m.start(1)) if m[1] == "{" else (m[1], m.end())
    if got is None:
        raise _Fail("unparseable")
    return got


def _delatex(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if not (m := _CMD.match(s, i)):
            raise _Fail("unparseable")  # a trailing backslash
        text, name, i = m[1], m[2], m.end()
        if text:
            out.append(text.replace("{", "(").replace("}", ")"))
        elif name in ("frac", "dfrac", "tfrac", "cfrac", "binom"):
            a, i = _group(s, i)
            b, i = _group(s, i)
            a, b = _delatex(a), _delatex(b)
            out.append(f"binomial({a},{b})" if name == "binom" else f"(({a})/({b}))")
        elif name == "sqrt":
            root = None
            if s.startswith("[", i):
                close = s.find("]", i)
                if close < 0:
                    raise _Fail("unparseable")
                root, i = _delatex(s[i + 1:close]), close + 1
            a, i = _group(s, i)
            out.append(f"sqrt({_delatex(a)})" if root is None else f"(({_delatex(a)})^(1/({root})))")
        elif name in _WRAP:
            a, i = _group(s, i)
            out.append(f" {_delatex(a)} " if name == "text" else f"({_delatex(a)})")
        elif name in _LATEX:
            out.append(_LATEX[name])
            if name in ("left", "right") and s.startswith(".", i):
                i += 1  # \left. is an invisible delimiter
        else:
            raise _Fail("unparseable")  # \pm, \begin{pmatrix}, ...: not silently dropped
    return "".join(out)


def _to_math(s: str) -> str:
    """Answer text to plain math: `2\\sqrt{3}` -> `2 sqrt(3)`, `\\{1,2\\}` -> `{1,2}`, `30^\\circ` -> `30°`."""
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = re.sub(r"(\d?)([½⅓⅔¼¾⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞])", lambda m: f"({m[1]}+{_VULGAR[m[2]]})" if m[1] else
               f"({_VULGAR[m[2]]})", s)
    s = re.sub(r"√\s*(\d+(?:\.\d+)?|[A-Za-z]|\([^()]*\))", r"\\sqrt{\1}", s)
    s = re.sub(r"^(-?)(\d+)\s*\\[dt]?frac\{(\d+)\}\{(\d+)\}$", r"\1(\2+\3/\4)", s.strip())  # mixed number 3½
    s = _CONTROL.sub("", s).replace("\\!", "").replace("{,}", ",").replace("\\$", "").replace("$", "")  # currency
    if s.startswith("{") and s.endswith("}") and "," in s and _braced(s, 0) == (s[1:-1], len(s)):
        s = "\\{" + s[1:-1] + "\\}"  # a plain {1, 2} typed by a model means a set, not a LaTeX group
    m = _delatex(s)  # then x_{12} -> x_12, \theta_1 -> theta_1; \log_{2} stays for the parser
    m = re.sub(r"(?<![A-Za-z])(?!log\b)([A-Za-z]+)\s*_\s*(?:\(([A-Za-z0-9]+)\)|([A-Za-z0-9]))", r"\1_\2\3", m)
    m = "^".join(part.strip() for part in m.split("^"))  # not \s*\^\s*: quadratic on a run of spaces
    m = re.sub(r"\^\(?\s*°\s*\)?", "°", m).replace("\x01", "{").replace("\x02", "}")
    m = re.sub(r"^\s*[A-Za-z]\w*\s*∈", "", m)  # "x \in [1, 2]"
    return _SPACES.sub(" ", m).strip().rstrip(".").strip()


def _thousands(s: str) -> str:
    m = re.fullmatch(r"([-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?)(\D*)", s)  # "1,234,567 cm"; "1, 2" stays a list
    return m[1].replace(",", "") + m[2] if m else s


# ------------------------------------------------------------------------------------------------ comparing two answers
class _Fail(Exception):
    """Ends a comparison early; args[0] is the reason (unparseable, too_large, timeout, unit, ...)."""


@dataclass
class _Comparison:
    deadline: float  # time.monotonic() by which the whole comparison must be done
    used_sympy: bool = False  # decides the reason: "symbolic" rather than "numeric"


def _split_top(s: str, sep: str) -> list[str]:
    cuts = [i for i, (c, depth) in enumerate(zip(s, _nesting(s))) if c == sep and depth == 0]
    return [s[i + 1:j].strip() for i, j in zip([-1] + cuts, cuts + [len(s)])]


def _structure(s: str) -> tuple[str, list[str]] | None:
    """("union" | "set" | "list" | a bracket pair such as "[)", elements), or None for a single value."""
    if len(parts := _split_top(s, "∪")) > 1:
        return "union", parts
    depth = _nesting(s)  # "(1, 2]" is one bracket, "(1)+(2)" is not: its first bracket closes before the end
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}" and 0 not in depth[:-1] and depth[-1] == 0:
        items = _split_top(s[1:-1], ",")
        if s[0] == "{":
            return "set", items
        if len(items) > 1:
            return s[0] + s[-1], items
    items = _split_top(s, ",")
    return ("list", items) if len(items) > 1 else None


def _equation_value(s: str) -> str:
    """`x = 5` and `5 = x` -> `5`; a chain `AB = 2+3 = 5` -> `5`. Left alone unless one side is a name."""
    parts = _split_top(s, "=")
    if len(parts) < 2 or any(re.search(r"[<>!]$", p) for p in parts[:-1]):
        return s
    name = r"[A-Za-z][A-Za-z_0-9']*(?:\([A-Za-z]\))?"
    if re.fullmatch(name, parts[0].replace(" ", "")):
        return parts[-1]
    return parts[0] if len(parts) == 2 and re.fullmatch(name, parts[1].replace(" ", "")) else s


def _cmp_atom(p: str, g: str, ctx: _Comparison) -> bool:
    p, g = _WORDS.get(p.lower(), p), _WORDS.get(g.lower(), g)
    if ("=" in p) != ("=" in g):
        p, g = _equation_value(p), _equation_value(g)
    (p, pu), (g, gu) = _split_unit(p), _split_unit(g)
    pp, gp = p.endswith("%"), g.endswith("%")
    p, g = p.rstrip("%").strip(), g.rstrip("%").strip()
    scales = [(1, 1)] if pp == gp else [(1, 1), (100, 1) if gp else (1, 100)]  # 50% == 50 == 0.5
    pn, gn = _number(p), _number(g)
    if pn and gn:
        equal = any(_num_equal(pn[0] * a, pn[1], gn[0] * b, gn[1]) for a, b in scales)
    elif _is_prose(p):
        raise _Fail("unparseable")
    else:
        ctx.used_sympy = True
        jobs = [(f"({p})*{a}" if a != 1 else p, f"({g})*{b}" if b != 1 else g) for a, b in scales]
        equal = any(_sympy_call((jp, jg, pn and pn[1], gn and gn[1]), ctx.deadline) for jp, jg in jobs)
    if equal and pu and gu and pu != gu:
        raise _Fail("unit")
    return equal


def _cmp(p: str, g: str, ctx: _Comparison) -> bool:
    ps, gs = _structure(p), _structure(g)
    if ps is None and gs is None:
        return _cmp_atom(p, g, ctx)
    if ps is None or gs is None:  # {5} against 5
        kind, items = ps or gs
        return kind == "set" and len(items) == 1 and (_cmp(items[0], g, ctx) if ps else _cmp(p, items[0], ctx))
    (pk, pi), (gk, gi) = ps, gs
    if len(pi) != len(gi) or len(gi) > MAX_ITEMS:
        return False
    unordered = {"set", "list", "union"}
    if pk in unordered and gk in unordered and (pk == gk or "union" not in (pk, gk)):
        left = list(gi)
        for x in pi:  # greedy matching: fine, answer equality behaves as an equivalence
            hit = next((k for k, y in enumerate(left) if _cmp(x, y, ctx)), None)
            if hit is None:
                return False
            left.pop(hit)
        return True
    if pk == gk or ("list" in (pk, gk) and not {"set", "union"} & {pk, gk}):  # tuples, intervals: in order
        return all(_cmp(x, y, ctx) for x, y in zip(pi, gi))
    return False


_LETTER = re.compile(r"(?:(?:option|choice|answer)\s*(?::\s*)?)?(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])"
                     r"(?=$|[.:),]))", re.I)  # not \s*:?\s*, which splits a run of spaces in quadratically many ways
_GOLD_LETTER = re.compile(r"(?:(?i:option|choice)\s*)?\(?([A-J])\)?\.?")  # capitals only: a gold "x" is math


def _letter(s: str, n: int | None) -> int | None:
    m = _LETTER.match(_TEXT_CMD.sub(r"\1", s).replace("$", "").strip())
    k = ord((m[1] or m[2] or m[3]).upper()) - ord("A") if m else None
    return k if k is not None and (n is None or k < n) else None


def _option(s: str, choices: list[str], ctx: _Comparison) -> int | None:
    canon, text = _canon(s), _text_norm(s)
    mathy = len(s) <= MAX_MATH_CHARS and not _too_deep(s) and _balanced(s) and not _is_prose(s)
    for k, c in enumerate(choices):
        c = re.sub(r"^\s*\(?[A-Za-z][.:)]\s+", "", c)  # "A. 5 cm" -> "5 cm"
        if canon == _canon(c) or text == _text_norm(c):
            return k
        try:
            if mathy and not _is_prose(c) and _cmp(_to_math(s), _to_math(c), ctx):
                return k
        except _Fail:
            continue
    return None


def _decide(pred: str, gold: str, choices: list[str] | None, deadline: float) -> tuple[bool, float, str]:
    ctx = _Comparison(deadline)
    if choices:
        gk = _letter(gold, len(choices)) if len(_canon(gold)) <= 12 else None
        gk = gk if gk is not None else _option(gold, choices, ctx)
        pk = _letter(pred, len(choices))
        pk = pk if pk is not None else _option(pred, choices, ctx)
        if gk is not None:
            return pk == gk, 1.0, "choice"
        if pk is not None:
            pred = choices[pk]  # the gold is a value that is not an option: compare the chosen option's text
    elif m := _GOLD_LETTER.fullmatch(_TEXT_CMD.sub(r"\1", gold).replace("$", "").strip()):
        pk = _letter(pred, None)
        if pk is None:
            return False, WEAK, "choice"  # "5 cm" vs "B" with no option texts to map it to a letter
        return pk == ord(m[1]) - ord("A"), 1.0, "choice"
    if _is_prose(gold):
        return _text_norm(pred) == _text_norm(gold), WEAK, "string"
    try:
        g = _thousands(_to_math(gold))
    except _Fail:
        return False, 0.0, "gold_unparseable"
    if len(pred) > MAX_MATH_CHARS or _too_deep(pred):
        return False, 1.0, "too_large"
    try:
        if not _balanced(pred):
            raise _Fail("unparseable")
        return _cmp(_thousands(_to_math(pred)), g, ctx), 1.0, "symbolic" if ctx.used_sympy else "numeric"
    except _Fail as f:
        reason = f.args[0]
    if reason == "unparseable":  # prose or LaTeX we do not cover: a weak string comparison decides
        return _text_norm(pred) == _text_norm(gold), WEAK, "string"
    if reason == "unit":
        return False, WEAK, "unit"  # equal values, different stated units; our alias table is small
    return False, 1.0 if reason == "too_large" else 0.0, reason


# ---------------------------------------------------------------- numbers, units and percent: the pure-Python fast path
_D = r"(\d+(?:\.\d*)?|\.\d+)"
_NUM_RE = re.compile(rf"([-+]?)\(?{_D}(?:[eE]([-+]?\d{{1,3}})|\s*\*\s*10\s*\^\s*\(?([-+]?\d{{1,3}})\)?)?\)?")
_FRAC_RE = re.compile(rf"([-+]?)\(?\(?{_D}\)?\s*/\s*\(?{_D}\)?\)?")
_UNIT_RE = re.compile(r"(?P<val>.*?[\d)}\]])(?P<gap>\s*)(?P<unit>(?:(?:square|sq|cubic)\s+)?(?P<head>[A-Za-z]+|°)"
                      r"(?:\^?\(?[23]\)?)?(?:\s*/\s*[A-Za-z]+)?)")
_UNITS = {"m", "cm", "mm", "km", "g", "kg", "mg", "s", "h", "min", "l", "ml", "in", "ft", "yd", "mi", "lb", "n",
          "j", "w", "v", "hz", "°"}  # units that may touch the number ("5cm") or are one letter ("5 m")
_UNIT_ALIAS = {"meter": "m", "metre": "m", "centimeter": "cm", "centimetre": "cm", "millimeter": "mm",
               "kilometer": "km", "inch": "in", "inche": "in", "foot": "ft", "feet": "ft", "degree": "°",
               "deg": "°", "second": "s", "sec": "s", "minute": "min", "hour": "h", "hr": "h", "unit": "",
               "gram": "g", "kilogram": "kg", "liter": "l", "litre": "l"}


def _number(s: str) -> tuple[Fraction, int | None] | None:
    """(value, decimals as written, None unless a plain decimal literal) for a simple number, else None."""
    s = s.strip()
    if (m := _NUM_RE.fullmatch(s)) and s.count("(") == s.count(")"):
        exp = m[3] or m[4]
        v = Fraction(m[2]) * Fraction(10) ** int(exp or 0)
        return (-v if m[1] == "-" else v), (None if exp else len(m[2].partition(".")[2]))
    if (m := _FRAC_RE.fullmatch(s)) and s.count("(") == s.count(")") and Fraction(m[3]) != 0:
        v = Fraction(m[2]) / Fraction(m[3])
        return (-v if m[1] == "-" else v), None
    return None


def _num_equal(p: Fraction, pd: int | None, g: Fraction, gd: int | None) -> bool:
    def rounded(x: Fraction, k: int) -> Fraction:
        r = math.floor(abs(x) * 10 ** k + Fraction(1, 2)) / Fraction(10) ** k  # half away from zero
        return r if x >= 0 else -r

    if p == g or (gd and (pd is None or pd > gd) and rounded(p, gd) == g):
        return True  # equal, or the gold is given to gd decimals and the prediction is more precise
    return bool(pd and pd >= 2 and gd is None and rounded(g, pd) == p)  # prediction rounded, exact gold


def _split_unit(s: str) -> tuple[str, str]:
    """("5", "cm") for "5 cm" or "5cm"; any spaced word counts ("5 apples"), never a math name or "2 x"."""
    m = _UNIT_RE.fullmatch(s)
    if not m or m["head"] in _NAMES or (m["head"].lower() not in _UNITS and not (m["gap"] and len(m["head"]) > 1)):
        return s, ""
    unit = re.sub(r"\s+", " ", m["unit"]).lower()
    unit = unit[:-1] if len(unit) > 3 and unit.endswith("s") else unit
    return m["val"].strip(), _UNIT_ALIAS.get(unit, unit)


# ----------------------------- the sympy stage (in the worker): tokenizer, guarded recursive-descent parser, comparison
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)|([A-Za-z]+(?:_[A-Za-z0-9]+)?)"
                    r"|(\*\*|<=|>=|!=|[-+*/^()!=<>,|_]))")
_CONSTANTS = {"pi": sympy.pi, "oo": sympy.oo, "e": sympy.E, "i": sympy.I}
_FUNC_ALIAS = {"ln": sympy.log, "abs": sympy.Abs, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan}


def _tokens(s: str) -> list[tuple[str, str]]:
    out, i, s = [], 0, s.rstrip()
    while i < len(s):
        if not (m := _TOKEN.match(s, i)):
            raise _Fail("unparseable")
        i, (num, name, op) = m.end(), m.groups()
        if num or op:
            out.append(("num", num) if num else ("op", "^" if op == "**" else op))
        elif name.startswith("log_"):  # log_2 -> log _ 2, as \log_{2} gives
            out += [("name", "log"), ("op", "_"), _tokens(name[4:])[0]]
        elif name in _NAMES or "_" in name or len(name) == 1:
            out.append(("name", name))
        elif len(name) <= 3:  # "xy", "ABC": a product of one-letter symbols; longer words are prose
            out.extend(("name", ch) for ch in name)
        else:
            raise _Fail("unparseable")
    return out + [("end", "")]


def _checked(x: sympy.Expr) -> sympy.Expr:
    if x.is_Rational and abs(x.p).bit_length() + x.q.bit_length() > MAX_BITS:
        raise _Fail("too_large")
    return x


def _pow(b: sympy.Expr, e: sympy.Expr) -> sympy.Expr:
    if e.is_Rational and b.is_Rational and b != 0:
        if max(abs(b.p).bit_length(), b.q.bit_length()) * abs(e.p) > MAX_BITS:
            raise _Fail("too_large")  # checked before sympy computes it: 9^9^9 never gets built
    elif e.is_Rational and abs(e.p) > MAX_INT_ARG and not b.is_Number:
        raise _Fail("too_large")  # sqrt(2)^(10^10) would evaluate to an exact 2^(5*10^9)
    return sympy.Pow(b, e)


def _small(x: sympy.Expr) -> sympy.Expr:
    """A factorial / binomial argument: a symbol (n!) or an integer up to MAX_INT_ARG. Any other number is refused:
    (10!)!, binomial(10^5, 5*10^4) and e!!! (sympy evaluates the gamma function until mpmath overflows)."""
    if x.is_number and not (x.is_Integer and abs(x) <= MAX_INT_ARG):
        raise _Fail("too_large")
    return x


class _Parser:
    """rel := expr [relop expr];  expr := term {(+|-) term};  term := factor {[*|/] factor} (implicit: 2x);
    factor := (+|-) factor | atom {!} [^ factor];  atom := number | name | (expr) | |expr| | func [^ factor] arg"""

    def __init__(self, s: str):
        self.toks, self.i = _tokens(s), 0

    def take(self, *ops: str) -> str | None:
        kind, val = self.toks[self.i]
        if kind == "op" and val in ops:
            self.i += 1
            return val
        return None

    def parse(self):
        lhs = self.expr()
        op = self.take("=", "<", ">", "<=", ">=", "!=")
        out = lhs if op is None else ("rel", op, lhs, self.expr())
        if self.toks[self.i][0] != "end":
            raise _Fail("unparseable")
        return out

    def expr(self) -> sympy.Expr:
        e = self.term()
        while op := self.take("+", "-"):
            e = _checked(e + self.term() if op == "+" else e - self.term())
        return e

    def term(self) -> sympy.Expr:
        e = self.factor()
        while True:
            if op := self.take("*", "/"):
                e = e * self.factor() if op == "*" else e / self.factor()
            elif self.toks[self.i][0] in ("num", "name") or self.toks[self.i] == ("op", "("):
                e = e * self.factor()  # implicit product: 2x, 2(x+1), x sqrt(2)
            else:
                return e
            _checked(e)

    def factor(self) -> sympy.Expr:
        if op := self.take("-", "+"):
            f = self.factor()
            return -f if op == "-" else f
        e = self.atom()
        while self.take("!"):
            e = sympy.factorial(_small(e))
        return _pow(e, self.factor()) if self.take("^") else e

    def atom(self) -> sympy.Expr:
        kind, val = self.toks[self.i]
        self.i += 1
        if kind == "num":
            mantissa, _, exp = val.lower().partition("e")
            if exp and abs(int(exp)) > 9000:
                raise _Fail("too_large")
            return _checked(sympy.Rational(mantissa) * sympy.Integer(10) ** int(exp or 0))  # exact: 1.2e3
        if (kind, val) in (("op", "("), ("op", "|")):
            e = self.expr()
            if not self.take(")" if val == "(" else "|"):
                raise _Fail("unparseable")
            return e if val == "(" else sympy.Abs(e)
        if kind != "name":
            raise _Fail("unparseable")
        if val not in _FUNCS:
            return _CONSTANTS.get(val) or sympy.Symbol(val)
        base = self.atom() if val == "log" and self.take("_") else None  # \log_{2} 8
        exp = self.factor() if self.take("^") else None  # \sin^2 x
        if self.take("("):
            args = [self.expr()]
            while self.take(","):
                args.append(self.expr())
            if not self.take(")"):
                raise _Fail("unparseable")
        else:
            args = [self.factor()]  # \sqrt 2, \sin x
        if val == "binomial" and len(args) == 2:
            out = sympy.binomial(_small(args[0]), _small(args[1]))
        elif val == "log":
            out = sympy.log(*args) if base is None else sympy.log(*args, base)
        elif len(args) == 1:
            out = (_FUNC_ALIAS.get(val) or getattr(sympy, val))(args[0])
        else:
            raise _Fail("unparseable")
        return out if exp is None else _pow(out, exp)


_POINTS = [(0.0123, 0.0071), (0.31, 0.17), (0.73, 0.11), (1.37, 0.13), (2.11, 0.07)]  # the small point exposes
# differences that large powers hide elsewhere: (x+1)^1000 vs (x+1)^1000 + 1


def _complex(x: sympy.Expr) -> complex | None:
    try:
        z = complex(x)
    except (TypeError, ValueError, OverflowError):
        return None
    return z if z == z and abs(z) != float("inf") else None


def _values_equal(a: sympy.Expr, b: sympy.Expr, ad: int | None = None, bd: int | None = None) -> bool:
    if a == b or (diff := a - b) == 0:
        return True
    syms = sorted(diff.free_symbols | a.free_symbols | b.free_symbols, key=str)
    if not syms:  # evalf raises its working precision under cancellation, so N(diff) is accurate
        vd, va = _complex(sympy.N(diff, 30)), _complex(sympy.N(a, 30))
        if vd is not None and va is not None and abs(vd) <= 1e-25 * max(1.0, abs(va)):
            return True
        try:
            return _num_equal(Fraction(str(sympy.N(a, 30))), ad, Fraction(str(sympy.N(b, 30))), bd)
        except (ValueError, ZeroDivisionError):  # complex, infinite or undefined: no rounding rule applies
            return False
    checked = 0
    for start, step in _POINTS:
        values = [_complex(x.evalf(20, subs={s: start + step * k for k, s in enumerate(syms)})) for x in (diff, a, b)]
        if None in values:
            continue  # outside the domain (a pole, log of 0): try the next point
        if abs(values[0]) > 1e-9 * max(1.0, abs(values[1]), abs(values[2])):
            return False
        checked += 1
    return checked >= 3 or sympy.simplify(diff) == 0


def _sympy_compare(p: str, g: str, pd: int | None, gd: int | None) -> bool:
    try:
        gx = _Parser(g).parse()
    except (_Fail, RecursionError, ValueError, TypeError) as e:
        raise _Fail("gold_unparseable") from e
    try:
        px = _Parser(p).parse()
    except (RecursionError, ValueError, TypeError) as e:
        raise _Fail("unparseable") from e
    if not (isinstance(px, tuple) and isinstance(gx, tuple)):
        return not isinstance(px, tuple) and not isinstance(gx, tuple) and _values_equal(px, gx, pd, gd)
    # relations: x = 5 vs 5 = x, 2x = 10 vs x = 5, x > 3 vs 3 < x: compare right - left, up to a (positive) scale
    (_, po, pl, pr), (_, go, gl, gr) = px, gx
    flip = {">": "<", ">=": "<="}
    dp, po = (pl - pr, flip[po]) if po in flip else (pr - pl, po)
    dg, go = (gl - gr, flip[go]) if go in flip else (gr - gl, go)
    if po != go:
        return False
    if dp == 0 or dg == 0:
        return dp == dg
    symmetric = po in ("=", "!=")
    if _values_equal(dp, dg) or (symmetric and _values_equal(dp, -dg)):
        return True
    ratio = sympy.cancel(dp / dg)
    return bool(ratio.is_number and ratio != 0 and (symmetric or ratio.is_positive))


# -------------------------------------------------------------------------------------------------------------- workers
class _Child:
    """A forked process that answers each job sent over a pipe with `handle(job)`, until the pipe closes."""

    def __init__(self, handle: Callable):
        self.conn, child_end = Pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                self.conn.close()  # only the parent holds this end now: its death gives us EOF, not an orphan
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; its exit ends us
                while True:  # until recv raises EOFError: the parent closed its end or died
                    child_end.send(handle(child_end.recv()))
            finally:
                os._exit(0)  # never return into the caller's code, never run its atexit handlers
        child_end.close()

    def alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:  # already reaped
            return False

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass  # it had exited and been reaped already: nothing left to stop
        self.conn.close()


def _sympy_job(job: tuple) -> tuple[str, object]:
    try:
        return "ok", _sympy_compare(*job)
    except _Fail as f:
        return "fail", f.args[0]
    except Exception:  # the worker's own boundary: one bad job must not take the worker down
        return "fail", "error"


def _verify_items(job: tuple) -> list[Verdict]:
    items, timeout_s = job  # items: (response, gold) or (response, gold, choices)
    return [verify(r, g, choices=rest[0] if rest else None, timeout_s=timeout_s) for r, g, *rest in items]


_sympy: _Child | None = None  # this process's sympy worker
_sympy_lock = threading.Lock()
_pool: list[_Child] = []  # this process's verify_batch workers
_pool_lock = threading.Lock()


def _sympy_call(job: tuple, deadline: float) -> bool:
    global _sympy

    def left() -> float:  # clamped: acquire() and poll() reject huge timeouts, such as timeout_s=inf
        return min(max(0.0, deadline - time.monotonic()), 1e6)

    if left() <= 0 or not _sympy_lock.acquire(timeout=left()):
        raise _Fail("timeout")
    res, answered = ("fail", "timeout"), False
    try:
        if _sympy is not None and not _sympy.alive():
            _sympy.kill()
            _sympy = None
        if _sympy is None:
            _sympy = _Child(_sympy_job)  # an OSError here (cannot fork) propagates: no verdict on the text
        try:
            _sympy.conn.send(job)
            if _sympy.conn.poll(left()):
                res, answered = _sympy.conn.recv(), True
        except (EOFError, OSError):
            res = ("fail", "error")  # it died on this job
    finally:
        if _sympy is not None and not answered:  # hung, died or interrupted (Ctrl-C): its pipe may hold this
            _sympy.kill()  # job's answer, never to be read as the next job's
            _sympy = None
        _sympy_lock.release()
    if res[0] == "fail":
        raise _Fail(res[1])
    return res[1]


def _pool_map(items: list, workers: int, timeout_s: float) -> list[Verdict]:
    """verify_batch's parallel path (called under _pool_lock): the items in workers + 1 contiguous shares, one
    for each pool worker and the last for this process, which would otherwise sit idle waiting for them."""
    global _pool
    for child in [child for child in _pool if not child.alive()]:
        child.kill()
        _pool.remove(child)  # the live ones stay, a larger pool from an earlier call too: no churn
    while len(_pool) < workers:  # one at a time: each fork sees (and closes its copies of) the ones before it
        _pool.append(_Child(_verify_items))
    size = -(-len(items) // (workers + 1))
    shares = [(child, items[k * size:(k + 1) * size]) for k, child in enumerate(_pool[:workers])]
    hang_s = min(size * (timeout_s + 2.0) + 60.0, 1e6)  # far beyond a share's own bound: only a stuck worker
    out: list[Verdict] = []
    done = False
    try:
        for child, share in shares:
            child.conn.send((share, timeout_s))
        own = _verify_items((items[workers * size:], timeout_s))
        for child, share in shares:
            if not child.conn.poll(hang_s):
                raise TimeoutError(f"no answer within {hang_s:.0f} s")
            out += child.conn.recv()
        done = True
    except (EOFError, OSError) as e:  # a worker died (EOF, broken pipe) or hung (TimeoutError)
        raise RuntimeError(f"verify_batch: a worker process failed ({type(e).__name__}: {e}); "
                           "the pool was shut down and the next call starts a new one") from e
    finally:
        if not done:  # failed or interrupted: a pipe may hold an unread answer, so no worker is used again
            for child in _pool:
                child.kill()
            _pool = []
    return out + own


def _shutdown() -> None:
    """Kill this process's sympy worker and verify_batch pool (at exit; tests call it to start afresh)."""
    global _sympy, _pool
    for child in _pool + ([_sympy] if _sympy is not None else []):
        child.kill()
    _sympy, _pool = None, []


def _forget_after_fork() -> None:
    """In a forked child: drop (and close our copies of) the parent's workers, and any lock held at the fork."""
    global _sympy, _sympy_lock, _pool, _pool_lock
    for child in _pool + ([_sympy] if _sympy is not None else []):
        child.conn.close()
    _sympy, _pool = None, []
    _sympy_lock, _pool_lock = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(_shutdown)
