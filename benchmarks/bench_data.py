"""Side-by-side: a batch holding one huge image, with and without the load-time pixel cap (`data.max_image_pixels`).

Issue #11 found a 10000 x 10000 image accepted as is: every step decoded all 100 M pixels and the processor resized
them, each time. The cap decodes and downscales such an image once, at load. This script times `encode_prompts` (the
per-step cost: decode every image of the batch, then the processor) on a batch of 8 prompts whose first image is
SIZE x SIZE (a PNG, the other seven 112 x 112), loaded by `load_jsonl` with `max_image_pixels=None` (no cap, the old
behaviour) and with the default cap, each in its own process so peak memory is its own:

    python benchmarks/bench_data.py                   # --size 10000 --batches 3

Figures: load time (the cap pays its decode here, once), encode time per batch (min and max over --batches), and
peak resident memory of the process (model, processor and all).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmo_min.data import MAX_IMAGE_PIXELS  # noqa: E402


def child(folder: Path, cap: int | None, batches: int) -> dict:
    from harmo_min.data import encode_prompts, load_jsonl
    from harmo_min.model import build_tiny

    _, processor = build_tiny(seed=0)
    start = time.perf_counter()
    examples = load_jsonl(folder / "data.jsonl", max_image_pixels=cap)
    load_s = time.perf_counter() - start
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        encode_prompts(processor, examples, "bare")
        times.append(time.perf_counter() - start)
    return {"load_s": load_s, "encode_min_s": min(times), "encode_max_s": max(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def write_files(folder: Path, size: int) -> None:
    from PIL import Image

    Image.new("RGB", (size, size), (200, 30, 30)).save(folder / "huge.png", compress_level=1)
    Image.new("RGB", (112, 112), (30, 30, 200)).save(folder / "small.png")
    rows = [{"id": str(i), "problem": "What colour is the shape?", "answer": "red",
             "images": ["huge.png" if i == 0 else "small.png"]} for i in range(8)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=10000, help="side of the huge image in pixels [10000]")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "CAP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        folder, cap = args.child
        print(json.dumps(child(Path(folder), int(cap) or None, args.batches)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp), args.size)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        print(f"batch of 8, first image {args.size}x{args.size} PNG; {args.batches} batches each\n")
        print("| loader | load | encode per batch (min-max) | peak RSS |\n| --- | ---: | ---: | ---: |")
        for label, cap in (("no cap (before)", 0), (f"cap {MAX_IMAGE_PIXELS} px, once at load", MAX_IMAGE_PIXELS)):
            out = subprocess.run([sys.executable, __file__, "--child", tmp, str(cap), "--batches", str(args.batches)],
                                 capture_output=True, text=True, env=env, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {label} | {r['load_s']:.2f} s | {r['encode_min_s']:.2f}-{r['encode_max_s']:.2f} s | "
                  f"{r['peak_rss_mb'] / 1024:.2f} GB |")


if __name__ == "__main__":
    main()
