"""Batch labeling throughput: clips per hour with the bundled default, one worker against two, and
the cost of loading the model per clip (the one-``uniultra propagate``-per-clip workflow), in one run.

    .venv/bin/python benchmarks/batch.py [--split all] [--clips N] [--threads 1] [--per-clip 5]
                                         [--model uniultra-mini-us] [--out benchmarks/results]

The manifest is every carotid recording in ``../shared/data`` (28 clips; ``--clips N``: the first N),
one box from the expert mask on the first frame, structure "CCA"; the model is the bundled default.
The machine's load average is recorded before and after: on a shared machine the two-worker ratio
measures spare cores as much as scaling.  Each measurement is a fresh process with
``--threads`` torch threads per worker:
1. ``uniultra batch`` with one worker (model loaded once);
2. two workers started together on the same manifest and output folder (they split the clips
   through the claims) -- the wall time of both against (1);
3. ``uniultra propagate`` once per clip (a new process, the model loaded again each time) on the
   first ``--per-clip`` clips, against the same clips' time inside (1).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIULTRA_DATA", REPO.parent / "shared" / "data"))


def make_manifest(tmp: Path, split: str, limit: int | None = None) -> tuple[Path, list[dict]]:
    car = DATA / "carotid"
    rows = [r for r in csv.DictReader(open(car / "split.csv")) if split == "all" or r["split"] == split]
    clips: dict[str, list[dict]] = {}
    for r in rows:
        clips.setdefault(r["clip"], []).append(r)
    out, info = [], []
    for c, rs in list(clips.items())[:limit]:
        rs.sort(key=lambda r: int(r["frame"]))
        ys, xs = np.nonzero(np.asarray(Image.open(car / "masks" / f"{rs[0]['id']}.png")) > 0)
        name = c.replace(" ", "_")
        out.append([name, str(car / "images" / f"{glob_escape(c)}_*.png"), 0, "CCA", xs.min(), ys.min(), xs.max(), ys.max()])
        info.append({"name": name, "frames": len(rs), "ids": [r["id"] for r in rs]})
    m = tmp / "manifest.csv"
    with open(m, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "clip", "frame", "structure", "x0", "y0", "x1", "y1"])
        w.writerows(out)
    return m, info


def glob_escape(s: str) -> str:
    import glob

    return glob.escape(s)


def uniultra(*args, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "uniultra.cli", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait(procs) -> None:
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {err[-2000:]}")


def events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="all", help="carotid split: all, train, val or test")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--per-clip", type=int, default=5, help="clips for the model-per-clip comparison")
    ap.add_argument("--clips", type=int, default=None, help="only the first N recordings (default: all)")
    ap.add_argument("--model", default="uniultra-mini-us", help="registry name or checkpoint (default: the bundled one)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="uniultra-batch-bench-"))
    try:
        manifest, info = make_manifest(tmp, args.split, args.clips)
        n_frames = sum(c["frames"] for c in info)
        res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}".strip(", "),
               "threads_per_worker": args.threads, "clips": len(info), "frames": n_frames, "model": args.model,
               "nice": os.nice(0), "load_average_before": [round(x, 2) for x in os.getloadavg()]}

        t = time.perf_counter()
        wait([uniultra("batch", manifest, "--out-dir", tmp / "one", "--device", "cpu", "--events", tmp / "one.jsonl",
                       "--model", args.model, threads=args.threads)])
        one = time.perf_counter() - t
        ev = events(tmp / "one.jsonl")
        start = next(e["time"] for e in ev if e["event"] == "run_start")
        first = next(e["time"] for e in ev if e["event"] == "clip_start")
        res["one_worker"] = {"wall_s": round(one, 1), "clips_per_hour": round(len(info) / one * 3600),
                             "frames_per_s": round(n_frames / one, 1),
                             "startup_and_model_load_s": round(first - start + (one - (ev[-1]["time"] - start)), 1)}

        t = time.perf_counter()
        wait([uniultra("batch", manifest, "--out-dir", tmp / "two", "--device", "cpu", "--events", tmp / f"two{k}.jsonl",
                       "--model", args.model, threads=args.threads) for k in range(2)])
        two = time.perf_counter() - t
        done = [e["clip"] for k in range(2) for e in events(tmp / f"two{k}.jsonl") if e["event"] == "clip_done"]
        res["two_workers"] = {"wall_s": round(two, 1), "clips_per_hour": round(len(info) / two * 3600),
                              "frames_per_s": round(n_frames / two, 1), "speedup_vs_one": round(one / two, 2),
                              "clips_per_worker": [sum(e["event"] == "clip_done" for e in events(tmp / f"two{k}.jsonl"))
                                                   for k in range(2)],
                              "each_clip_once": sorted(done) == sorted(c["name"] for c in info)}
        same = all((tmp / "one" / c["name"] / f"{c['name']}.seg.nrrd").read_bytes()
                   == (tmp / "two" / c["name"] / f"{c['name']}.seg.nrrd").read_bytes() for c in info)
        res["two_workers"]["outputs_identical_to_one"] = same

        sub = info[: args.per_clip]
        in_batch = sum(e["seconds"] for e in ev if e["event"] == "clip_done" and e["clip"] in {c["name"] for c in sub})
        t = time.perf_counter()
        for c in sub:  # the old way: one process and one model load per clip
            d = tmp / "pc" / c["name"]
            d.mkdir(parents=True)
            with open(d / "frames.csv", "w") as f:
                f.write("id,image\n" + "".join(f"{i},{DATA / 'carotid' / 'images' / (i + '.png')}\n" for i in c["ids"]))
            row = next(r for r in csv.DictReader(open(manifest)) if r["name"] == c["name"])
            (d / "prompts.csv").write_text(f"id,x0,y0,x1,y1\n{c['ids'][0]},{row['x0']},{row['y0']},{row['x1']},{row['y1']}\n")
            wait([uniultra("propagate", "--frames", d / "frames.csv", "--prompts", d / "prompts.csv", "--out-dir",
                           d / "out", "--device", "cpu", "--model", args.model, threads=args.threads)])
        per_clip = time.perf_counter() - t
        res["model_per_clip"] = {"clips": len(sub), "frames": sum(c["frames"] for c in sub),
                                 "wall_s_one_process_per_clip": round(per_clip, 1),
                                 "seconds_inside_batch": round(in_batch, 1),
                                 "overhead_per_clip_s": round((per_clip - in_batch) / len(sub), 2)}
        res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
