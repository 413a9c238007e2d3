"""Speed and memory of the bundled default next to the other models, in one run.

Models (``--models``, default all): the bundled default and the previous one, the LiteMedSAM-decoder student
(``uniultra-mini-lm``: UniUltra-mini's encoder feeding LiteMedSAM's decoder), LiteMedSAM itself
and SAM2.1-hiera-tiny at 1024.

Each model runs in its own subprocess so that its peak memory (max resident set size) is its
own.  Reported side by side, with ratios; absolute numbers only with the machine named.

    .venv/bin/python benchmarks/speed.py [--repeats 10] [--threads 2] [--out benchmarks/results]

Measures (1) latency of one box prompt including the image embedding and of a prompt on a
cached embedding, (2) peak memory, (3) cine throughput (frames/s) propagating one box through
a carotid test clip, with the default motion-following propagation and without it (median of
three alternating runs; the bracket in that row is the ratio to the same model with motion).  SAM2.1-hiera-tiny has random weights here (no downloads): its speed is
that of the real model; its masks are meaningless and are not looked at.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIULTRA_DATA", REPO.parent / "shared" / "data"))
DEFAULT = "uniultra-mini-us6pr"  # uniultra.registry.DEFAULT_MODEL (checked in main)
LABELS = {DEFAULT: f"{DEFAULT} (bundled default)",
          "uniultra-mini-us6p": "uniultra-mini-us6p (previous default)",
          "uniultra-mini-us6": "uniultra-mini-us6",
          "uniultra-mini-us": "uniultra-mini-us (first default)",
          "uniultra-mini-lm": "UniUltra-mini on LiteMedSAM's decoder",
          "litemedsam": "LiteMedSAM",
          "sam2.1-hiera-tiny": "SAM2.1-hiera-tiny @1024"}
MODELS = list(LABELS)
RANDOM = ("sam2", "uniultra-mini-lm")  # speed does not depend on the weights: no downloads


def carotid_clip(n: int = 30):
    from uniultra.data.io import read_image

    rows = [r for r in csv.DictReader(open(DATA / "carotid" / "split.csv")) if r["split"] == "test"]
    clip = rows[0]["clip"]
    ids = [r["id"] for r in sorted((r for r in rows if r["clip"] == clip), key=lambda r: int(r["frame"]))][:n]
    frames = [read_image(DATA / "carotid" / "images" / f"{i}.png") for i in ids]
    import numpy as np

    gt = read_image(DATA / "carotid" / "masks" / f"{ids[0]}.png") > 0
    ys, xs = np.nonzero(gt)
    return frames, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def worker(name: str, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from uniultra.inference import Predictor, propagate
    from uniultra.models import build_model

    model = build_model(name, random_init=name.startswith(RANDOM))
    p = Predictor(model, "cpu")
    frames, box = carotid_clip()
    image = frames[0]
    p.set_image(image)
    p.predict(boxes=[box])  # warm-up
    full, cached = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        p.set_image(image)
        p.predict(boxes=[box])
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        p.predict(boxes=[box])
        cached.append(time.perf_counter() - t)
    fps, still_fps = [], []
    for _ in range(3 if model.image_size <= 512 else 1):  # alternate, median: the two differ by little
        t = time.perf_counter()
        masks = propagate(p, frames, {0: [box]}, direction="forward", min_area_ratio=0.0)
        fps.append(len(frames) / (time.perf_counter() - t))
        t = time.perf_counter()
        propagate(p, frames, {0: [box]}, direction="forward", min_area_ratio=0.0, motion="none")
        still_fps.append(len(frames) / (time.perf_counter() - t))
    return {
        "model": name, "image_size": model.image_size,
        "encoder_params": model.param_report()["encoder_params"],
        "box_ms": 1000 * statistics.median(full), "cached_ms": 1000 * statistics.median(cached),
        "cine_fps": statistics.median(fps), "cine_fps_no_motion": statistics.median(still_fps),
        "frames": len(frames), "frames_segmented": sum(m is not None for m in masks),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def baseline_rss() -> float:
    """Peak RSS of a process that imports everything but builds no model (subtracted)."""
    code = ("import resource, torch, uniultra.inference, uniultra.models;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--models", nargs="+", default=None, help="registry/architecture names (default: all)")
    ap.add_argument("--name", default="speed", help="results file stem in --out (default: speed)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.threads)))
        return 0
    base = baseline_rss()
    rows = []
    from uniultra.registry import DEFAULT_MODEL

    if DEFAULT_MODEL != DEFAULT:
        print(f"speed: the bundled default is now {DEFAULT_MODEL}: update DEFAULT in {__file__}", file=sys.stderr)
        return 2
    for name in args.models or MODELS:
        label = LABELS.get(name, name)
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats),
                              "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["label"] = label
        r["model_mem_mb"] = r["peak_rss_mb"] - base
        rows.append(r)
    a = rows[0]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads"

    def cells(fmt, key, ratio=None):
        out = []
        for r in rows:
            c = fmt(r)
            if ratio is not None and r is not a:
                c += f" ({ratio(r):.1f}x)"
            out.append(c)
        return " | ".join(out)

    lines = [
        f"Machine: {machine}; CPU only; median of {args.repeats} runs; in brackets: ratio to the first column.",
        "",
        "| | " + " | ".join(r["label"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| input size | " + cells(lambda r: str(r["image_size"]), "image_size") + " |",
        "| image-encoder parameters | " + cells(lambda r: f"{r['encoder_params'] / 1e6:.2f}M", "p",
                                                lambda r: r["encoder_params"] / a["encoder_params"]) + " |",
        "| one box prompt, embedding included | " + cells(lambda r: f"{r['box_ms']:.1f} ms", "b",
                                                          lambda r: r["box_ms"] / a["box_ms"]) + " |",
        "| prompt on a cached embedding | " + cells(lambda r: f"{r['cached_ms']:.1f} ms", "c",
                                                    lambda r: r["cached_ms"] / a["cached_ms"]) + " |",
        f"| peak memory above the bare process ({base:.0f} MB) | "
        + cells(lambda r: f"{r['model_mem_mb']:.0f} MB", "m") + " |",
        f"| cine propagation ({a['frames']} carotid frames) | "
        + cells(lambda r: f"{r['cine_fps']:.1f} frames/s", "f", lambda r: r["cine_fps"] / a["cine_fps"]) + " |",
        "| the same without motion (`motion=\"none\"`) | "
        + cells(lambda r: f"{r['cine_fps_no_motion']:.1f} frames/s ({r['cine_fps_no_motion'] / r['cine_fps']:.2f}x)",
                "g") + " |",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(text + "\n")
    (out / f"{args.name}.json").write_text(json.dumps({"machine": machine, "rows": rows, "baseline_rss_mb": base}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
