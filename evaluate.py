"""Did training help? Score checkpoints on benchmark files with the training sampler and verifier; plot a run.

    python evaluate.py --model runs/tiny/final --baseline tiny --data synthetic:240 --out results.json
    python evaluate.py --model runs/3b/final --baseline Qwen/Qwen2.5-VL-3B-Instruct \\
        --data MathVista/testmini.json --data MathVerse/testmini.json --data geometry3k:geo3k/test.json
    torchrun --nproc_per_node 8 evaluate.py --model runs/3b/final --data ... --n 8 --temperature 1.0
    python evaluate.py --plot runs/tiny                       # -> runs/tiny/curves.png

Prompts are built and encoded exactly as in training (`data.encode_prompts` with --format), answers are sampled
with the training sampler (`rollout.sample`; greedy unless --temperature > 0) and checked by the training
verifier (`verifier.verify_batch`). Benchmark formats and the `--data [NAME=][FORMAT:]PATH` spec: see
evaluate_data.py (MathVista testmini, MathVerse, Geometry3K, the project's JSONL, a training table through
the training loader, built-in synthetic), as JSON, JSONL or the hub's parquet. Every image is decoded before a
model loads; larger than --max-image-pixels, it is downscaled once at load, as in training.

Metrics, per benchmark and per category. Item i has n responses (--n, 1 when greedy), c_i of them correct:
    accuracy   mean@n = mean_i c_i / n                          (greedy: plain accuracy)
    pass@k     mean_i [1 − C(n − c_i, k) / C(n, k)]             k = 1, 2, 4, …, n or --k
               the unbiased estimator (Chen et al. 2021): the chance that at least one of k responses drawn
               without replacement from the n is correct; pass@1 = mean@n.
    format     share of responses with the shape --format asks for (`rewards.format_ok`; none for "bare")
    no answer  share of responses to checkable items from which the verifier extracted nothing
    truncated  share of responses cut off by --max-new-tokens (finish reason "length")
    length     mean response length in tokens, EOS included (as in training)
Open-ended items (no gold answer) are answered and measured but left out of accuracy and pass@k; their number is
reported. The average row is the plain mean over benchmarks (each benchmark counts once), as papers report it.

Baseline (--baseline B): both models answer the same items with the same seeds. On accuracy, per benchmark:
    abs gain = ours − base          rel gain = (ours − base) / base          (none when base = 0)
and on average: the mean of the per-benchmark relative gains (how "9.5 % average improvement" is quoted) and,
beside it, the relative gain of the averaged accuracy. wins / losses count the items on which our model has more /
fewer correct responses than the baseline.

Distributed: under torchrun each rank holds the whole model and answers items rank, rank + W, rank + 2W, …
(no FSDP: evaluation needs no gradients, and independent ranks never wait on each other); the per-item results
are gathered on rank 0, which writes the JSON and prints the tables. The progress bar shows rank 0's share.
Sampling seeds depend on the item order, the batch size and the world size; greedy results do not.

Writes (--out) one JSON file: the config, per-benchmark/per-category/average metrics for each model, the
comparison, and every item's responses, extracted answers and verdicts. Fractions are in [0, 1] in the JSON and
in percent in the printed tables.

Left out: LLM-based answer extraction (MathVista's official scorer uses GPT-4; here the rule verifier decides),
confidence intervals, video benchmarks, the reward model (open items are not scored).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from evaluate_data import Benchmark, BenchItem, load_benchmarks
from harmo_min.data import (FORMAT_INSTRUCTIONS, MAX_IMAGE_PIXELS, DataError, encode_prompts, parse_field_overrides,
                            read_text)
from harmo_min.distributed import cleanup, init_distributed
from harmo_min.model import load_model, resolve_dtype
from harmo_min.rewards import CHECKED_FORMATS, format_ok, groups_of
from harmo_min.rollout import sample
from harmo_min.verifier import verify_batch


# ---------------------------------------------------------------------------------------------------------------
# Metrics (pure functions)
# ---------------------------------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n − c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    # Exact integers; Python's int / int is correctly rounded however large the binomials get.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, … up to n, and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


def relative_gain(ours: float | None, base: float | None) -> float | None:
    """(ours − base) / base; None when either is missing or base is 0 (no finite relative change)."""
    if ours is None or base is None or base == 0:
        return None
    return (ours - base) / base


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict], ks: list[int]) -> dict[str, Any]:
    """Metrics over item rows (see `score_items`); every k in `ks` must be <= the responses per item."""
    scored = [r for r in rows if r["correct"] is not None]
    lengths = [x for r in rows for x in r["lengths"]]
    formats = [x for r in rows if r["format_ok"] is not None for x in r["format_ok"]]
    reasons = [x for r in scored for x in r["reason"]]
    out: dict[str, Any] = {
        "items": len(rows), "scored": len(scored), "open_skipped": len(rows) - len(scored),
        "accuracy": _mean([sum(r["correct"]) / len(r["correct"]) for r in scored]),
    }
    for k in ks:
        out[f"pass@{k}"] = _mean([pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in scored])
    out.update(
        format=_mean([float(x) for x in formats]),
        no_answer=_mean([float(x == "no_answer") for x in reasons]),
        truncated=_mean([float(f == "length") for r in rows for f in r["finish"]]),
        length=_mean([float(x) for x in lengths]),
    )
    return out


def summarize_model(rows: list[dict], benches: list[Benchmark], ks: list[int]) -> dict[str, Any]:
    """Per-benchmark metrics with their categories, and the unweighted mean over benchmarks."""
    per_bench = {}
    for bench in benches:
        mine = [r for r in rows if r["benchmark"] == bench.name]
        categories = sorted({r["category"] for r in mine})
        per_bench[bench.name] = {**summarize(mine, ks), "categories": {
            c: summarize([r for r in mine if r["category"] == c], ks) for c in categories}}
    metrics = [k for k in next(iter(per_bench.values())) if k not in ("items", "scored", "open_skipped", "categories")]
    counts = {k: sum(b[k] for b in per_bench.values()) for k in ("items", "scored", "open_skipped")}
    average = {**counts, **{k: _mean([b[k] for b in per_bench.values()]) for k in metrics}}
    return {"benchmarks": per_bench, "average": average}


def compare(model_rows: list[dict], base_rows: list[dict], model: dict, base: dict) -> dict[str, Any]:
    """Absolute and relative accuracy gains per benchmark and on average, plus per-item wins and losses."""
    base_correct = {(r["benchmark"], r["id"]): r["correct"] for r in base_rows}
    out = {}
    for name, ours in model["benchmarks"].items():
        wins = losses = 0
        for r in model_rows:
            theirs = base_correct.get((r["benchmark"], r["id"]))
            if r["benchmark"] == name and r["correct"] is not None and theirs is not None:
                wins += sum(r["correct"]) > sum(theirs)
                losses += sum(r["correct"]) < sum(theirs)
        b, o = base["benchmarks"][name]["accuracy"], ours["accuracy"]
        out[name] = {"baseline": b, "model": o, "abs_gain": None if b is None or o is None else o - b,
                     "rel_gain": relative_gain(o, b), "wins": wins, "losses": losses}
    b, o = base["average"]["accuracy"], model["average"]["accuracy"]
    average = {"baseline": b, "model": o, "abs_gain": None if b is None or o is None else o - b,
               "mean_rel_gain": _mean([g["rel_gain"] for g in out.values()]),
               "rel_gain_of_average": relative_gain(o, b)}
    return {"benchmarks": out, "average": average}


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

def _pct(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(results: dict) -> str:
    """The tables `main` prints: per model, per category, and the baseline comparison."""
    cfg, parts = results["config"], []
    ks = [k for k in cfg["ks"] if k > 1]
    sampling = "greedy" if cfg["temperature"] == 0 else f"T={cfg['temperature']}, n={cfg['n']}"
    for role in ("model", "baseline"):
        res = results.get(role)
        if res is None:
            continue
        header = ["benchmark", "items", "accuracy", *(f"pass@{k}" for k in ks), "format", "no answer", "truncated",
                  "length"]
        body = []
        for name, m in [*res["benchmarks"].items(), ("**average**", res["average"])]:
            body.append([name, str(m["scored"]), _pct(m["accuracy"]),
                         *(_pct(m[f"pass@{k}"]) for k in ks), _pct(m["format"]), _pct(m["no_answer"]),
                         _pct(m["truncated"]), "–" if m["length"] is None else f"{m['length']:.1f}"])
        parts.append(f"### {role}: {res['name']} ({sampling}, --format {cfg['format']}; % except length in tokens)\n\n"
                     + _table(header, body))
        skipped = sum(m["open_skipped"] for m in res["benchmarks"].values())
        if skipped:
            parts.append(f"{skipped} open-ended item(s) without a gold answer were left out of accuracy.")
        # A benchmark with one category would only repeat its row; a category of open items has no accuracy.
        cat_rows = [[name, c, str(m["scored"]), _pct(m["accuracy"]), *(_pct(m[f"pass@{k}"]) for k in ks)]
                    for name, b in res["benchmarks"].items() if len(b["categories"]) > 1
                    for c, m in b["categories"].items() if m["scored"]]
        if cat_rows:
            parts.append(_table(["benchmark", "category", "items", "accuracy", *(f"pass@{k}" for k in ks)], cat_rows))
    comp = results.get("comparison")
    if comp:
        body = [[name, _pct(g["baseline"]), _pct(g["model"]), _pct(g["abs_gain"], True),
                 "–" if g["rel_gain"] is None else f"{100 * g['rel_gain']:+.1f} %", f"{g['wins']} / {g['losses']}"]
                for name, g in comp["benchmarks"].items()]
        a = comp["average"]
        body.append(["**average**", _pct(a["baseline"]), _pct(a["model"]), _pct(a["abs_gain"], True),
                     "–" if a["mean_rel_gain"] is None else f"{100 * a['mean_rel_gain']:+.1f} %", ""])
        of_avg = "–" if a["rel_gain_of_average"] is None else f"{100 * a['rel_gain_of_average']:+.1f} %"
        parts.append("### model vs baseline (accuracy, %)\n\n"
                     + _table(["benchmark", "baseline", "model", "abs gain", "rel gain", "wins / losses"], body)
                     + f"\n\naverage rel gain = mean of the per-benchmark relative gains; relative gain of the "
                       f"average accuracy: {of_avg}")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Answering and scoring
# ---------------------------------------------------------------------------------------------------------------

def generate(model, processor, examples: list, *, args: argparse.Namespace, seed: int) -> list[dict]:
    """n responses per example with the training sampler: [{"texts", "lengths", "finish"}] in example order."""
    device = next(model.parameters()).device
    batch = encode_prompts(processor, examples, args.format).to(device)
    rollout = sample(model, batch, n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, top_k=args.top_k, generator=torch.Generator(device).manual_seed(seed),
                     tokenizer=processor.tokenizer)
    groups = zip(groups_of(rollout.texts, args.n), groups_of(rollout.lengths.tolist(), args.n),
                 groups_of(rollout.finish_reason, args.n))
    return [{"texts": texts, "lengths": lengths, "finish": finish} for texts, lengths, finish in groups]


def score_items(items: list[tuple[int, BenchItem]], answers: list[dict], *, fmt: str, workers: int = 0,
                timeout_s: float = 1.0) -> list[dict]:
    """One result row per item: its responses, lengths, format check and, for checkable items, the verdicts."""
    to_verify = [(text, it.example.answer, it.example.choices)
                 for (_, it), a in zip(items, answers) if it.example.task == "verifiable" for text in a["texts"]]
    verdicts = iter(verify_batch(to_verify, workers=workers, timeout_s=timeout_s))
    rows = []
    for (index, it), a in zip(items, answers):
        checked = it.example.task == "verifiable"
        mine = [next(verdicts) for _ in a["texts"]] if checked else []
        rows.append({
            "index": index, "benchmark": it.benchmark, "id": it.example.id, "category": it.category,
            "where": it.where, "gold": it.example.answer, "responses": a["texts"], "lengths": a["lengths"],
            "finish": a["finish"],
            "format_ok": [format_ok(t, fmt) for t in a["texts"]] if fmt in CHECKED_FORMATS else None,
            "correct": [v.correct for v in mine] if checked else None,
            "pred": [v.pred for v in mine] if checked else None,
            "reason": [v.reason for v in mine] if checked else None,
            **({"meta": it.meta} if it.meta else {}),
        })
    return rows


def evaluate_model(spec: str, benches: list[Benchmark], args: argparse.Namespace, world, *,
                   generate_fn: Callable = generate) -> tuple[list[dict], float]:
    """Answer and score this rank's share of the items; every rank returns all rows (gathered) and seconds."""
    from tqdm import tqdm

    start = time.perf_counter()
    model, processor = load_model(spec, seed=args.seed, dtype=args.torch_dtype, device=world.device)
    items = [(i, it) for i, it in enumerate(it for b in benches for it in b.items)]
    mine = items[world.rank::world.size]
    rows = []
    with tqdm(total=len(mine), desc=f"{spec} (rank 0's share)" if world.size > 1 else spec, unit="item",
              disable=not world.is_main, dynamic_ncols=True) as bar:
        for lo in range(0, len(mine), args.batch_size):
            chunk = mine[lo:lo + args.batch_size]
            # One seed per batch, from its first item's global index: the baseline gets the same draws.
            answers = generate_fn(model, processor, [it.example for _, it in chunk], args=args,
                                  seed=args.seed * 1_000_003 + chunk[0][0])
            rows += score_items(chunk, answers, fmt=args.format, workers=args.workers, timeout_s=args.timeout_s)
            bar.update(len(chunk))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return gather(rows, world), time.perf_counter() - start


def gather(rows: list[dict], world) -> list[dict]:
    """Every rank's rows on every rank, in global item order."""
    if world.size > 1:
        shards: list[Any] = [None] * world.size
        dist.all_gather_object(shards, rows)
        rows = [r for shard in shards for r in shard]
    return sorted(rows, key=lambda r: r["index"])


# ---------------------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------------------

class PlotUnavailable(RuntimeError):
    """matplotlib, the optional plotting extra, is not installed."""


# (title, keys it takes): exact names, or a prefix ending in "/". Keys a run logs beyond these get a panel each.
PLOT_GROUPS = [
    ("reward: total and each aspect", ["reward/"]), ("accuracy", ["accuracy"]),
    ("response length (tokens)", ["response_length"]), ("KL to the reference", ["kl"]),
    ("clip fraction", ["clip_frac"]), ("loss", ["loss"]), ("grad norm", ["grad_norm"]),
    ("learning rate", ["lr"]), ("routes (responses per step)", ["route/"]),
    ("throughput (tokens/s)", ["tokens_per_s"]), ("step time (s)", ["step_time_s"]),
]


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; an unfinished last line (a run still writing) is skipped."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected a run folder with metrics.jsonl, or the file itself)")
    lines = read_text(path).split("\n")  # only "\n" ends a record (splitlines also splits at U+2028)
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines):
                print(f"{path}:{lineno}: skipping an incomplete last line", file=sys.stderr)
                continue
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object of metrics, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no metrics records")
    return records


def plot_groups(records: list[dict]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{panel title: {metric key: (steps, values)}} for every numeric key present; x is `step` or the line number."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(records):
        x = rec.get("step", i + 1)
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(x)
                ys.append(float(value))
    panels, used = {}, set()
    for title, wanted in PLOT_GROUPS:
        keys = [k for k in series if any(k == w or (w.endswith("/") and k.startswith(w)) for w in wanted)]
        if keys:
            # The total first, the aspects after it, in a stable order.
            keys.sort(key=lambda k: (k != "reward/total", k))
            panels[title] = {k: series[k] for k in keys}
            used.update(keys)
    panels.update({k: {k: series[k]} for k in sorted(series) if k not in used})
    return panels


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw every panel of `plot_groups` for a run folder (or its metrics.jsonl) into a PNG; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed or wanted
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, an optional extra: pip install 'harmo_min[plot]' "
                              "(or pip install matplotlib)") from None
    run = Path(run)
    metrics_path = run / "metrics.jsonl" if run.is_dir() else run
    panels = plot_groups(read_metrics(metrics_path))
    out = Path(out) if out else metrics_path.parent / "curves.png"
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for key, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=key, linewidth=2.2 if key == "reward/total" else 1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(metrics_path), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.2 * rows)))  # leave the title its own strip
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder, cached hub id, or 'tiny' (build_tiny(--seed): the untrained start)")
    p.add_argument("--baseline", help="a second model answering the same items; gains are reported against it")
    p.add_argument("--data", action="append", default=[], metavar="[NAME=][FORMAT:]PATH",
                   help="benchmark file, parquet file/folder/glob or save_to_disk folder (repeatable); "
                        "FORMAT: mathvista, mathverse, geometry3k, jsonl, dataset, synthetic")
    p.add_argument("--field", action="append", default=[], metavar="FIELD=COLUMN",
                   help="column for a field of the 'dataset' format (repeatable), as data.fields in training")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"downscale larger images once at load [{MAX_IMAGE_PIXELS}, as in training]; 0: no cap")
    p.add_argument("--out", help="results JSON (with --plot: the PNG, default RUN/curves.png)")
    p.add_argument("--plot", metavar="RUN", help="draw RUN/metrics.jsonl's training curves instead of evaluating")
    p.add_argument("--format", default="think_answer", choices=list(FORMAT_INSTRUCTIONS),
                   help="answer format asked for in the prompt, as in training [think_answer]")
    p.add_argument("--n", type=int, default=1, help="responses per item [1]")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0]")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--k", type=int, nargs="+", help="pass@k values to report [1, 2, 4, ..., n]")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call (each with n responses)")
    p.add_argument("--limit", type=int, help="only the first N items of each benchmark (a quick look)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--workers", type=int, default=0, help="verifier processes (0: in this process)")
    p.add_argument("--timeout-s", type=float, default=1.0, help="verifier time limit per response")
    args = p.parse_args(argv)
    if args.plot:
        return args
    if not args.model or not args.data:
        p.error("--model and at least one --data are required (or --plot RUN)")
    if args.n < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        p.error("--n, --max-new-tokens, --batch-size and --limit must be >= 1")
    if args.max_image_pixels < 0:
        p.error("--max-image-pixels must be >= 0 (0: no cap)")
    if args.n > 1 and args.temperature == 0:
        p.error(f"--n {args.n} with greedy decoding gives {args.n} identical responses: add --temperature (e.g. 1.0)")
    args.ks = sorted(set(args.k)) if args.k else default_ks(args.n)
    if not all(1 <= k <= args.n for k in args.ks):
        p.error(f"--k values must be between 1 and --n {args.n}, got {args.k}")
    return args


def main(argv: list[str] | None = None, *, generate_fn: Callable = generate) -> dict | Path:
    """Evaluate (returns the results dict) or plot (returns the PNG path); `generate_fn` is swappable for tests."""
    args = parse_args(argv)
    if args.plot:
        out = plot_run(args.plot, args.out)
        print(f"wrote {out}")
        return out
    # Every file and image checked before a model is loaded.
    benches = load_benchmarks(args.data, limit=args.limit, max_image_pixels=args.max_image_pixels or None,
                              fields=parse_field_overrides(args.field))
    owns_group = not dist.is_initialized()
    world = init_distributed()
    try:
        args.torch_dtype = resolve_dtype(args.dtype, world.device)
        results: dict[str, Any] = {
            "config": {k: v for k, v in vars(args).items() if k not in ("torch_dtype", "k", "plot")}
            | {"world_size": world.size},
            "benchmarks": [{"name": b.name, "format": b.format, "path": b.path, "items": len(b.items)}
                           for b in benches],
        }
        all_rows = {}
        for role, spec in (("model", args.model), ("baseline", args.baseline)):
            if spec is None:
                results[role] = None
                continue
            rows, seconds = evaluate_model(spec, benches, args, world, generate_fn=generate_fn)
            all_rows[role] = rows
            results[role] = {"name": spec, "seconds": seconds, **summarize_model(rows, benches, args.ks),
                             "items": rows}
        results["comparison"] = (compare(all_rows["model"], all_rows["baseline"], results["model"],
                                         results["baseline"]) if args.baseline else None)
        if world.is_main:
            print(markdown(results))
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
                print(f"\nwrote {args.out}")
        return results
    finally:
        if owns_group:
            cleanup()


if __name__ == "__main__":
    try:
        main()
    except (DataError, PlotUnavailable, FileNotFoundError) as err:
        sys.exit(f"evaluate.py: error: {err}")
