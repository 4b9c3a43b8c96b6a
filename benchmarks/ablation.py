"""HARMO's ablations on a laptop: the main job (configs/tiny.yaml) with one thing changed per arm, 3 seeds each.

    python benchmarks/ablation.py                              # 6 arms x 3 seeds, ~16 min on 2 cores
    python benchmarks/ablation.py --study kl --reuse           # KL: none, k1 / k2 / k3 in the loss, k1 in the reward
    python benchmarks/ablation.py --seeds 0 --steps 10 --items 20 --out runs/ablation_smoke   # a quick look

Arms (`--study harmo`), each a set of dotted overrides of configs/tiny.yaml, the same steps for every arm:

    hybrid                the main job: rule verifier for verifiable items, reward model for open ones
    rule only             reward.accuracy_source=rule: open items get accuracy 0 (no reward model at all)
    RM only               reward.accuracy_source=model: the reward model scores every item (monolithic)
    no length penalty     reward.weights.length=0
    std-scaled adv.       grpo.scale_std=true: A = (R - mean) / (std + eps), original GRPO; HARMO uses mean-only
    GDPO                  reward.combine=normalize_then_sum: normalise each aspect in the group, then sum

Per seed the warm-up policy and the reward model (which starts from it) are trained once (warmup.py,
train_reward_model.py with `seed=S`) and shared by every arm. Each arm then trains (train.py) and is evaluated on held-out synthetic items
(evaluate.py, its own item draw), as is the warm-start policy. Reported as mean ± std over seeds:

    accuracy      held-out accuracy, the mean over the three verifiable task kinds; by default mean@4 at the
                  training temperature (the policy as GRPO samples it), `--temperature 0 --n 1` for greedy
    rel. gain     mean over task kinds of (acc − warm-start acc) / warm-start acc: how HARMO quotes its ~9.5 % / ~16 %
                  (evaluate.compare's mean_rel_gain)
    format        held-out share of responses in the <think>…</think><answer>…</answer> format
    describe      held-out share of open "describe" items whose answer names exactly the drawn shape (colour and
                  shape), checked by a rule the training run never sees: what the reward-model route buys
    guesses       held-out share of responses whose <think></think> is empty (an answer without reasoning)
    notes probe   the warm-start policy's greedy accuracy when its answer follows the item's reference notes, and
                  when it follows empty notes: whether the reasoning tokens carry the answer
    len correct / len wrong   mean length in tokens of the correct / wrong training responses (train.py's
                  length/correct, length/wrong), over the last quarter of training

Jobs run `--workers` at a time (default 2, one per core), each a subprocess with OMP_NUM_THREADS=1. Everything
lands under --out: every run's folder, `<study>.json` (every figure per seed), `<study>.md` (the table) and
`<study>.png` (accuracy per arm; wrong and correct lengths over training). `--reuse` keeps the seeds' warm-up and
reward model of an earlier study in the same --out. Plotting needs matplotlib (the `plot`
extra); without it the table is still written and the command says so. Left out: significance tests (3 seeds of
a toy say which way an effect goes, not how sure it is), real benchmarks, tuning per arm.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # evaluate.py, evaluate_data.py and harmo_min from this checkout

import evaluate  # noqa: E402
from evaluate_data import load_benchmark  # noqa: E402
from harmo_min.synthetic import described_objects  # noqa: E402

STUDIES = {
    "harmo": {
        "hybrid": [],
        "rule only": ["reward.accuracy_source=rule"],
        "RM only": ["reward.accuracy_source=model"],
        "no length penalty": ["reward.weights.length=0"],
        "std-scaled adv.": ["grpo.scale_std=true"],
        "GDPO": ["reward.combine=normalize_then_sum"],
    },
    "kl": {
        "no KL": ["grpo.kl_coef=0"],
        "k1 in loss": ["grpo.kl_estimator=k1"],
        "k2 in loss": ["grpo.kl_estimator=k2"],
        "k3 in loss": ["grpo.kl_estimator=k3"],
        "k1 in reward": ["grpo.kl_in_reward=true"],  # R -= β Σ_t k1; no KL term in the loss
    },
}
KINDS = ("count", "arithmetic", "choice")  # verifiable: their accuracy is what evaluate.py scores
EVAL_MAX_NEW_TOKENS = 40                   # configs/tiny.yaml's rollout.max_new_tokens
SLOTS = threading.Semaphore(2)             # set from --workers in main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = STUDIES[args.study]
    started = time.perf_counter()
    global SLOTS
    SLOTS = threading.Semaphore(args.workers)  # at most `workers` subprocesses at once; waiting holds no slot
    pool = ThreadPoolExecutor(max_workers=64)

    # 1. per seed, the shared stages: the warm-up policy, then the reward model that starts from it
    def stages(seed: int) -> None:
        d = out / f"seed{seed}"
        if args.reuse and (d / "warmup" / "final").is_dir() and (d / "reward_model" / "reward_model").is_dir():
            return
        run(["warmup.py", "--config", "configs/tiny_warmup.yaml", "--overwrite", f"seed={seed}",
             f"run_dir={d / 'warmup'}"], d / "warmup.log")
        run(["train_reward_model.py", "--config", "configs/tiny_reward_model.yaml", "--overwrite", f"seed={seed}",
             f"run_dir={d / 'reward_model'}", f"model.path={d / 'warmup' / 'final'}"], d / "reward_model.log")

    # 2. then every arm of that seed trains and is evaluated, and so is the warm-start policy
    def arm_job(seed: int, arm: str) -> dict:
        seed_stages[seed].result()
        d = out / f"seed{seed}"
        run_dir = d / slug(arm)
        run(["train.py", "--config", "configs/tiny.yaml", "--overwrite", f"seed={seed}", f"run_dir={run_dir}",
             f"model.path={d / 'warmup' / 'final'}", "model.prepare=null",
             f"reward_model.path={d / 'reward_model' / 'reward_model'}", "reward_model.prepare=null",
             f"train.steps={args.steps}", "train.log_every=1000", *arms[arm]], d / f"{slug(arm)}.log")
        return {"eval": run_eval(run_dir / "final", run_dir / "eval.json", args),
                "metrics": evaluate.read_metrics(run_dir / "metrics.jsonl")}

    def base_job(seed: int) -> dict:
        seed_stages[seed].result()
        return run_eval(out / f"seed{seed}" / "warmup" / "final", out / f"seed{seed}" / "warmup" / "eval.json", args)

    seed_stages = {s: pool.submit(stages, s) for s in args.seeds}
    arm_jobs = {(s, arm): pool.submit(arm_job, s, arm) for s in args.seeds for arm in arms}
    base_jobs = {s: pool.submit(base_job, s) for s in args.seeds}
    results = {"command": " ".join(["python", "benchmarks/ablation.py", *(argv if argv is not None else sys.argv[1:])]),
               "study": args.study, "seeds": args.seeds, "steps": args.steps, "items_per_kind": args.items,
               "sampling": "greedy" if args.temperature == 0 else f"T={args.temperature}, n={args.n}",
               "arms": {}, "warm_start": {}}
    for seed, job in base_jobs.items():
        results["warm_start"][str(seed)] = summary(job.result(), None)
        results.setdefault("notes_probe", {})[str(seed)] = notes_probe(out / f"seed{seed}" / "warmup" / "final",
                                                                       args.items)
    for (seed, arm), job in arm_jobs.items():
        done = job.result()
        figures = summary(done["eval"], base_jobs[seed].result())
        figures.update(training_lengths(done["metrics"]))
        results["arms"].setdefault(arm, {})[str(seed)] = figures
    pool.shutdown()
    results["wall_s"] = time.perf_counter() - started

    (out / f"{args.study}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / f"{args.study}.md").write_text(table + "\n")
    print(table)
    try:
        print(f"wrote {plot(results, arm_curves(out, args.seeds, arms), out / f'{args.study}.png')}")
    except evaluate.PlotUnavailable as err:
        print(f"no plot: {err}")
    print(f"wrote {out / args.study}.json and .md ({results['wall_s'] / 60:.1f} min)")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Running the stages
# ---------------------------------------------------------------------------------------------------------------

def run(argv: list[str], log: Path) -> None:
    """One script of this checkout as a subprocess on one thread; its output to `log`; a failure stops everything."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with SLOTS, log.open("w") as f:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"`python {' '.join(argv)}` failed (exit {proc.returncode}); log {log}:\n{tail}")


def run_eval(model: Path, out: Path, args: argparse.Namespace) -> dict:
    """evaluate.py on the held-out synthetic items, one benchmark per task kind; returns its JSON."""
    data = [f"--data={k}=synthetic:{args.items}:{k}" for k in (*KINDS, "describe")]
    sampling = [] if args.temperature == 0 else ["--temperature", str(args.temperature), "--n", str(args.n)]
    run(["evaluate.py", "--model", str(model), *data, "--format", "think_answer", "--max-new-tokens",
         str(EVAL_MAX_NEW_TOKENS), "--batch-size", "50", *sampling, "--out", str(out)], out.with_suffix(".log"))
    return json.loads(out.read_text())


def slug(arm: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", arm.lower()).strip("_")


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------

def summary(result: dict, base: dict | None) -> dict:
    """One seed's held-out figures for one model (see the module docstring), plus gains over `base`."""
    model = result["model"]
    verifiable = {k: model["benchmarks"][k] for k in KINDS}
    rows = model["items"]
    references = {it.example.id: it.example.reference for it in
                  load_benchmark(f"describe=synthetic:{len(benchmark_rows(rows, 'describe'))}:describe").items}
    described = [float(describes_exactly(text, references[r["id"]])) for r in benchmark_rows(rows, "describe")
                 for text in r["responses"]]
    texts = [t for r in rows for t in r["responses"]]
    out = {"accuracy": statistics.mean(b["accuracy"] for b in verifiable.values()),
           **{f"accuracy/{k}": b["accuracy"] for k, b in verifiable.items()},
           "format": model["average"]["format"],
           "describe": statistics.mean(described),
           "guesses": sum(bool(re.search(r"<think>\s*</think>", t)) for t in texts) / len(texts)}
    if base is not None:
        base_rows = [r for r in base["model"]["items"] if r["benchmark"] in KINDS]
        mine = [r for r in rows if r["benchmark"] in KINDS]
        comp = evaluate.compare(mine, base_rows, {"benchmarks": verifiable, "average": {"accuracy": out["accuracy"]}},
                                {"benchmarks": {k: base["model"]["benchmarks"][k] for k in KINDS},
                                 "average": {"accuracy": statistics.mean(base["model"]["benchmarks"][k]["accuracy"]
                                                                         for k in KINDS)}})
        out["rel_gain"] = comp["average"]["mean_rel_gain"]
    return out


def benchmark_rows(rows: list[dict], benchmark: str) -> list[dict]:
    return [r for r in rows if r["benchmark"] == benchmark]


def describes_exactly(response: str, reference: str) -> bool:
    """The answer block names the drawn object and nothing else (a rule the reward model never sees)."""
    answer = response.rsplit("<answer>", 1)[-1].split("</answer>")[0]
    return described_objects(answer) == described_objects(reference)


def training_lengths(metrics: list[dict]) -> dict:
    """Mean length of correct and of wrong training responses over the last quarter of the run."""
    last = metrics[-max(1, len(metrics) // 4):]
    missing = [k for k in ("length/correct", "length/wrong") if k not in last[-1]]
    if missing:
        raise KeyError(f"metrics.jsonl has no {missing}: train.py logs them since the restructure; update train.py")
    return {"len_correct": statistics.mean(m["length/correct"] for m in last),
            "len_wrong": statistics.mean(m["length/wrong"] for m in last)}


def arm_curves(out: Path, seeds: list[int], arms: dict) -> dict:
    """{arm: {metric: [per-seed list of values per step]}} for the plot."""
    curves = {}
    for arm in arms:
        runs = [evaluate.read_metrics(out / f"seed{s}" / slug(arm) / "metrics.jsonl") for s in seeds]
        curves[arm] = {k: [[m[k] for m in r] for r in runs] for k in ("length/correct", "length/wrong", "reward/format")}
    return curves


def mean_std(values: list[float], pct: bool = True, signed: bool = False) -> str:
    scale = 100 if pct else 1
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


def notes_probe(model_dir: Path, items: int) -> dict:
    """Do the notes help? Greedy answers of the warm-start policy to held-out items with the assistant turn begun
    as `<think>{reference notes}</think><answer>` versus `<think></think><answer>`: accuracy per kind of each."""
    import torch

    from harmo_min.data import build_messages, load_images
    from harmo_min.model import load_policy
    from harmo_min.rollout import sample
    from harmo_min.synthetic import notes, synthetic_examples
    from harmo_min.verifier import verify
    from evaluate_data import SYNTHETIC_SEED

    torch.set_num_threads(1)
    model, processor = load_policy(model_dir, dtype=torch.float32)
    processor.tokenizer.padding_side = "left"
    out = {}
    for kind in KINDS:
        examples = synthetic_examples(items, seed=SYNTHETIC_SEED, kinds=(kind,))  # evaluate.py's held-out draw
        for mode in ("notes", "no notes"):
            texts = [processor.apply_chat_template(build_messages(ex, "think_answer"), add_generation_prompt=True,
                                                   tokenize=False)
                     + f"<think>{notes(ex) if mode == 'notes' else ''}</think><answer>" for ex in examples]
            batch = processor(text=texts, images=[im for ex in examples for im in load_images(ex)], padding=True,
                              return_tensors="pt")
            answers = sample(model, batch, n=1, max_new_tokens=4, temperature=0, tokenizer=processor.tokenizer).texts
            right = [verify(f"<answer>{a.split('</answer>')[0]}</answer>", ex.answer, choices=ex.choices).correct
                     for a, ex in zip(answers, examples)]
            out[f"{kind}/{mode}"] = sum(right) / len(right)
    return out


def markdown(results: dict) -> str:
    seeds = results["seeds"]
    base = [results["warm_start"][str(s)] for s in seeds]
    header = ["arm", "accuracy %", "rel. gain %", *(f"{k} %" for k in KINDS), "format %", "describe %",
              "guesses %", "len correct", "len wrong"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines.append("| warm start | " + " | ".join([mean_std([b["accuracy"] for b in base]), "–",
                                                 *(mean_std([b[f"accuracy/{k}"] for b in base]) for k in KINDS),
                                                 mean_std([b["format"] for b in base]),
                                                 mean_std([b["describe"] for b in base]),
                                                 mean_std([b["guesses"] for b in base]), "–", "–"]) + " |")
    for arm, per_seed in results["arms"].items():
        f = [per_seed[str(s)] for s in seeds]
        gains = [x["rel_gain"] for x in f]
        gain = "–" if any(g is None for g in gains) else mean_std(gains, signed=True)
        lines.append(f"| {arm} | " + " | ".join([mean_std([x["accuracy"] for x in f]), gain,
                                                   *(mean_std([x[f"accuracy/{k}"] for x in f]) for k in KINDS),
                                                   mean_std([x["format"] for x in f]),
                                                   mean_std([x["describe"] for x in f]),
                                                   mean_std([x["guesses"] for x in f]),
                                                   mean_std([x["len_correct"] for x in f], pct=False),
                                                   mean_std([x["len_wrong"] for x in f], pct=False)]) + " |")
    probe = [results["notes_probe"][str(s)] for s in seeds]
    lines += ["", "| warm start, greedy, answer after | " + " | ".join(f"{k} %" for k in KINDS) + " |",
              "|---|" + "---:|" * len(KINDS)]
    for mode in ("notes", "no notes"):
        label = "`<think>{reference notes}</think>`" if mode == "notes" else "`<think></think>`"
        lines.append(f"| {label} | " + " | ".join(mean_std([p[f'{k}/{mode}'] for p in probe]) for k in KINDS) + " |")
    note = (f"\n\n{len(seeds)} seeds ({', '.join(map(str, seeds))}), {results['steps']} GRPO steps per arm, "
            f"{results['items_per_kind']} held-out items per task kind, {results['sampling']} evaluation; "
            f"mean ± std over seeds. `{results['command']}` took {results.get('wall_s', 0) / 60:.1f} min.")
    return "\n".join(lines) + note


def plot(results: dict, curves: dict, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise evaluate.PlotUnavailable("the plot needs matplotlib: pip install 'harmo_min[plot]'") from None
    seeds = [str(s) for s in results["seeds"]]
    arms = list(results["arms"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    ax = axes[0]
    means = [statistics.mean(results["arms"][a][s]["accuracy"] * 100 for s in seeds) for a in arms]
    stds = [statistics.stdev(results["arms"][a][s]["accuracy"] * 100 for s in seeds) if len(seeds) > 1 else 0
            for a in arms]
    # Points with error bars on a zoomed axis: bars from 0 would hide differences of a few points.
    ax.errorbar(range(len(arms)), means, yerr=stds, fmt="o", capsize=4, color="tab:blue", label="after GRPO")
    for i, arm in enumerate(arms):
        ax.scatter([i] * len(seeds), [results["arms"][arm][s]["accuracy"] * 100 for s in seeds], s=8,
                   color="tab:gray", alpha=0.6, label="one seed" if i == 0 else None)
    base = statistics.mean(results["warm_start"][s]["accuracy"] * 100 for s in seeds)
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"warm start ({base:.1f})")
    ax.set_xticks(range(len(arms)), arms, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy %")
    ax.set_title("accuracy (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    for ax, key, title in ((axes[1], "length/wrong", "length of wrong responses (tokens)"),
                           (axes[2], "length/correct", "length of correct responses (tokens)")):
        for arm in arms:
            runs = curves[arm][key]
            steps = min(len(r) for r in runs)
            mean = [statistics.mean(r[i] for r in runs) for i in range(steps)]
            window = 5  # a running mean: single steps of 8 prompts are noisy
            smooth = [statistics.mean(mean[max(0, i - window + 1):i + 1]) for i in range(steps)]
            ax.plot(range(1, steps + 1), smooth, label=arm, linewidth=1.3)
        ax.set_xlabel("step")
        ax.set_title(title + ", mean over seeds", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=list(STUDIES), default="harmo", help="which arms to run [harmo]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100, help="GRPO steps per arm, the same for every arm [100]")
    p.add_argument("--items", type=int, default=100, help="held-out items per task kind [100]")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="evaluation sampling, the training temperature by default; 0 = greedy [1.0]")
    p.add_argument("--n", type=int, default=4, help="responses per item (1 when greedy) [4]")
    p.add_argument("--reuse", action="store_true",
                   help="keep a seed's warm-up and reward model from an earlier run in --out (another --study)")
    p.add_argument("--workers", type=int, default=2, help="jobs at a time, one core each [2]")
    p.add_argument("--out", default="runs/ablation", help="folder for every run and the results [runs/ablation]")
    args = p.parse_args(argv)
    if args.steps < 1 or args.items < 1 or args.workers < 1 or args.n < 1:
        p.error("--steps, --items, --workers and --n must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: duplicates in {args.seeds}")
    if args.temperature == 0 and args.n > 1:
        p.error("--temperature 0 (greedy) gives --n identical responses: use --n 1")
    return args


if __name__ == "__main__":
    main()
