"""Side-by-side: harmo_min's rule verifier vs math-verify on the project's labelled case set.

What it measures, for both verifiers on the same (response, gold) pairs from tests/verifier_cases.py:
accuracy against the human labels (overall and per category), and the latency of one call (ours:
`verify(response, gold, choices=...)`; math-verify: `verify(parse(gold), parse(response))`, gold first, its
documented default use) as median / p99 / max over every call of every round. Then the hostile inputs
(ADVERSARIAL): the slowest call and how many went over 2 s, each math-verify call in a child process that is
killed after --kill-after seconds, because its signal.alarm timeout cannot stop a C-level big-integer loop.

Set up (math-verify lives in its own environment; it needs no torch, and our verifier imports none):

    python3 -m venv benchmarks/.venv-peers
    benchmarks/.venv-peers/bin/pip install math-verify==0.9.0 sympy
    benchmarks/.venv-peers/bin/python benchmarks/bench_verifier.py            # add --errors to list misses

Run from the repository root or anywhere: the script puts the repository root and tests/ on sys.path. Both
verifiers get one warm-up call first (math-verify builds its ANTLR parser, ours forks its sympy worker);
those one-off costs are printed separately. math-verify runs in the main thread, as it requires.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harmo_min.verifier import verify  # noqa: E402
from verifier_cases import ADVERSARIAL, CASES  # noqa: E402

try:
    from math_verify import parse as mv_parse, verify as mv_verify
except ImportError:  # still useful: our own figures
    mv_parse = mv_verify = None


def ours(response, gold, choices) -> bool:
    return verify(response, gold, choices=choices).correct


def theirs(response, gold, choices) -> bool:
    try:
        return bool(mv_verify(mv_parse(gold), mv_parse(response)))
    except Exception:  # math-verify may raise on odd input; the bench counts that as an incorrect verdict
        return False


def theirs_dollars(response, gold, choices) -> bool:
    """math-verify with the gold wrapped in $...$, as its README does: its LaTeX extractor needs delimiters."""
    return theirs(response, f"${gold}$" if isinstance(gold, str) else gold, choices)


def timed(fn, *args) -> tuple[bool, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))], xs[-1]


def run_cases(fn, rounds: int) -> tuple[list[bool], list[float]]:
    verdicts, lat = [], []
    for r in range(rounds):
        for _, response, gold, choices, _ in CASES:
            out, dt = timed(fn, response, gold, choices)
            lat.append(dt)
            if r == 0:
                verdicts.append(out)
    return verdicts, lat


def _child(conn, args) -> None:
    conn.send(timed(theirs_dollars, *args)[1])


def theirs_isolated(args, kill_after: float) -> float | None:
    """math-verify on one hostile input in a forked child; its latency, or None when it had to be killed."""
    recv, send = mp.Pipe(duplex=False)
    proc = mp.get_context("fork").Process(target=_child, args=(send, args))
    proc.start()
    got = recv.recv() if recv.poll(kill_after) else None
    proc.kill()
    proc.join()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="passes over the case set for the latency figures")
    ap.add_argument("--kill-after", type=float, default=30.0,
                    help="seconds before a hostile math-verify call is killed")
    ap.add_argument("--errors", action="store_true", help="list every case a verifier gets wrong")
    args = ap.parse_args()

    labels = [c[4] for c in CASES]
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its timeout warnings print whole inputs
    systems = [("harmo_min", ours)]
    if mv_verify:
        systems += [("math-verify 0.9.0, gold as given", theirs), ("math-verify 0.9.0, gold in $…$", theirs_dollars)]
    print(f"{len(CASES)} labelled cases, {len(ADVERSARIAL)} hostile inputs, {args.rounds} rounds, "
          f"python {sys.version.split()[0]}\n")
    results = {}
    for name, fn in systems:
        _, warm = timed(fn, "\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", None)
        verdicts, lat = run_cases(fn, args.rounds)
        results[name] = (verdicts, lat, warm)

    print("| verifier | accuracy | median | p99 | max | first call (warm-up) |")
    print("|---|---|---|---|---|---|")
    for name, (verdicts, lat, warm) in results.items():
        acc = sum(v == y for v, y in zip(verdicts, labels))
        med, p99, mx = quantiles(lat)
        print(f"| {name} | {acc}/{len(labels)} = {acc / len(labels):.1%} | {med * 1e3:.3f} ms | "
              f"{p99 * 1e3:.2f} ms | {mx * 1e3:.1f} ms | {warm * 1e3:.1f} ms |")
    base = statistics.median(results["harmo_min"][1])
    for name, (_, lat, _) in list(results.items())[1:]:
        print(f"\nmedian latency ratio ({name} / harmo_min): {statistics.median(lat) / base:.1f}x", end="")
    print()

    print("\n| category | n | " + " | ".join(results) + " |")
    print("|---|---|" + "---|" * len(results))
    per = defaultdict(list)
    for k, case in enumerate(CASES):
        per[case[0]].append(k)
    for cat, idx in per.items():
        cells = [f"{sum(results[n][0][k] == labels[k] for k in idx)}" for n in results]
        print(f"| {cat} | {len(idx)} | " + " | ".join(cells) + " |")

    print("\nHostile inputs (one call each):")
    print("| verifier | slowest | over 2 s | killed |")
    print("|---|---|---|---|")
    worst = {}
    for name, fn in systems:
        if fn is theirs:
            continue  # one math-verify variant is enough here: each hostile call may take its full timeout
        lats, killed = [], 0
        for case_name, response, gold, choices in ADVERSARIAL:
            if fn is ours:
                dt = timed(ours, response, gold, choices)[1]
            else:
                dt = theirs_isolated((response, gold, choices), args.kill_after)
                killed += dt is None
                dt = args.kill_after if dt is None else dt
            lats.append((dt, case_name))
        slow = max(lats)
        worst[name] = slow
        print(f"| {name} | {slow[0] * 1e3:.1f} ms ({slow[1]}) | {sum(d > 2.0 for d, _ in lats)} | {killed} |")

    if args.errors:
        for name, (verdicts, _, _) in results.items():
            print(f"\n{name} misses:")
            for case, v in zip(CASES, verdicts):
                if v != case[4]:
                    print(f"  [{case[0]}] label={case[4]} gold={case[2]!r} response={case[1][:80]!r}")


if __name__ == "__main__":
    main()
