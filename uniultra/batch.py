"""Batch labeling of many cine clips: ``uniultra batch MANIFEST --out-dir DIR``.

One run reads a manifest (CSV, JSON Lines, or a folder of clips plus one prompts file), checks
all of it before any work (a bad manifest is refused naming the line), loads each model once,
and labels every clip by propagating its key-frame prompts (one propagation per named
structure; the frames' embeddings are shared between the structures).

Per clip, ``DIR/<name>/`` is written as one unit: everything goes into a staging folder that is
renamed into place only when complete, so a killed run never leaves a clip that a rerun would take
as done.  It holds ``<name>.seg.nrrd`` (the structures as named segments, frames as slices),
``<name>.seq.nrrd`` (a labelmap sequence that plays with the cine in Slicer), ``frames.csv`` (per
frame and structure: area, the model's predicted IoU, drift flags), ``clip.json`` and, on request,
PNG masks and the frames themselves as ``<name>_frames.seq.nrrd``.

Rerunning the same command skips clips whose output is complete and made from the same inputs
(``--redo`` forces); a clip whose manifest row changed is redone.  Errors in one clip (unreadable
file, key frame outside the clip, box outside the image, wrong frame count) are recorded and the
run goes on; the exit status is 0 when every clip is labelled, ``100 + failed`` (at most 125) when
some failed, 2 for a bad manifest or options (nothing run), 130 when cancelled.

Several workers -- an array job, or the same command started on several machines -- share one
output folder on a shared file system: ``--shard K/N`` (or a SLURM array's task id, read when
present) gives worker K the clips ``i`` with ``i % N == K``; without shards the workers simply
split the clips between them.  Either way each clip is claimed with an OS file lock held while
it is labelled (released by the kernel when a worker dies, so nothing stays claimed), and
``--summary`` merges what all workers wrote.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from uniultra.checks import arg_number, box_corners, number
from uniultra.errors import Cancelled, InputError
from uniultra.events import LazyAppend as _LazyAppend  # the engine's one JSON-lines event module
from uniultra.events import emit_event, jsonable

STATE_DIR = ".uniultra-batch"  # claims, staging, failure records (inside the output folder)
EXIT_INPUT = 2
EXIT_CANCELLED = 130
EXIT_FAILED_BASE = 100  # exit status 100 + number of failed clips (at most 125)
LOW_SCORE = 0.5  # predicted IoU below this flags a frame
AREA_JUMP = 1.5  # area changing by more than this factor between neighbouring frames flags a frame
SHIFT = 0.25  # centroid moving more than this fraction of the previous mask's size flags a frame
CLIP_EXT = (".dcm", ".dicom", ".seq.nrrd", ".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
PAGED_EXT = (".tif", ".tiff", ".gif")  # a cine saved page by page (read_frames reads every page)
FRAME_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_NAME_RE = re.compile(r"^\w[\w .+-]*$")  # \w: any language's letters and digits, and _


# ============================================================================== manifest
@dataclass
class Prompt:
    frame: int
    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float, int]] = field(default_factory=list)
    line: int = 0


@dataclass
class ClipJob:
    name: str
    clip: str  # a clip file, a folder of frames, or a glob of frame files
    structures: dict[str, list[Prompt]]
    model: str | None = None
    n_frames: int | None = None
    axis: int = 0
    line: int = 0
    source: str = ""

    def fingerprint(self, options: dict) -> str:
        """Changes when anything that decides this clip's output changes."""
        p = Path(self.clip)
        size = p.stat().st_size if p.is_file() else None
        spec = {"clip": str(p.resolve()) if not _is_glob(self.clip) else self.clip, "size": size,
                "structures": {k: [asdict(x) | {"line": 0} for x in v] for k, v in self.structures.items()},
                "model": self.model, "n_frames": self.n_frames, "axis": self.axis, "options": options}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _where(path: Path, line: int) -> str:
    return f"{path} line {line}"


def _check_name(value: str, what: str, where: str) -> str:
    if not value or not _NAME_RE.match(value) or ".." in value:
        raise InputError(f"{where}: {what} {value!r} cannot be used as a file name inside the output folder "
                         "(letters, digits, space, '_', '-', '.', '+'; no '/' or '..')")
    return value


def _number(value, what: str, where: str, integer: bool = False):
    return number(value, f"{where}: {what}", integer=integer)


def _parse_box(raw, where: str):
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise InputError(f"{where}: box {raw!r} must be four numbers x0 y0 x1 y1")
    return box_corners([_number(v, "box value", where) for v in raw], f"{where}: box")


def _parse_points(raw, where: str) -> list[tuple[float, float, int]]:
    """``"x y label; x y label"`` or ``[[x, y, label], ...]``."""
    if raw in (None, "", []):
        return []
    items = [p.split() for p in raw.split(";") if p.strip()] if isinstance(raw, str) else raw
    out = []
    for p in items:
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise InputError(f"{where}: point {p!r} must be x y label (label 1 = object, 0 = background)")
        lab = _number(p[2], "point label", where, integer=True)
        if lab not in (0, 1):
            raise InputError(f"{where}: point label {p[2]!r} must be 1 (object) or 0 (background)")
        out.append((_number(p[0], "point x", where), _number(p[1], "point y", where), lab))
    return out


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _add_prompt(jobs: dict, order: list, names: dict, rec: dict, base: Path, where: str, line: int,
                source: str) -> None:
    """Add one prompt record (a CSV row or one JSON prompt with its clip's fields) to ``jobs``."""
    clip = str(rec.get("clip") or "").strip()
    if not clip:
        raise InputError(f"{where}: no clip (a clip file, a folder of frames or a glob of frame files)")
    name = str(rec.get("name") or "").strip()
    if not name:
        if _is_glob(clip):
            raise InputError(f"{where}: clip {clip!r} is a glob: give the output a name (column 'name')")
        stem = Path(clip.rstrip("/\\")).name
        for e in CLIP_EXT + PAGED_EXT:
            if stem.lower().endswith(e):
                stem = stem[: -len(e)]
                break
        name = stem
    _check_name(name, "output name", where)
    structure = _check_name(str(rec.get("structure") or "object").strip(), "structure", where)
    frame = _number(rec.get("frame", 0) if rec.get("frame") not in (None, "") else 0, "frame", where, integer=True)
    if frame < 0:
        raise InputError(f"{where}: frame {frame} must be 0 or more (frames count from 0)")
    box = _parse_box(rec.get("box"), where)
    points = _parse_points(rec.get("points"), where)
    if box is None and not points:
        raise InputError(f"{where}: no prompt: give a box (x0,y0,x1,y1) and/or points")
    model = str(rec.get("model") or "").strip() or None
    if model and (Path(model).suffix in (".pt", ".pth", ".ckpt") or "/" in model):
        model = _resolve(base, model)
        if not Path(model).is_file():
            raise InputError(f"{where}: model file {model!r} does not exist")
    n_frames = rec.get("n_frames")
    n_frames = None if n_frames in (None, "") else _number(n_frames, "n_frames", where, integer=True)
    axis = rec.get("axis")
    axis = 0 if axis in (None, "") else _number(axis, "axis", where, integer=True)
    clip_path = _resolve(base, clip)
    key = name.lower()  # case-insensitive file systems
    job = jobs.get(key)
    if job is None:
        job = jobs[key] = ClipJob(name, clip_path, {}, model, n_frames, axis, line, source)
        names[key] = where
        order.append(key)
    elif job.clip != clip_path:
        raise InputError(f"{where}: output name {name!r} is already used for another clip at {names[key]}")
    elif (job.model, job.n_frames, job.axis) != (model, n_frames, axis):
        raise InputError(f"{where}: model, n_frames and axis must be the same on every row of clip {name!r} "
                         f"(see {names[key]})")
    job.structures.setdefault(structure, []).append(Prompt(frame, box, points, line))


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [(reader.line_num, {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v
                                       for k, v in r.items()}) for r in reader]
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV file ({e})") from None
    box_cols = [c for c in ("x0", "y0", "x1", "y1") if c in header]
    if "clip" not in header or (0 < len(box_cols) < 4) or (not box_cols and "points" not in header):
        raise InputError(f"{path} line 1: the header must have clip and x0,y0,x1,y1 (and/or points); optional "
                         f"frame, structure, name, model, n_frames, axis; it has {','.join(header) or 'nothing'}")
    out = []
    for line, r in rows:
        if None in r or "" in r and r[""]:
            raise InputError(f"{_where(path, line)}: more values than columns in the header")
        if box_cols and any(r.get(c) for c in box_cols):
            r["box"] = [r.get(c) for c in box_cols]
        out.append((line, r))
    return out


def read_manifest(path, prompts=None) -> list[ClipJob]:
    """Read and check a manifest -> one job per clip, in manifest order.  Raises ``InputError``
    naming the file and line for anything wrong.

    * CSV: one row per prompt, header ``clip,frame,structure,x0,y0,x1,y1`` (+ optional ``points``
      ``"x y label; ..."``, ``name``, ``model``, ``n_frames``, ``axis``); rows of one clip are grouped.
    * JSON Lines (``.jsonl``): one clip per line, ``{"clip": ..., "name"?, "model"?, "n_frames"?,
      "axis"?, "prompts": [{"frame": 0, "structure": "CCA", "box": [x0, y0, x1, y1], "points"?:
      [[x, y, 1]]}, ...]}``.
    * A folder of clips (files, or sub-folders of frames) with ``prompts``: a CSV as above whose
      ``clip`` is a clip's file or folder name in that folder, or ``*`` for every clip.
    Relative paths are relative to the manifest's (or prompts file's) folder.
    """
    path = Path(path)
    jobs: dict[str, ClipJob] = {}
    order: list[str] = []
    names: dict[str, str] = {}
    if path.is_dir():
        if prompts is None:
            raise InputError(f"{path} is a folder: give --prompts PROMPTS.csv with the prompts for its clips")
        _folder_manifest(path, Path(prompts), jobs, order, names)
    elif prompts is not None:
        raise InputError("--prompts goes with a folder of clips; a manifest file holds its own prompts")
    elif not path.is_file():
        raise InputError(f"manifest {path} does not exist")
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        _jsonl_manifest(path, jobs, order, names)
    else:
        for line, r in _csv_rows(path):
            _add_prompt(jobs, order, names, r, path.parent, _where(path, line), line, str(path))
    if not order:
        raise InputError(f"manifest {path} has no clips")
    return [jobs[k] for k in order]


def _jsonl_manifest(path: Path, jobs, order, names) -> None:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = _where(path, line)
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: each line must be a JSON object with clip and prompts")
        prompts = rec.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise InputError(f"{where}: 'prompts' must be a non-empty list of {{frame, structure, box|points}}")
        for p in prompts:
            if not isinstance(p, dict):
                raise InputError(f"{where}: each prompt must be an object with frame, structure, box and/or points")
            unknown = set(p) - {"frame", "structure", "box", "points"}
            if unknown:
                raise InputError(f"{where}: unknown prompt field(s) {', '.join(sorted(unknown))}")
            fields = {k: rec.get(k) for k in ("clip", "name", "model", "n_frames", "axis")}
            _add_prompt(jobs, order, names, fields | p, path.parent, where, line, str(path))


def _folder_manifest(folder: Path, prompts: Path, jobs, order, names) -> None:
    if not prompts.is_file():
        raise InputError(f"prompts file {prompts} does not exist")
    from uniultra.data.io import _is_dicom

    rows = _csv_rows(prompts)
    named = {r.get("clip", "") for _, r in rows}
    clips = {}
    for p in sorted(folder.iterdir(), key=lambda q: _natural(q.name)):
        if p.name.startswith("."):
            continue
        # a DICOM without an extension (as PACS exports name them) or any file a row names is a clip too
        if (p.is_dir() or any(p.name.lower().endswith(e) for e in CLIP_EXT) or p.name in named or _is_dicom(p)
                or _multi_page(p)):
            clips[p.name] = p
    if not clips:
        raise InputError(f"{folder} holds no clips (DICOM, .seq.nrrd, NRRD/NIfTI volumes, multi-page TIFF, "
                         "or folders of frames)")
    for line, r in rows:
        target = r.get("clip", "")
        if target != "*" and target not in clips:
            raise InputError(f"{_where(prompts, line)}: clip {target!r} is not in {folder}")
        if target != "*" and r.get("name"):
            raise InputError(f"{_where(prompts, line)}: with a folder of clips the output name is the clip's name")
    for cname, cpath in clips.items():
        mine = [(line, r) for line, r in rows if r.get("clip") in (cname, "*")]
        if not mine:
            raise InputError(f"{prompts}: clip {cname!r} in {folder} has no prompt (add rows for it, or a '*' row)")
        for line, r in mine:
            _add_prompt(jobs, order, names, r | {"clip": str(cpath), "name": ""}, prompts.parent,
                        _where(prompts, line), line, str(prompts))


def _multi_page(p: Path) -> bool:
    """A TIFF or GIF file of more than one page (a cine saved page by page)."""
    if p.suffix.lower() not in PAGED_EXT or not p.is_file():
        return False
    try:
        from PIL import Image

        with Image.open(p) as im:
            return getattr(im, "n_frames", 1) > 1
    except Exception:  # noqa: BLE001 - unreadable: not taken as a clip (a row naming it still fails clearly)
        return False


def _natural(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


# ============================================================================== shards and claims
def parse_shard(spec: str | None, env=None) -> tuple[int, int]:
    """``K/N`` (0 <= K < N) -> (K, N).  Without a spec, a SLURM array's task id is used when
    present (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``)."""
    env = os.environ if env is None else env
    if spec is None:
        if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
            try:
                tid, n = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
                k = tid - int(env.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
            except ValueError:
                raise InputError("SLURM_ARRAY_TASK_ID/COUNT/MIN are not whole numbers; give --shard K/N") from None
            if not 0 <= k < n:
                raise InputError(f"SLURM array task {tid} is not one of {n} consecutive tasks (use --array=A-B "
                                 "without a step, or give --shard K/N)")
            return k, n
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not (0 <= int(m.group(1)) < int(m.group(2))):
        raise InputError(f"--shard {spec}: expected K/N with 0 <= K < N (e.g. 0/4 ... 3/4)")
    return int(m.group(1)), int(m.group(2))


def shard_jobs(jobs: Sequence[ClipJob], k: int, n: int) -> list[ClipJob]:
    """Deterministic, disjoint share ``k`` of ``n``: the clips at manifest positions ``i % n == k``."""
    return [j for i, j in enumerate(jobs) if i % n == k]


class Claim:
    """An exclusive claim on one clip, held as an OS file lock (``filelock``: flock / msvcrt) on
    ``DIR/.uniultra-batch/claims/<name>.lock``.  The kernel drops the lock when its process dies,
    so a killed worker never leaves a clip claimed.  The shared file system must support locks
    (local disks, NFSv4, Lustre mounted with ``flock``, GPFS, BeeGFS)."""

    def __init__(self, out_dir: Path, name: str):
        from filelock import FileLock

        d = out_dir / STATE_DIR / "claims"
        d.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(d / f"{name}.lock"), timeout=0)

    def acquire(self) -> bool:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
            return True
        except Timeout:
            return False

    def release(self) -> None:
        self._lock.release()


# ============================================================================== one clip
def read_clip(job: ClipJob):
    """Frames of a clip (file, folder of frames or glob), its pixel spacing (x, y) in mm, and the
    volume's geometry when the frames are slices of a 3D volume (else None)."""
    import glob

    from uniultra.data.io import read_frames

    if _is_glob(job.clip):
        files = sorted(glob.glob(job.clip), key=_natural)
        if not files:
            raise InputError(f"no frame files match {job.clip}")
        return _frame_files(files), (1.0, 1.0), None
    p = Path(job.clip)
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in FRAME_EXT and not f.name.startswith(".")),
                       key=lambda f: _natural(f.name))
        if not files:
            raise InputError(f"folder {p} holds no frame images ({', '.join(FRAME_EXT)})")
        return _frame_files(files), (1.0, 1.0), None
    frames = read_frames(p, axis=job.axis)
    return frames, _spacing(p, job.axis), _volume_geometry(p, job.axis, frames)


def _frame_files(files) -> list[np.ndarray]:
    """The frames of a folder or glob of frame images, refused (naming the odd file) when they
    differ in size."""
    from uniultra.data.io import read_image

    frames = [read_image(f) for f in files]
    hw = frames[0].shape[:2]
    for f, a in zip(files, frames):
        if a.shape[:2] != hw:
            raise InputError(f"frame file {f} is {a.shape[1]}x{a.shape[0]}, but {files[0]} is {hw[1]}x{hw[0]}: "
                             "one size per clip; resize or crop the frames to one size")
    return frames


_AXIS_XY = {0: (0, 1), 1: (0, 2), 2: (1, 2)}  # volume axes (i, j, k) along x, y of frames sliced along numpy axis


def _spacing(p: Path, axis: int = 0) -> tuple[float, float]:
    """Pixel spacing (x, y) of a clip file as Slicer's UniUltra module loads it; 1 mm when unknown.
    ``axis``: the numpy axis a 3D NIfTI, MHA or NRRD volume is sliced along (read_frames)."""
    name = p.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz", ".mha", ".mhd")):
            import SimpleITK as sitk

            r = sitk.ImageFileReader()
            r.SetFileName(str(p))
            r.ReadImageInformation()
            sp = r.GetSpacing()  # (i, j, k, ...)
            return tuple(sp[d] for d in _AXIS_XY[axis % 3]) if len(sp) == 3 else (sp[0], sp[1])
        if name.endswith((".nrrd", ".nhdr")):
            from uniultra.data.io import read_nrrd_header

            fields, _ = read_nrrd_header(p)
            vecs = re.findall(r"\(([^)]*)\)", fields.get("space directions", ""))
            sp = [float(np.linalg.norm([float(x) for x in v.split(",")])) for v in vecs]  # (i, j, k)
            if len(sp) == 3 and "list" not in fields.get("kinds", "").lower().split():  # a volume: read_frames
                return tuple(sp[d] for d in _AXIS_XY[axis % 3])
            if len(sp) >= 2:
                return (sp[0], sp[1])
        elif name.endswith((".dcm", ".dicom")) or (not name.endswith(CLIP_EXT) and p.is_file()):
            import pydicom

            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            if "PixelSpacing" in ds:
                row, col = (float(v) for v in ds.PixelSpacing)
                return (col, row)
            regions = ds.get("SequenceOfUltrasoundRegions") or []
            if regions and regions[0].get("PhysicalUnitsXDirection") == 3 and regions[0].get("PhysicalDeltaX"):
                r = regions[0]  # units code 3 = cm
                return (abs(float(r.PhysicalDeltaX)) * 10.0, abs(float(r.PhysicalDeltaY)) * 10.0)
    except Exception:  # noqa: BLE001 - spacing is a nicety; the frames were read already
        pass
    return (1.0, 1.0)


def _volume_geometry(p: Path, axis: int, frames: list[np.ndarray]):
    """Where Slicer puts the voxels of ``p`` when the clip's ``frames`` are its slices along numpy
    ``axis`` of its ``[k, j, i]`` array (a 3D NIfTI, MHA or NRRD volume); None for anything else
    (cines, DICOM, a volume of one slice read as one image), which keeps the frame geometry."""
    from uniultra.data.slicer_nrrd import VolumeGeometry

    name = p.name.lower()
    if not name.endswith((".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")) or name.endswith(".seq.nrrd"):
        return None
    try:
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        r.ReadImageInformation()
        if r.GetDimension() != 3:
            return None
        size = r.GetSize()  # (i, j, k)
        shape = (size[2], size[1], size[0])
        a = axis % 3
        if len(frames) != shape[a] or frames[0].shape[:2] != tuple(shape[d] for d in range(3) if d != a):
            return None  # not sliced along `axis` (e.g. one slice stored as a volume)
        d = np.asarray(r.GetDirection(), float).reshape(3, 3)  # column c: LPS direction of index axis c
        sp = r.GetSpacing()
        steps = tuple(tuple(float(v) for v in d[:, c] * sp[c]) for c in range(3))
        if not np.all(np.isfinite(steps)) or abs(np.linalg.det(np.asarray(steps))) < 1e-12:
            return None
        return VolumeGeometry(tuple(float(v) for v in r.GetOrigin()), steps, a)
    except Exception:  # noqa: BLE001 - geometry is a nicety; the frames were read already
        return None


def _tensor_bytes(x) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.element_size() * x.nelement()
    if isinstance(x, dict):
        return sum(_tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(v) for v in x)
    return 0


class ClipPredictor:
    """A :class:`~uniultra.inference.Predictor` for the frames of one clip: each frame's embedding
    is computed once and reused by every structure (up to ``cache_bytes``), and each ``predict``
    records the model's predicted IoU for the frame it was asked on.  It is what ``propagate``
    sees, so the engine's own propagation runs unchanged."""

    def __init__(self, predictor, frames: Sequence[np.ndarray], cache_bytes: int = 1 << 30):
        self.predictor = predictor
        self._index = {self._key(f): i for i, f in enumerate(frames)}
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self._cache_bytes, self._used = cache_bytes, 0
        self.current: int | None = None
        self.scores: dict[int, list[float]] = {}
        self.encoded = 0

    def __getattr__(self, name):  # model, device, size, ... of the wrapped predictor
        return getattr(self.predictor, name)

    @staticmethod
    def _key(a: np.ndarray):
        return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)

    def set_image(self, image: np.ndarray) -> None:
        p = self.predictor
        i = self._index.get(self._key(np.asarray(image)))
        self.current = i
        if i is not None and i in self._cache:
            self._cache.move_to_end(i)
            p._emb, p._emb_mirror, p._hw = self._cache[i]
            return
        p.set_image(image)
        self.encoded += 1
        if i is not None:
            size = _tensor_bytes(p._emb) + _tensor_bytes(p._emb_mirror)
            while self._cache and self._used + size > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._used -= _tensor_bytes(old[0]) + _tensor_bytes(old[1])
            if size <= self._cache_bytes:
                self._cache[i] = (p._emb, p._emb_mirror, p._hw)
                self._used += size

    def predict(self, *args, **kwargs):
        r = self.predictor.predict(*args, **kwargs)
        if self.current is not None:
            self.scores.setdefault(self.current, []).extend(float(s) for s in r.scores)
        return r


@dataclass
class Options:
    direction: str = "both"
    engine: str = "auto"
    margin: float = 0.05
    anchor: float = 0.3
    png: bool = False
    save_frames: bool = False
    cache_mb: int = 1024
    motion: str = "ncc"

    def fingerprint(self) -> dict:  # what changes the masks (not what extra files are written)
        return {"direction": self.direction, "engine": self.engine, "margin": self.margin, "anchor": self.anchor,
                "motion": self.motion}


def label_clip(predictor, frames: list[np.ndarray], job: ClipJob, opts: Options,
               progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None):
    """Propagate every structure of ``job`` through ``frames`` -> (masks[s][f], scores[s][f], engine)."""
    from uniultra.data.prompts import mask_box
    from uniultra.inference import propagate, propagate_memory
    from uniultra.inference.predictor import check_box, check_image

    frames = [check_image(f, f"frame {i}") for i, f in enumerate(frames)]
    n = len(frames)
    if job.n_frames is not None and n != job.n_frames:
        raise InputError(f"clip has {n} frames, the manifest says n_frames {job.n_frames}")
    hw = frames[0].shape[:2]
    for i, f in enumerate(frames):
        if f.shape[:2] != hw:
            raise InputError(f"frame {i} is {f.shape[1]}x{f.shape[0]}, frame 0 is {hw[1]}x{hw[0]}: one size per clip")
    for s, prompts in job.structures.items():
        for p in prompts:
            where = f"{s}, line {p.line}" if p.line else s
            if p.frame >= n:
                raise InputError(f"{where}: key frame {p.frame} is outside the clip (frames 0..{n - 1})")
            if p.box is not None:
                check_box(p.box, hw, f"{where}: box on frame {p.frame}")
            for x, y, _ in p.points:
                if not (0 <= x <= hw[1] - 1 and 0 <= y <= hw[0] - 1):
                    raise InputError(f"{where}: point ({x:g}, {y:g}) lies outside the {hw[1]}x{hw[0]} frame")
    cp = ClipPredictor(predictor, frames, opts.cache_mb << 20)
    engine = opts.engine
    if engine == "auto":
        engine = "memory" if getattr(predictor.model, "memory_trained", False) else "box"
    units = len(job.structures) * n
    all_masks, all_scores = [], []
    for si, (s, prompts) in enumerate(job.structures.items()):
        key_boxes: dict[int, list] = {}
        key_masks: dict[int, np.ndarray] = {}
        for p in prompts:  # points (with or without a box) are answered on the key frame itself
            if p.points:
                cp.set_image(frames[p.frame])
                r = cp.predict(boxes=[p.box] if p.box else None, points=[q[:2] for q in p.points],
                               labels=[q[2] for q in p.points])
                if not r.mask.any():
                    raise InputError(f"{s}, line {p.line}: the prompt on frame {p.frame} gives an empty mask")
                key_masks[p.frame] = r.mask | key_masks.get(p.frame, False)
                key_boxes.setdefault(p.frame, []).append(p.box or mask_box(r.mask))
            else:
                key_boxes.setdefault(p.frame, []).append(p.box)
        cp.scores = {}

        def tick(done, total, si=si):
            if progress is not None:
                progress(si * n + round(done * n / max(total, 1)), units)

        if engine == "memory":
            masks = propagate_memory(cp, frames, key_boxes, opts.direction, progress=tick, cancel=cancel)
        else:
            masks = propagate(cp, frames, key_boxes, opts.direction, margin=opts.margin, anchor=opts.anchor,
                              motion=opts.motion, progress=tick, cancel=cancel)
        for k, m in key_masks.items():  # key frames with points: the point-prompted answer, plus box-only objects
            box_only = [p.box for p in prompts if p.frame == k and not p.points]
            if box_only:
                cp.set_image(frames[k])
                m = m | cp.predict(boxes=box_only).mask
            masks[k] = m
        all_masks.append(masks)
        all_scores.append([min(cp.scores[f]) if cp.scores.get(f) else None for f in range(n)])
    return all_masks, all_scores, engine, cp.encoded


def frame_records(job: ClipJob, masks, scores) -> list[dict]:
    """Per frame and structure: area, box, predicted IoU and drift flags.

    Flags (computed here from the masks and the model's predicted IoU; the engine has no drift
    detector of its own): ``key`` (a prompted frame), ``absent`` (no mask: never reached or lost),
    ``low_score`` (predicted IoU < 0.5), ``area_jump`` (area changed by more than 1.5x from the
    previous frame), ``shift`` (centroid moved more than a quarter of the previous mask's size)."""
    rows = []
    for (s, prompts), per_frame, sc in zip(job.structures.items(), masks, scores):
        keys = {p.frame for p in prompts}
        prev = None
        for f, m in enumerate(per_frame):
            flags = ["key"] if f in keys else []
            row = {"frame": f, "structure": s, "area_px": 0, "x0": "", "y0": "", "x1": "", "y1": "",
                   "score": "" if sc[f] is None else round(sc[f], 4)}
            if m is None or not m.any():
                flags.append("absent")
                prev = None
            else:
                ys, xs = np.nonzero(m)
                area = len(xs)
                row.update(area_px=area, x0=int(xs.min()), y0=int(ys.min()), x1=int(xs.max()), y1=int(ys.max()))
                c = (xs.mean(), ys.mean())
                if sc[f] is not None and sc[f] < LOW_SCORE:
                    flags.append("low_score")
                if prev is not None:
                    pa, pc, psize = prev
                    if max(area / pa, pa / area) > AREA_JUMP:
                        flags.append("area_jump")
                    if np.hypot(c[0] - pc[0], c[1] - pc[1]) > SHIFT * psize:
                        flags.append("shift")
                prev = (area, c, max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
            row["flags"] = ";".join(flags)
            rows.append(row)
    return rows


def _warnings(job: ClipJob, rows: list[dict], n: int) -> list[str]:
    out = []
    for s in job.structures:
        mine = [r for r in rows if r["structure"] == s]
        for flag in ("absent", "low_score", "area_jump", "shift"):
            k = sum(flag in r["flags"].split(";") for r in mine)
            if k:
                out.append(f"{s}: {flag} on {k} of {n} frames")
    return out


def write_clip(dest: Path, job: ClipJob, frames, spacing, masks, rows, meta: dict, opts: Options,
               volume=None) -> None:
    """Everything for one clip into the (staging) folder ``dest``; ``clip.json`` last.  ``volume``
    (a :class:`~uniultra.data.slicer_nrrd.VolumeGeometry`): the ``.seg.nrrd`` on that volume's grid."""
    from uniultra.data.io import write_mask_png, write_seq_nrrd
    from uniultra.data.slicer_nrrd import write_label_sequence_nrrd, write_segmentation_nrrd

    hw = frames[0].shape[:2]
    names = list(job.structures)
    write_segmentation_nrrd(dest / f"{job.name}.seg.nrrd", masks, names, hw, spacing, volume=volume)
    write_label_sequence_nrrd(dest / f"{job.name}.seq.nrrd", masks, names, hw, spacing)
    if opts.save_frames:
        same = all(f.dtype == frames[0].dtype and f.shape == frames[0].shape for f in frames)
        if not same:  # one dtype, and grey frames as RGB when some are colour (a folder of mixed PNGs)
            rgb = any(f.ndim == 3 for f in frames)
            frames = [np.stack([f] * 3, -1) if rgb and f.ndim == 2 else f for f in frames]
        write_seq_nrrd(dest / f"{job.name}_frames.seq.nrrd", frames if same else [f.astype(np.float32) for f in frames],
                       spacing)
    if opts.png:
        empty = np.zeros(hw, bool)
        for s, per_frame in zip(names, masks):
            for f, m in enumerate(per_frame):
                write_mask_png(dest / "png" / s / f"frame_{f:04d}.png", empty if m is None else m)
    cols = ["frame", "structure", "area_px", "x0", "y0", "x1", "y1", "score", "flags"]
    with open(dest / "frames.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (dest / "clip.json").write_text(json.dumps(meta, indent=2, default=jsonable), encoding="utf-8")


# ============================================================================== the run
@dataclass
class RunResult:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    busy: int = 0  # claimed by another worker
    frames: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 0 if not self.failed else EXIT_FAILED_BASE + min(self.failed, 25)


def _state(out_dir: Path, sub: str) -> Path:
    d = out_dir / STATE_DIR / sub
    d.mkdir(parents=True, exist_ok=True)
    return d


def clip_status(out_dir: Path, job: ClipJob, fingerprint: str, since: float | None = None) -> str:
    """``done`` (complete output from these inputs; finished after ``since`` when given),
    ``changed`` (complete but from other inputs), ``failed`` or ``todo``."""
    meta = out_dir / job.name / "clip.json"
    if meta.is_file():
        try:
            m = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "todo"
        if m.get("fingerprint") != fingerprint:
            return "changed"
        if since is not None and m.get("finished", 0) < since:
            return "todo"
        return "done"
    if (out_dir / STATE_DIR / "failed" / f"{job.name}.json").is_file():
        return "failed"
    return "todo"


def _commit(stage: Path, final: Path) -> None:
    """Move the finished staging folder into place (replacing an older output)."""
    trash = None
    if final.exists():
        trash = final.parent / STATE_DIR / "trash" / f"{final.name}.{os.getpid()}.{time.time_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, trash)
    os.replace(stage, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


class _Progress:
    """Overall progress over clips and frames with an ETA: a tqdm bar on a terminal, else one line
    per clip (what a cluster job's log wants)."""

    def __init__(self, total_clips: int, enabled: bool | None = None):
        self.total = total_clips
        self.done_clips = 0
        self.frames = 0
        self.t0 = time.monotonic()
        self.work_s = 0.0
        self.bar = None
        tty = sys.stderr.isatty() if enabled is None else enabled
        if tty and total_clips:
            from tqdm import tqdm

            self.bar = tqdm(total=total_clips, unit="clip", desc="batch", leave=True,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total} clips [{elapsed}<{remaining}{postfix}]")

    def eta(self, fraction_in_clip: float = 0.0) -> float | None:
        done = self.done_clips + fraction_in_clip
        if done <= 0:
            return None
        return (time.monotonic() - self.t0) / done * (self.total - done)

    def update(self, fraction_in_clip: float) -> None:
        if self.bar is not None:
            self.bar.n = self.done_clips + fraction_in_clip
            el = time.monotonic() - self.t0
            self.bar.set_postfix_str(f"{self.frames} frames, {self.frames / el if el else 0:.1f} frames/s", refresh=False)
            self.bar.refresh()

    def clip_finished(self, name: str, frames: int, seconds: float, status: str) -> None:
        self.done_clips += 1
        self.frames += frames
        eta = self.eta()
        line = (f"[{self.done_clips}/{self.total}] {name}: {status}" + (f", {frames} frame{'s' if frames != 1 else ''} in {seconds:.1f} s" if frames else "")
                + (f"; ETA {_hms(eta)}" if eta is not None and self.done_clips < self.total else ""))
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.update(0.0)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _glob_root(pattern: str) -> Path:
    """The folder a glob pattern's files lie in (its part before the first wildcard)."""
    parts = Path(pattern).parts
    fixed = [q for q in parts[: next(i for i, q in enumerate(parts) if _is_glob(q))]]
    return Path(*fixed) if fixed else Path(".")


def check_outputs_spare_inputs(jobs: Sequence[ClipJob], out_dir) -> None:
    """Refuse, before any work, an ``out_dir`` whose per-clip folders (``<out_dir>/<name>``, replaced
    as a whole when a clip is labelled again) would hold or be an input: a clip, a folder of
    frames, or the manifest (e.g. ``uniultra batch clips/ --out-dir clips/`` with clips/a/ a folder
    of frames would have replaced the frames with their masks)."""
    out_dir = Path(out_dir).resolve()
    targets = {out_dir / j.name: j for j in jobs}
    inputs = []
    for j in jobs:
        inputs.append((_glob_root(j.clip) if _is_glob(j.clip) else Path(j.clip), j))
        if j.source:
            inputs.append((Path(j.source), j))
    for path, j in inputs:
        try:
            path = path.resolve()
        except (OSError, RuntimeError):
            continue
        for target, owner in targets.items():
            if path == target or target in path.parents:
                raise InputError(f"--out-dir {out_dir}: the output folder of clip {owner.name!r} ({target}) would "
                                 f"replace the input {path} (clip {j.name!r}); choose another --out-dir")


def run_batch(jobs: Sequence[ClipJob], out_dir, load_predictor: Callable[[str | None], object],
              opts: Options | None = None, shard: tuple[int, int] = (0, 1), redo: bool = False,
              events=None, progress: bool | None = None, cancel: Callable[[], bool] | None = None,
              worker: str | None = None) -> RunResult:
    """Label this worker's share of ``jobs`` into ``out_dir``; see the module doc.

    ``load_predictor(model)`` builds a predictor (``None`` = the default model); each model is
    loaded once, before any clip, so a bad model is refused up front.  Raises ``Cancelled`` (the
    clip in progress leaves nothing) if ``cancel()`` turns true or on SIGINT/SIGTERM in the caller."""
    opts = opts or Options()
    out_dir = Path(out_dir)
    check_outputs_spare_inputs(jobs, out_dir)
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    since = time.time() if redo else None
    mine = shard_jobs(jobs, *shard)
    fps = {j.name: j.fingerprint(opts.fingerprint()) for j in mine}
    todo = [j for j in mine if clip_status(out_dir, j, fps[j.name], since) != "done"]
    res = RunResult(skipped=len(mine) - len(todo))
    predictors = {}
    for j in todo:  # every model once, before any work (a bad model leaves nothing behind)
        if j.model not in predictors:
            try:
                predictors[j.model] = load_predictor(j.model)
            except InputError as e:
                where = f"{j.source} line {j.line}: " if j.model else ""
                raise InputError(f"{where}{e}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    emit_event(events, "run_start", worker=worker, clips=len(jobs), shard=list(shard), mine=len(mine),
               todo=len(todo), skipped=res.skipped, out_dir=str(out_dir))
    bar = _Progress(len(todo), progress)
    t_run = time.monotonic()
    try:
        for j in todo:
            status, frames, seconds = _run_one(j, out_dir, predictors[j.model], opts, fps[j.name], since, events,
                                               bar, cancel, worker, res)
            bar.clip_finished(j.name, frames, seconds, status)
            eta = bar.eta()
            emit_event(events, "run_progress", clips_done=bar.done_clips, clips_total=len(todo),
                       frames_done=bar.frames, eta_s=None if eta is None else round(eta, 1))
    finally:
        bar.close()
        res.seconds = time.monotonic() - t_run
    emit_event(events, "run_end", worker=worker, done=res.done, skipped=res.skipped, failed=res.failed,
               busy=res.busy, frames=res.frames, seconds=round(res.seconds, 2))
    return res


def _run_one(j: ClipJob, out_dir: Path, predictor, opts: Options, fp: str, since, events, bar: _Progress,
             cancel, worker: str, res: RunResult) -> tuple[str, int, float]:
    """Claim, label, write and commit one clip -> (status line, frames, seconds)."""
    claim = Claim(out_dir, j.name)
    if not claim.acquire():
        res.busy += 1
        emit_event(events, "clip_skipped", clip=j.name, reason="claimed by another worker")
        return "claimed by another worker", 0, 0.0
    stage = None
    try:
        if clip_status(out_dir, j, fp, since) == "done":  # finished by another worker meanwhile
            res.skipped += 1
            emit_event(events, "clip_skipped", clip=j.name, reason="done")
            return "done by another worker", 0, 0.0
        staging = _state(out_dir, "staging")
        for old in staging.glob(f"{glob_escape(j.name)}.*"):  # left by a killed worker; we hold the claim
            shutil.rmtree(old, ignore_errors=True)
        stage = staging / f"{j.name}.{os.getpid()}"
        stage.mkdir()
        t0 = time.monotonic()
        emit_event(events, "clip_start", clip=j.name, source=j.clip, structures=list(j.structures))
        try:
            frames, spacing, volume = read_clip(j)
            last = [0.0]

            def prog(done, total):
                bar.update(done / max(total, 1))
                now = time.monotonic()
                if now - last[0] > 1.0 or done == total:
                    last[0] = now
                    emit_event(events, "clip_progress", clip=j.name, done=done, total=total)

            masks, scores, engine, encoded = label_clip(predictor, frames, j, opts, prog, cancel)
            rows = frame_records(j, masks, scores)
            seconds = time.monotonic() - t0
            warnings = _warnings(j, rows, len(frames))
            meta = {"name": j.name, "clip": j.clip, "frames": len(frames), "height": frames[0].shape[0],
                    "width": frames[0].shape[1], "spacing": [float(f"{v:.6g}") for v in spacing],
                    "volume": None if volume is None else {"axis": volume.axis, "origin": list(volume.origin),
                                                           "steps": [list(v) for v in volume.steps]},
                    "fingerprint": fp,
                    "structures": [{"name": s, "label": i + 1, "segment_id": f"Segment_{i + 1}",
                                    "key_frames": sorted({p.frame for p in ps}),
                                    "frames_with_mask": sum(m is not None and bool(m.any()) for m in masks[i])}
                                   for i, (s, ps) in enumerate(j.structures.items())],
                    "model": j.model or "default", "engine": engine, "options": asdict(opts),
                    "encoded_frames": encoded, "seconds": round(seconds, 3), "warnings": warnings,
                    "worker": worker, "finished": time.time()}
            write_clip(stage, j, frames, spacing, masks, rows, meta, opts, volume)
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - one bad clip must not stop the others
            msg = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
            rec = {"name": j.name, "clip": j.clip, "line": j.line, "error": msg, "fingerprint": fp,
                   "worker": worker, "time": time.time()}
            from uniultra.data.io import atomic_write

            atomic_write(_state(out_dir, "failed") / f"{j.name}.json",
                         lambda tmp: Path(tmp).write_text(json.dumps(rec, indent=2), encoding="utf-8"))
            res.failed += 1
            res.failures.append((j.name, msg))
            emit_event(events, "clip_failed", clip=j.name, error=msg)
            return f"FAILED: {msg}", 0, 0.0
        _commit(stage, out_dir / j.name)
        stage = None
        (out_dir / STATE_DIR / "failed" / f"{j.name}.json").unlink(missing_ok=True)
        res.done += 1
        res.frames += len(frames)
        emit_event(events, "clip_done", clip=j.name, frames=len(frames), seconds=round(seconds, 3),
                   warnings=warnings, out=str(out_dir / j.name))
        return "done", len(frames), seconds
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        claim.release()


def glob_escape(s: str) -> str:
    import glob

    return glob.escape(s)


# ============================================================================== summary (merge)
SUMMARY_COLS = ["name", "clip", "status", "frames", "structures", "seconds", "warnings", "error", "worker"]


def write_summary(jobs: Sequence[ClipJob], out_dir, opts: Options | None = None) -> dict:
    """``summary.csv`` and ``summary.json`` over the whole manifest, from what every worker wrote
    (clip folders and failure records): safe to run at any time, from any worker."""
    from uniultra.data.io import atomic_write

    opts = opts or Options()
    out_dir = Path(out_dir)
    rows = []
    for j in jobs:
        status = clip_status(out_dir, j, j.fingerprint(opts.fingerprint()))
        row = {"name": j.name, "clip": j.clip, "status": status, "frames": "", "structures": ";".join(j.structures),
               "seconds": "", "warnings": "", "error": "", "worker": ""}
        if status in ("done", "changed"):
            m = json.loads((out_dir / j.name / "clip.json").read_text(encoding="utf-8"))
            row.update(frames=m["frames"], seconds=m["seconds"], warnings=" | ".join(m["warnings"]), worker=m["worker"])
            if status == "changed":
                row["status"] = "todo"
                row["error"] = "output is from other inputs (manifest row or options changed); rerun to redo"
        elif status == "failed":
            f = json.loads((out_dir / STATE_DIR / "failed" / f"{j.name}.json").read_text(encoding="utf-8"))
            row.update(error=f["error"], worker=f["worker"])
        rows.append(row)
    done = [r for r in rows if r["status"] == "done"]
    total = {"clips": len(rows), "done": len(done), "failed": sum(r["status"] == "failed" for r in rows),
             "todo": sum(r["status"] == "todo" for r in rows), "frames": sum(int(r["frames"]) for r in done),
             "seconds": round(sum(float(r["seconds"]) for r in done), 2)}

    def w_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=SUMMARY_COLS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(out_dir / "summary.csv", w_csv)
    atomic_write(out_dir / "summary.json",
                 lambda tmp: Path(tmp).write_text(json.dumps({"total": total, "clips": rows}, indent=2), encoding="utf-8"))
    return total


# ============================================================================== command line
def add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="label many cine clips from a manifest (resumable, shardable over workers)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", help="CSV or JSON Lines manifest, or a folder of clips (with --prompts)")
    p.add_argument("--prompts", help="with a folder of clips: CSV clip,frame,structure,x0,y0,x1,y1 (clip * = all)")
    p.add_argument("--out-dir", required=True, help="output folder (shared by all workers)")
    p.add_argument("--redo", action="store_true", help="label again clips that are already done")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="take share K of N (0-based); default: a SLURM array's task id when present, else all")
    p.add_argument("--summary", action="store_true", help="only merge what all workers wrote into summary.csv/json")
    p.add_argument("--png", action="store_true", help="also write png/<structure>/frame_NNNN.png masks (0/255)")
    p.add_argument("--save-frames", action="store_true", help="also write the frames as <name>_frames.seq.nrrd")
    p.add_argument("--events", default=None, metavar="FILE",
                   help="JSON-lines event stream (appended; '-' for stdout); e.g. events.%%a.jsonl in an array job")
    p.add_argument("--direction", default="both", choices=["both", "forward", "backward"])
    p.add_argument("--engine", default="auto", choices=["auto", "box", "memory"])
    p.add_argument("--margin", type=arg_number(0.0), default=0.05, help="box expansion between frames (fraction)")
    p.add_argument("--anchor", type=arg_number(0.0, 1.0), default=0.3, help="pull each frame's box size towards the key box's size")
    p.add_argument("--motion", default="ncc", choices=["ncc", "none"],
                   help="move each frame's box by the structure's motion (image correlation), or chain boxes in place")
    p.add_argument("--cache-mb", type=arg_number(0, integer=True), default=1024, help="memory for frame embeddings shared by structures")
    p.add_argument("--model", default=None, help="default model for rows without one (registry name or checkpoint)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (about 2x slower)")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    jobs = read_manifest(args.manifest, args.prompts)
    opts = Options(args.direction, args.engine, args.margin, args.anchor, args.png, args.save_frames, args.cache_mb,
                   motion=args.motion)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} is a file, not a folder")
    if args.summary:
        if not out_dir.is_dir():
            raise InputError(f"--out-dir {out_dir} does not exist: no worker has written there yet")
        t = write_summary(jobs, out_dir, opts)
        print(f"{t['done']} of {t['clips']} clips done, {t['failed']} failed, {t['todo']} to do "
              f"({t['frames']} frames); {out_dir / 'summary.csv'}")
        return 0 if t["done"] == t["clips"] else (EXIT_FAILED_BASE + min(t["failed"], 25) if t["failed"] else 1)
    shard = parse_shard(args.shard)
    default_model = args.model

    def load(model):
        from uniultra.inference import Predictor
        from uniultra.inference.predictor import DEFAULT_MODEL
        from uniultra.models import build_model

        return Predictor(build_model(model or default_model or DEFAULT_MODEL), args.device, tta=args.tta)

    events = None
    if args.events == "-":
        events = sys.stdout
    elif args.events:
        from uniultra.checks import check_events_file

        events_path = Path(args.events.replace("%a", str(shard[0])))
        check_events_file(events_path, "--events", inputs=[args.manifest, args.prompts])
        events = _LazyAppend(events_path)

    def on_term(signum, frame):
        raise Cancelled("terminated")

    old = signal.signal(signal.SIGTERM, on_term) if hasattr(signal, "SIGTERM") else None
    try:
        res = run_batch(jobs, out_dir, load, opts, shard, args.redo, events)
    except (Cancelled, KeyboardInterrupt):
        if out_dir.is_dir():
            write_summary(jobs, out_dir, opts)
        emit_event(events, "run_cancelled")
        print("uniultra: cancelled; finished clips are kept and the clip in progress left nothing: "
              "rerun the same command to resume", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if events is not None and events is not sys.stdout:
            events.close()
    total = write_summary(jobs, out_dir, opts)
    share = f" (share {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
    print(f"{res.done} clips labelled, {res.skipped} already done, {res.failed} failed"
          + (f", {res.busy} being labelled by another worker" if res.busy else "") + f"{share}; "
          f"{res.frames} frames in {res.seconds:.1f} s. Whole manifest: {total['done']}/{total['clips']} done. "
          f"Summary: {out_dir / 'summary.csv'}")
    for name, msg in res.failures:
        print(f"uniultra: clip {name} failed: {msg}", file=sys.stderr)
    return res.exit_status
