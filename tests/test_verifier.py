"""Tests for harmo_min.verifier: the labelled case set, the contract the combiner relies on, hostile input,
the wall-clock bound, threads and the process-pool batch."""

import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import FrozenInstanceError

import pytest

from harmo_min import verifier
from harmo_min.verifier import Verdict, extract_answer, verify, verify_batch

sys.path.insert(0, os.path.dirname(__file__))  # the case set is plain data beside this file (the bench reuses it)
from verifier_cases import ADVERSARIAL, CASES  # noqa: E402

STRONG = {"exact", "numeric", "symbolic", "choice"}
REASONS = STRONG | {"string", "unit", "no_answer", "gold_unparseable", "too_large", "timeout", "error"}
BOUND_S = 2.0


def _timed(*args, **kwargs) -> tuple[Verdict, float]:
    t = time.perf_counter()
    v = verify(*args, **kwargs)
    return v, time.perf_counter() - t


# ---------------------------------------------------------------------------------------------------------
# The labelled case set


def test_case_set_covers_every_category_both_ways():
    outcomes = defaultdict(set)
    for category, *_, correct in CASES:
        outcomes[category].add(correct)
    assert len(CASES) >= 150
    assert {c for c, o in outcomes.items() if o != {True, False}} == set()
    assert len(outcomes) >= 14


@pytest.mark.parametrize("category,response,gold,choices,expected", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_labelled_case(category, response, gold, choices, expected):
    v, dt = _timed(response, gold, choices=choices)
    assert v.correct is expected, v
    assert v.reason in REASONS and 0.0 <= v.confidence <= 1.0
    if v.reason in STRONG and v.reason != "choice":
        assert v.confidence == 1.0
    if v.correct:
        assert v.confidence > 0.5  # never a correct verdict the combiner is told to ignore
    assert dt < BOUND_S


# ---------------------------------------------------------------------------------------------------------
# The contract other components rely on


def test_gold_unparseable_is_never_correct():
    for gold in ["", "   ", "$$", "\\boxed{}", "\\frac{1}{", None, "\\begin{pmatrix}1\\end{pmatrix}"]:
        v = verify("\\boxed{5}", gold)
        assert (v.correct, v.confidence, v.reason) == (False, 0.0, "gold_unparseable"), gold


@pytest.mark.parametrize("gold", ["???", "(", "-", "...", "?!"])
def test_placeholder_gold_never_scores_even_when_copied(gold):
    v = verify(f"<answer>{gold}</answer>", gold)
    assert (v.correct, v.confidence, v.reason) == (False, 0.0, "gold_unparseable")


def test_symbol_only_golds_with_content_still_verify():
    assert verify("<answer>∞</answer>", "∞").correct and verify("<answer>½</answer>", "1/2").correct


def test_no_answer_is_confidently_wrong():
    v = verify("I think about it at length but never commit to anything.\nStill thinking.", "5")
    assert v == Verdict(False, 1.0, None, "no_answer")


def test_weak_fallback_has_lower_confidence():
    right, wrong = verify("<answer>Yes</answer>", "yes"), verify("<answer>blue</answer>", "red")
    assert right.correct and not wrong.correct
    assert right.reason == wrong.reason == "string"
    assert 0.5 < right.confidence < 1.0 and wrong.confidence == right.confidence


def test_strong_decisions_have_full_confidence():
    for response, gold, reason in [("\\boxed{5}", "5", "exact"), ("\\boxed{0.5}", "\\frac{1}{2}", "numeric"),
                                   ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", "symbolic"), ("(B)", "B", "choice")]:
        v = verify(response, gold)
        assert (v.correct, v.confidence, v.reason) == (True, 1.0, reason)


def test_verdict_is_frozen_and_keeps_pred():
    v = verify("so \\boxed{\\frac{1}{2}}", "0.5")
    assert v.pred == "\\frac{1}{2}"
    with pytest.raises(FrozenInstanceError):
        v.correct = False


def test_odd_arguments_do_not_crash():
    assert verify("\\boxed{2}", "B", choices=[1, 2, 3]).correct  # numeric option texts
    assert verify("\\boxed{\\sqrt{4}}", "2", timeout_s=float("inf")).correct
    assert verify("\\boxed{\\sqrt{4}}", "2", timeout_s=0).reason == "timeout"
    assert verify("\\boxed{2}", True).reason == "gold_unparseable"


def test_numeric_golds_from_json():
    assert verify("\\boxed{3.5}", 3.5).correct
    assert verify("\\boxed{12}", 12).correct
    assert not verify("\\boxed{13}", 12).correct


# ---------------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize("response,expected", [
    ("<think>a</think><answer> 42 </answer>", "42"),
    ("<answer>\\boxed{\\frac{a}{b}}</answer>", "\\frac{a}{b}"),
    ("first \\boxed{1} then \\boxed{\\frac{2}{\\sqrt{3}}}", "\\frac{2}{\\sqrt{3}}"),
    ("The answer is $x^2$.", "x^2"),
    ("Final Answer: The final answer is 7. I hope it is correct.", "7"),
    ("the answer is:\n(C)", "(C)"),
    ("**Answer:** B", "B"),
    ("\\boxed 5", "5"),
    ("truncated \\boxed{12", None),
    ("<answer>unclosed", None),
    ("", None),
    ("\n\n", None),
    ("A long reasoning without any final marker at all.\nAnd another line.", None),
    (None, None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_final_answer_beats_earlier_mentions():
    response = "The answer is 4. Hmm, no: <answer>\\boxed{5}</answer>. Earlier I wrote \\boxed{4}."
    assert extract_answer(response) == "5"


# ---------------------------------------------------------------------------------------------------------
# Hostile input: never crash, never hang


@pytest.mark.parametrize("name,response,gold,choices", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial(name, response, gold, choices):
    v, dt = _timed(response, gold, choices=choices)
    assert isinstance(v, Verdict)
    assert v.correct is False and v.reason in REASONS, v
    assert dt < BOUND_S, f"{name} took {dt:.2f}s"


@pytest.mark.parametrize("response,reason", [
    ("\\boxed{10^{10^{10^{10}}}}", "too_large"), ("\\boxed{9^9^9^9}", "too_large"),
    ("\\boxed{(10!)!}", "too_large"), ("\\boxed{" + "(" * 2000 + "1" + ")" * 2000 + "}", "too_large"),
    ("so \\boxed{\\frac{1}{2}", "no_answer"),
])
def test_guards_name_the_reason(response, reason):
    v = verify(response, "5")
    assert (v.correct, v.reason) == (False, reason)


def test_answer_at_the_end_of_200kb_response():
    response = "Let me think. " * 15_000 + "\x00 So the answer is \\boxed{\\frac{3}{4}}."
    v, dt = _timed(response, "0.75")
    assert v.correct and dt < BOUND_S


# Runs that made the pre-sympy regexes quadratic (3.5 s at 16 K spaces, minutes at 200 K): every path is bounded,
# not only sympy. Each is an incorrect answer, so the verdict is known; the time is what is tested.
RUN = 200_000
SLOW_PATHS = [
    ("spaces in a math answer", "<answer>1" + " " * RUN + "2</answer>", "5", None),
    ("spaces in a choice answer", "<answer>1" + " " * RUN + "x</answer>", "B", ["3 cm", "5 cm"]),
    ("spaces after 'option'", "<answer>option" + " " * RUN + "!</answer>", "B", ["3 cm", "5 cm"]),
    ("spaces in a text answer", "<answer>the" + " " * RUN + "x</answer>", "Paris", None),
    ("spaces in a phrase", "The answer is" + " " * RUN + "x", "5", None),
    ("spaces in a bare reply", "  x" + " " * RUN, "5", None),
    ("whitespace mix", "<answer>" + "\t\n " * (RUN // 3) + "5 ,</answer>", "4", None),
    ("braces in an answer", "<answer>" + "{" * RUN + "</answer>", "5", None),
    ("spaces before carets in the gold", "\\boxed{x}", "x" + " " * 2900 + "^2", None),
    ("commas in a gold set", "\\boxed{x}", "{" + "," * 2900 + "x", None),
    ("spaces after 'option' in the gold", "\\boxed{x}", "option" + " " * 2900 + "!", ["3 cm", "5 cm"]),
    ("letters and spaces before a unit", "\\boxed{1}", "1 " + "a" * 1400 + " " * 1400 + "!", None),
]


@pytest.mark.parametrize("name,response,gold,choices", SLOW_PATHS, ids=[s[0] for s in SLOW_PATHS])
def test_every_path_is_bounded(name, response, gold, choices):
    v, dt = _timed(response, gold, choices=choices, timeout_s=0.2)
    assert v.correct is False and v.reason in REASONS, v.reason
    assert dt < 0.5, f"{name} took {dt:.2f}s"


@pytest.mark.parametrize("response,gold", [
    ("<answer>}}}}5{{{</answer>", "5"),
    ("<answer>\\frac{1}{2</answer>", "\\frac{1}{2}"),
    ("<answer>((5</answer>", "5"),
    ("<answer>}}}Paris{{{</answer>", "Paris"),
    ("<answer>[yes</answer>", "yes"),
    ("<answer>\\text{Paris</answer>", "Paris"),
])
def test_weak_fallback_rejects_unbalanced_and_garbage(response, gold):
    v = verify(response, gold)
    assert v.correct is False, v


def test_weak_fallback_still_matches_prose():
    for response, gold in [("<answer>the Eiffel Tower.</answer>", "Eiffel Tower"), ("\\boxed{\\text{Paris}}", "Paris"),
                           ("<answer>U.S.A.</answer>", "USA"), ("<answer>YES!</answer>", "yes")]:
        assert verify(response, gold) == Verdict(True, verifier.WEAK, extract_answer(response), "string")


def _hang(*args):
    time.sleep(60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on the forked worker inheriting a patch")
def test_hung_sympy_job_is_cut_at_the_timeout(monkeypatch):
    verifier._shutdown()
    monkeypatch.setattr(verifier, "_sympy_compare", _hang)  # the next forked worker hangs on every job
    v, dt = _timed("\\boxed{x^2+2x+1}", "(x+1)^2", timeout_s=0.2)
    assert (v.correct, v.confidence, v.reason) == (False, 0.0, "timeout")
    assert 0.2 <= dt < 0.2 + 1.0
    monkeypatch.undo()
    verifier._shutdown()
    assert verify("\\boxed{x^2+2x+1}", "(x+1)^2") == Verdict(True, 1.0, "x^2+2x+1", "symbolic")


def test_timeout_off_the_main_thread(monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("relies on the forked worker inheriting a patch")
    verifier._shutdown()
    monkeypatch.setattr(verifier, "_sympy_compare", _hang)
    got = []
    t = threading.Thread(target=lambda: got.append(_timed("\\boxed{\\sqrt{5}}", "2.24", timeout_s=0.2)))
    t.start()
    t.join(timeout=10)
    monkeypatch.undo()
    verifier._shutdown()
    (v, dt), = got
    assert v.reason == "timeout" and dt < 1.2


def test_dead_worker_is_replaced():
    assert verify("\\boxed{\\sqrt{2}^2}", "2").correct
    os.kill(verifier._sympy.pid, 9)
    os.waitpid(verifier._sympy.pid, 0)
    assert verify("\\boxed{\\sqrt{3}^2}", "3").correct


def test_an_interrupted_call_never_leaves_a_stale_answer(monkeypatch):
    # Ctrl-C between sending a job and reading its answer leaves that answer in the pipe: the worker must go,
    # or the next call would read it as its own verdict.
    assert verify("\\boxed{x^2}", "x^2+0").reason == "symbolic"  # the worker is up
    connection = type(verifier._sympy.conn)
    real_poll = connection.poll

    def interrupted(self, timeout=0.0):
        monkeypatch.setattr(connection, "poll", real_poll)
        raise KeyboardInterrupt

    monkeypatch.setattr(connection, "poll", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify("\\boxed{(x+1)^2}", "x^2+2x+1")  # its answer, True, was on its way
    assert verify("\\boxed{(x+1)^2}", "x^2+2x+2") == Verdict(False, 1.0, "(x+1)^2", "symbolic")


def test_an_interrupted_batch_never_leaves_a_stale_answer(monkeypatch):
    right, wrong = [("\\boxed{2}", "2")] * 6, [("\\boxed{3}", "2")] * 6
    assert all(v.correct for v in verify_batch(right, workers=2))  # the pool is up

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(verifier, "_verify_items", interrupted)  # this process's share; the workers got theirs
    with pytest.raises(KeyboardInterrupt):
        verify_batch(right, workers=2)
    monkeypatch.undo()
    assert [v.correct for v in verify_batch(wrong, workers=2)] == [False] * 6


def test_slow_sympy_is_bounded():
    # passes every guard but makes sympy work hard: the bound must hold anyway
    expr = "*".join(f"(x+{k})" for k in range(1, 40))
    v, dt = _timed(f"\\boxed{{{expr} + \\sin(10^{{8000}})}}", "(x+1)^{39}", timeout_s=0.3)
    assert v.correct is False and dt < 0.3 + 1.0


# ---------------------------------------------------------------------------------------------------------
# Threads and processes


def test_verify_off_the_main_thread():
    items = [c[1:4] for c in CASES[::7]]
    expected = [verify(r, g, choices=ch) for r, g, ch in items]
    got = []
    worker = threading.Thread(target=lambda: got.extend(verify(r, g, choices=ch) for r, g, ch in items))
    worker.start()
    worker.join(timeout=60)
    assert got == expected


def test_concurrent_threads_share_the_worker():
    results = [None] * 4

    def run(k):
        results[k] = [verify(f"\\boxed{{{k}\\sqrt{{2}}}}", f"\\sqrt{{{2 * k * k}}}") for _ in range(5)]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(v.correct and v.reason == "symbolic" for r in results[1:] for v in r)


def test_verify_batch_serial_equals_parallel():
    items = [c[1:4] for c in CASES] + [a[1:4] for a in ADVERSARIAL[:12]]
    serial = verify_batch(items, workers=0)
    parallel = verify_batch(items, workers=2)
    assert serial == parallel
    assert [v.correct for v in serial[:len(CASES)]] == [c[4] for c in CASES]


# Symbolic cases: each needs the sympy worker, which a daemonic process could not start with multiprocessing.
SYMBOLIC = [("\\boxed{2^3}", "8", None), ("\\boxed{x^2+2x+1}", "(x+1)^2", None),
            ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", None), ("\\boxed{\\sin^2 x + \\cos^2 x}", "1", None),
            ("\\boxed{x^2}", "x^3", None), ("<answer>\\frac{\\pi}{3}</answer>", "60^\\circ", None)]
SYMBOLIC += [c[1:4] for c in CASES if c[0] == "algebra"]


def _verify_into(queue, items):
    queue.put(verify_batch(items) + verify_batch(items, workers=2))


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_same_verdicts_in_a_pool_worker(method):
    expected = verify_batch(SYMBOLIC, workers=2)  # the parent's pool and sympy worker exist when the pool forks
    assert sum(v.reason == "symbolic" for v in expected) >= 8 and any(v.correct for v in expected)
    with mp.get_context(method).Pool(1) as pool:
        assert pool.apply(verify_batch, (SYMBOLIC,), {}) == expected
        assert pool.apply(verify_batch, (SYMBOLIC,), {"workers": 2}) == expected


def test_same_verdicts_in_a_daemon_process():
    expected = verify_batch(SYMBOLIC)
    queue = mp.Queue()
    child = mp.Process(target=_verify_into, args=(queue, SYMBOLIC), daemon=True)
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert got == expected + expected


def test_pool_is_reused_and_replaces_a_dead_worker():
    items = [c[1:4] for c in CASES]
    first = verify_batch(items, workers=2)
    pids = [c.pid for c in verifier._pool]
    assert len(pids) == 2 and verify_batch(items, workers=2) == first
    assert [c.pid for c in verifier._pool] == pids  # the same processes: no pool start per call
    os.kill(pids[0], 9)
    os.waitpid(pids[0], 0)
    assert verify_batch(items, workers=2) == first
    now = [c.pid for c in verifier._pool]
    assert len(now) == 2 and pids[1] in now and pids[0] not in now


def test_pool_timeout_holds_in_its_workers(monkeypatch):
    verifier._shutdown()
    monkeypatch.setattr(verifier, "_sympy_compare", _hang)  # inherited by the pool's workers when they fork
    t = time.perf_counter()
    got = verify_batch([("\\boxed{x^2+2x+1}", "(x+1)^2")] * 4, workers=2, timeout_s=0.2)
    dt = time.perf_counter() - t
    monkeypatch.undo()
    verifier._shutdown()
    assert [v.reason for v in got] == ["timeout"] * 4 and dt < 2 * 0.2 + 2.0


def test_pool_from_threads():
    items = [c[1:4] for c in CASES[::3]]
    expected = verify_batch(items)
    got = [None] * 3

    def run(k):
        got[k] = verify_batch(items, workers=2)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == [expected] * 3


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc")
def test_worker_processes_end_with_the_parent():
    code = ("from harmo_min import verifier; verifier.verify_batch([('\\\\boxed{2^3}', '8')] * 8, workers=2); "
            "print(*[c.pid for c in verifier._pool], verifier._sympy and verifier._sympy.pid)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    pids = [int(p) for p in out.stdout.split() if p != "None"]
    assert len(pids) == 3  # two pool workers and the sympy worker of the parent, which verifies a share itself
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    assert not any(_running(p) for p in pids)


def _running(pid: int) -> bool:
    """Whether pid is a live process (a zombie left for a non-reaping init counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_verify_batch_accepts_pairs_and_empty():
    assert verify_batch([]) == []
    assert verify_batch([("\\boxed{1}", "1"), ("\\boxed{2}", "3")]) == [
        Verdict(True, 1.0, "1", "exact"), Verdict(False, 1.0, "2", "numeric")]


def test_module_imports_no_torch():
    code = "import sys, harmo_min.verifier; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_factorial_chains_of_a_constant_are_refused_not_an_error():
    """Found by the fuzz generator at another seed: "the!!!…!2" parses as t·h·e!!!…, and sympy evaluated the
    factorial chain of the constant e until mpmath overflowed (reason "error", confidence 0)."""
    v = verify("<answer>the" + "!" * 100 + "2</answer>", "15%")
    assert (v.correct, v.reason) == (False, "too_large")
    assert verify("<answer>n!</answer>", "n!").correct and verify("<answer>120</answer>", "5!").correct
