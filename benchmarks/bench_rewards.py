"""How long the multi-aspect reward takes for one realistic GRPO rollout batch, serial vs parallel verifier.

The batch: --prompts prompts (default 64: ~45 % free-form math, ~25 % multiple choice, ~30 % open-ended) times
--group responses (default 8) of about --tokens tokens each (default 300, ~4 characters a token), shaped like a
policy's output: a <think> block of reasoning prose with inline math, then an answer that is right, wrong, an
equivalent form of the gold (0.5 vs \\frac{1}{2}, \\sqrt{12} vs 2\\sqrt{3}: these reach the verifier's numeric and
sympy paths), in a \\boxed{} instead of <answer> tags, or missing because the response was cut off at
max_new_tokens. Some items carry instruction constraints; every response has a reward-model score (a reward
model is configured), so low-confidence verdicts can be routed to it.

It times `score_batch` with the default config (all five aspects, overlong switched on) at workers=0 (serial)
and workers=N (one verify_batch call fanned out to the persistent pool of N processes), `verify_batch` alone at
both settings, and `score_group` with precomputed verdicts (the combiner alone, without the verifier). One warm-up
call each first (it forks the sympy workers and the pool, which later calls reuse); then the rows take turns,
--repeats rounds, so a change in the machine's load hits every row alike. Each figure is the median (and min).
"cores held" (a second pass, --repeats calls in a block per row) is the CPU time of this process and its worker
processes (from /proc) over the wall time: on a machine whose cores are busy with other jobs, it shows how much
of the parallelism the scheduler actually gave.

    python benchmarks/bench_rewards.py                    # add --workers 4 on a machine with more cores
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmo_min.rewards import RewardConfig, route_counts, score_batch, score_group  # noqa: E402
from harmo_min.verifier import verify_batch  # noqa: E402


@dataclass
class Item:
    """The attributes of data.Example that rewards.py reads."""
    id: str
    answer: str | None
    choices: list[str] | None = None
    task: str = "verifiable"
    constraints: list[dict] = field(default_factory=list)
    forms: list[str] = field(default_factory=list)  # right answers written differently (bench only)


MATH = [  # gold, equivalent forms a policy writes
    ("12", ["12", "12.0", "\\frac{24}{2}"]), ("0.5", ["\\frac{1}{2}", "1/2", "0.50"]),
    ("2\\sqrt{3}", ["\\sqrt{12}", "2 \\sqrt{3}"]), ("\\frac{3}{4}", ["0.75", "\\dfrac{3}{4}"]),
    ("45^\\circ", ["45", "45°"]), ("x^2 + 2x + 1", ["(x+1)^2", "x^2+2x+1"]), ("8\\pi", ["8 \\pi", "25.13"]),
    ("\\{1, 2\\}", ["\\{2, 1\\}"]), ("-3", ["-3", "x = -3"]), ("150", ["150", "1.5 \\times 10^2"]),
]
WORDS = ("the triangle has sides so we compute angle area radius point line therefore since by the theorem we get "
         "then substitute into equation check again that gives value of segment ratio circle chart bar shows").split()
INLINE = ["$a^2 + b^2 = c^2$", "$\\frac{1}{2} b h$", "$\\sqrt{x}$", "$2 \\cdot 6$", "$\\angle ABC$", "$\\pi r^2$"]


def reasoning(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        piece = rng.choice(INLINE) if rng.random() < 0.08 else rng.choice(WORDS)
        out.append(piece)
        size += len(piece) + 1
    return " ".join(out)


def make_batch(rng: random.Random, prompts: int, group: int, tokens: int, max_new: int):
    items = []
    for i in range(prompts):
        kind = rng.choices(["math", "choice", "open"], weights=[45, 25, 30])[0]
        if kind == "math":
            gold, forms = rng.choice(MATH)
            items.append(Item(f"m{i}", gold, forms=forms, constraints=[{"kind": "answer_is_number"}] * (i % 3 == 0)))
        elif kind == "choice":
            items.append(Item(f"c{i}", rng.choice("ABCD"), choices=["3 cm", "4 cm", "5 cm", "6 cm"],
                              constraints=[{"kind": "answer_is_choice_letter"}]))
        else:
            items.append(Item(f"o{i}", None, task="open", constraints=[
                {"kind": "max_words", "value": 60}, {"kind": "must_include", "value": "image"},
                {"kind": "language", "value": "en"}][: i % 4]))
    groups, lengths, finish, scores = [], [], [], []
    for it in items:
        g, n, f = [], [], []
        for _ in range(group):
            length = max(20, int(rng.gauss(tokens, tokens / 4)))
            if it.task == "open":
                answer = "The image shows " + reasoning(rng, rng.randint(40, 400))
            elif it.choices:
                answer = rng.choice([it.answer, rng.choice("ABCD"), f"({it.answer})", it.choices[0]])
            else:
                answer = rng.choice(it.forms + [it.answer, str(rng.randint(0, 99)), "\\frac{7}{3}"])
            think = reasoning(rng, max(0, 4 * length - len(answer) - 40))
            style = rng.random()
            if style < 0.07:  # cut off at max_new_tokens: no answer at all
                text, length, why = f"<think>{think}", max_new, "length"
            elif style < 0.17:
                text, why = f"{think} so the result is \\boxed{{{answer}}}", "eos"
            else:
                text, why = f"<think>{think}</think>\n<answer>{answer}</answer>", "eos"
            g.append(text)
            n.append(min(length, max_new))
            f.append(why)
        groups.append(g)
        lengths.append(n)
        finish.append(f)
        scores.append([rng.gauss(0.0, 2.0) for _ in range(group)])
    return items, groups, lengths, finish, scores


def tree_cpu_s() -> float | None:
    """CPU seconds (user + system) used so far by this process and its live descendants (the sympy workers and
    the pool), from /proc; None where there is no /proc. Clock ticks are 10 ms: sum over many calls."""
    if not os.path.isdir("/proc/self"):
        return None
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we listed /proc
            continue
        procs[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    mine, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, (ppid, _) in procs.items() if ppid in mine} - mine
        mine |= new
        grew = bool(new)
    return sum(procs[pid][1] for pid in mine if pid in procs)


def timed(rows: list[tuple[str, object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each row; rows take turns so that load drift affects all of them alike."""
    for _, fn in rows:
        fn()  # warm-up: the verifier forks its sympy worker and pool on first use
    runs: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(repeats):
        for name, fn in rows:
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    return runs


def cores_held(fn, calls: int) -> float:
    """CPU time of this process and its workers over wall time, for a block of calls (one /proc read each end)."""
    c0, t0 = tree_cpu_s(), time.perf_counter()
    for _ in range(calls):
        fn()
    wall = time.perf_counter() - t0
    return (tree_cpu_s() - c0) / wall if c0 is not None else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    items, groups, lengths, finish, scores = make_batch(rng, args.prompts, args.group, args.tokens,
                                                        args.max_new_tokens)
    cfg = RewardConfig.from_dict({"weights": {"overlong": 1.0}, "overlong_buffer": 256}, answer_format="think_answer")
    cfg = cfg.resolve(args.max_new_tokens)
    n = args.prompts * args.group
    kw = dict(lengths=lengths, finish_reasons=finish, model_scores=scores, cfg=cfg)
    chars = sum(len(r) for g in groups for r in g) / n

    out = score_batch(items, groups, workers=0, **kw)
    print(f"batch: {args.prompts} prompts x {args.group} responses = {n}, mean {chars:.0f} chars/response, "
          f"{os.cpu_count()} CPUs; routes {route_counts(out)}")
    print(f"mean accuracy {sum(a for g in out for a in g.breakdown['accuracy']) / n:.3f}, "
          f"format {sum(a for g in out for a in g.breakdown['format']) / n:.3f}")

    verifiable = [(r, it.answer, it.choices) for it, g in zip(items, groups) if it.task == "verifiable" for r in g]
    verdicts = iter(verify_batch(verifiable))
    pre = [[next(verdicts) for _ in g] if it.task == "verifiable" else None for it, g in zip(items, groups)]

    def combiner_only() -> None:
        for it, g, v, ln, f, s in zip(items, groups, pre, lengths, finish, scores):
            score_group(it, g, lengths=ln, finish_reasons=f, model_scores=s, cfg=cfg, verdicts=v)

    rows = [("score_batch, workers=0 (serial)", lambda: score_batch(items, groups, workers=0, **kw)),
            (f"score_batch, workers={args.workers}", lambda: score_batch(items, groups, workers=args.workers, **kw)),
            ("verify_batch, workers=0", lambda: verify_batch(verifiable, workers=0)),
            (f"verify_batch, workers={args.workers}", lambda: verify_batch(verifiable, workers=args.workers)),
            ("combiner only (verdicts given)", combiner_only)]
    runs = timed(rows, args.repeats)
    cores = {name: cores_held(fn, args.repeats) for name, fn in rows}
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'':34s} {'median ms/batch':>16s} {'min ms':>8s} {'us/response':>12s} {'cores held':>11s}")
    for name, _ in rows:
        med = statistics.median(runs[name])
        print(f"{name:34s} {med * 1e3:16.1f} {min(runs[name]) * 1e3:8.1f} {med / n * 1e6:12.0f} {cores[name]:11.2f}")
    for what in ("score_batch", "verify_batch"):
        serial = statistics.median(runs[f"{what}, workers=0" + (" (serial)" if what == "score_batch" else "")])
        parallel = statistics.median(runs[f"{what}, workers={args.workers}"])
        print(f"{what}: workers={args.workers} takes {parallel / serial:.2f}x the serial time "
              f"({len(verifiable)} checkable responses)")


if __name__ == "__main__":
    main()
