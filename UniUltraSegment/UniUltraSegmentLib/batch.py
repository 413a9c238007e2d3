"""Cine batch labeling from Slicer (no Qt): the `uniultra batch` runner in a subprocess.

The module panel is a thin adaptor over this file; the tests drive the same functions on the
real Slicer core (`slicer-core`) and launch the real command.

* :func:`write_scene_manifest` turns the cines in the scene into a batch manifest: every cine
  (a sequence browser whose master sequence holds image volumes) with a per-frame segmentation
  synchronised in its browser contributes its labelled frames as key frames -- each segment is a
  structure, each connected piece of a segment on a frame is one box prompt (its bounding box, in
  the frame's own voxel grid).  The frames are written next to the manifest as ``.seq.nrrd``
  (exactly what the scene holds; a file that did not change is left untouched, so a rerun
  resumes), and each browser remembers its clip file (node attribute) so results find it again.
* :class:`BatchSettings` checks a manifest (the engine's own reader: a bad line is refused
  before anything starts) and builds the ``uniultra batch`` command line.
* :class:`BatchRun` starts it in its own process group with its output going to a log file, and
  follows its JSON-lines events (``uniultra.events``; both files are the run's own, in
  ``OUT/.uniultra-slicer/runs/``) for progress, the current clip, the ETA and
  per-clip results.  No thread and no pipe: ``poll()`` only reads files and never blocks, so a
  QTimer on Slicer's main thread (which keeps the GIL, PythonQt) can call it.  Cancel sends
  SIGTERM: the runner drops the clip in progress (nothing half-written) and exits with 130; a
  process still alive after the grace period is killed at a later ``poll()``, which is safe
  because clips are committed by a rename.  Starting the same settings again resumes.
* :func:`load_result` loads one clip's result as a segmentation sequence in a cine's browser
  (the scene's cine it came from, else its saved frames or its source file): one segmentation per
  frame with the structures as named segments, saved back per frame while the user corrects it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uniultra.launch import EngineSubprocess

from .engine import _add_source_tree_engine
from .geometry import ijk_to_ras_of, volume_array
from .segments import oriented_image_from_array, segment_array
from .sequences import Cine

SLICER_DIR = ".uniultra-slicer"  # inside the output folder: manifest, clip frames, events, log
CLIP_ATTRIBUTE = "UniUltra.BatchClip"  # on a browser: the clip file its frames were written to
RESULT_ATTRIBUTE = "UniUltra.BatchResult"  # on a loaded result's segmentation sequence: the result folder
MIN_COMPONENT_PX = 4  # smaller pieces of a key-frame segment are specks, not prompts
DEVICES = ("auto", "cpu", "cuda", "mps")
EXIT_CANCELLED = 130
EXIT_FAILED_BASE = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9_ .+-]+")


def _engine():
    """The engine's torch-free batch module (manifest reader, clip status)."""
    _add_source_tree_engine()
    import uniultra.batch

    return uniultra.batch


# ================================================================================ scene -> manifest
@dataclass
class ScenePrompt:
    structure: str
    frame: int
    box: tuple[int, int, int, int]  # x0 y0 x1 y1 in the frame's voxel grid (I, J), inclusive


@dataclass
class SceneClip:
    name: str
    cine: Cine
    prompts: list[ScenePrompt] = field(default_factory=list)


@dataclass
class SceneManifest:
    path: Path  # the manifest written
    clips: list[SceneClip]
    skipped: list[tuple[str, str]]  # (cine name, why it has no prompt)


def safe_name(text: str) -> str:
    """A name the batch runner accepts as a file name (letters, digits, space, _ - . +)."""
    s = _UNSAFE.sub("_", text).strip(" .")
    s = s.replace("..", "_")
    if not s or not (s[0].isalnum() or s[0] == "_"):
        s = "_" + s
    return s


def scene_cines(ctx) -> list[Cine]:
    """Every cine in the scene: browsers whose master sequence holds image volumes (not labelmaps)."""
    out = []
    browsers = ctx.scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    for i in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(i)
        seq = browser.GetMasterSequenceNode()
        if seq is None or seq.GetNumberOfDataNodes() == 0:
            continue
        first = seq.GetNthDataNode(0)
        if not first.IsA("vtkMRMLScalarVolumeNode") or first.IsA("vtkMRMLLabelMapVolumeNode"):
            continue  # vtkMRMLVectorVolumeNode is a scalar volume subclass: colour cines are kept
        proxy = browser.GetProxyNode(seq)
        if proxy is not None:
            out.append(Cine(browser, seq, proxy))
    return out


def segmentation_sequences(cine: Cine, include_results: bool = False) -> list:
    """The segmentation sequences synchronised in the cine's browser (a loaded batch result only
    with ``include_results``)."""
    import vtk

    coll = vtk.vtkCollection()
    cine.browser.GetSynchronizedSequenceNodes(coll, True)
    out = []
    for i in range(coll.GetNumberOfItems()):
        seq = coll.GetItemAsObject(i)
        if seq.GetNumberOfDataNodes() == 0 or not seq.GetNthDataNode(0).IsA("vtkMRMLSegmentationNode"):
            continue
        if not include_results and seq.GetAttribute(RESULT_ATTRIBUTE):
            continue
        out.append(seq)
    return out


def _component_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """One box per connected piece (8-connected) of a (J, I) mask, pieces under MIN_COMPONENT_PX dropped."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), int))
    boxes = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None or int((lab[sl] == k).sum()) < MIN_COMPONENT_PX:
            continue
        boxes.append((sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1))
    return sorted(boxes)


def cine_prompts(cine: Cine) -> list[ScenePrompt]:
    """The key-frame prompts of one cine: every labelled frame of every segment of its per-frame
    segmentation(s), one box per connected piece, in the frame's voxel grid (what the batch
    runner reads from the written frames)."""
    prompts = []
    for seg_seq in segmentation_sequences(cine):
        for f in range(cine.num_frames):
            item = seg_seq.GetDataNodeAtValue(cine.sequence.GetNthIndexValue(f))
            if item is None:
                continue
            segmentation = item.GetSegmentation()
            volume = cine.sequence.GetNthDataNode(f)
            for s in range(segmentation.GetNumberOfSegments()):
                sid = segmentation.GetNthSegmentID(s)
                arr = segment_array(item, sid, volume)
                if arr.shape[0] != 1:
                    raise ValueError(f"'{cine.proxy.GetName()}' frame {f} has {arr.shape[0]} slices: "
                                     "batch labeling takes cines of single-slice frames")
                name = safe_name(segmentation.GetSegment(sid).GetName())
                prompts.extend(ScenePrompt(name, f, b) for b in _component_boxes(arr[0] > 0))
    return prompts


def _same_file(a: Path, b: Path) -> bool:
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _write_frames(cine: Cine, path: Path) -> bool:
    """The cine's frames as ``path`` (.seq.nrrd, Slicer's own writer); an identical existing file is
    left untouched (its size and path make the batch runner's fingerprint, so a rerun resumes).
    Returns True when the file was (re)written."""
    import slicer

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".uniultra-", suffix=".seq.nrrd", dir=str(path.parent))
    os.close(fd)
    try:
        storage = slicer.vtkMRMLVolumeSequenceStorageNode()
        storage.SetFileName(tmp)
        if not storage.WriteData(cine.sequence):
            raise OSError(f"could not write the frames of '{cine.proxy.GetName()}' to {path}")
        if _same_file(Path(tmp), path):
            return False
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_scene_manifest(ctx, out_dir: str | os.PathLike, cines: Sequence[Cine] | None = None) -> SceneManifest:
    """Write ``<out_dir>/.uniultra-slicer/manifest.csv`` (and each cine's frames) from the scene.

    Every prompt is collected and checked before anything is written; a cine without a labelled
    frame is listed in ``skipped``.  Raises ValueError (one sentence, nothing written) when no cine
    has a prompt or a name cannot be made unique."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file: choose a folder")
    cines = scene_cines(ctx) if cines is None else list(cines)
    if not cines:
        raise ValueError("the scene holds no cine: load an ultrasound cine (DICOM or .seq.nrrd) first")
    clips: list[SceneClip] = []
    skipped: list[tuple[str, str]] = []
    used: set[str] = set()
    for cine in cines:
        label = cine.proxy.GetName()
        if not segmentation_sequences(cine):
            skipped.append((label, "no per-frame segmentation: label a key frame with the UniUltra effect"))
            continue
        prompts = cine_prompts(cine)
        if not prompts:
            skipped.append((label, "its segmentation is empty on every frame: label a key frame"))
            continue
        base = safe_name(label)
        name, k = base, 2
        while name.lower() in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name.lower())
        clips.append(SceneClip(name, cine, prompts))
    if not clips:
        why = "; ".join(f"'{n}': {w}" for n, w in skipped)
        raise ValueError(f"no cine in the scene has a labelled key frame ({why})")
    state = out_dir / SLICER_DIR
    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    w.writerow(["name", "clip", "frame", "structure", "x0", "y0", "x1", "y1"])
    for c in clips:
        for p in c.prompts:
            w.writerow([c.name, f"clips/{c.name}.seq.nrrd", p.frame, p.structure, *p.box])
    created = []
    try:
        for c in clips:
            path = state / "clips" / f"{c.name}.seq.nrrd"
            existed = path.exists()
            if _write_frames(c.cine, path) and not existed:
                created.append(path)
        from uniultra.fileio import atomic_write_text

        manifest = state / "manifest.csv"
        atomic_write_text(manifest, rows.getvalue())
    except BaseException:
        for p in created:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    for c in clips:
        c.cine.browser.SetAttribute(CLIP_ATTRIBUTE, str((state / "clips" / f"{c.name}.seq.nrrd").resolve()))
    return SceneManifest(manifest, clips, skipped)


# ================================================================================ settings and run
@dataclass
class BatchSettings:
    """What the panel chose; becomes ``uniultra batch MANIFEST --out-dir OUT ...``."""

    manifest: str
    out_dir: str
    prompts: str | None = None  # with a folder of clips
    model: str | None = None  # registry name or checkpoint; None: the engine's default
    device: str = "auto"
    png: bool = False
    save_frames: bool = True  # the frames next to the labels, so a result loads without its source
    redo: bool = False

    def check(self) -> list:
        """The manifest's clips (the engine's reader and checks); ValueError naming the problem."""
        engine = _engine()
        from uniultra.errors import InputError

        if not self.manifest:
            raise ValueError("no manifest: write one from the scene or choose a CSV / JSON Lines file")
        if not self.out_dir:
            raise ValueError("no output folder: choose where the labels go")
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"output folder {out} is a file: choose a folder")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device '{self.device}' is not one of {', '.join(DEVICES)}")
        if self.model and self.model.endswith((".pt", ".pth", ".ckpt")) and not Path(self.model).is_file():
            raise ValueError(f"model checkpoint '{self.model}' does not exist: choose the file again")
        try:
            return engine.read_manifest(self.manifest, self.prompts or None)
        except InputError as e:
            raise ValueError(str(e)) from None

    def args(self, events: str | os.PathLike) -> list[str]:
        """The command's arguments; ``events``: the JSON-lines file this run appends to."""
        a = ["batch", str(self.manifest), "--out-dir", str(self.out_dir), "--device", self.device,
             "--events", str(events)]
        if self.prompts:
            a += ["--prompts", str(self.prompts)]
        if self.model:
            a += ["--model", str(self.model)]
        if self.png:
            a.append("--png")
        if self.save_frames:
            a.append("--save-frames")
        if self.redo:
            a.append("--redo")
        return a

    def run_files(self) -> tuple[Path, Path]:
        """(events, log) of a new run: its own files, so a worker left running by an earlier
        session that writes to the same output folder never mixes into this run's progress."""
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 1000000:06d}"
        d = Path(self.out_dir) / SLICER_DIR / "runs"
        return d / f"{stamp}.events.jsonl", d / f"{stamp}.log"


def progress_of(jobs: Sequence, out_dir: str | os.PathLike) -> dict:
    """How far the manifest is in ``out_dir``: {"clips", "done", "failed", "todo"} (what a rerun
    would skip: complete outputs made from the same rows with the panel's options)."""
    eng = _engine()
    opts = eng.Options().fingerprint()
    counts = {"clips": len(jobs), "done": 0, "failed": 0, "todo": 0}
    for j in jobs:
        st = eng.clip_status(Path(out_dir), j, j.fingerprint(opts)) if Path(out_dir).is_dir() else "todo"
        counts["done" if st == "done" else "failed" if st == "failed" else "todo"] += 1
    return counts


class BatchRun(EngineSubprocess):
    """One ``uniultra batch`` subprocess; ``poll()`` from a timer, ``wait()`` in scripts and tests.

    The launch, ``running``, ``returncode`` and signalling are
    :class:`uniultra.launch.EngineSubprocess`'s (shared with the Train module's runner); this class
    sends the output to the run's log file and follows the run through its files only."""

    what = "this batch run"

    def __init__(self, settings: BatchSettings, python: str | None = None, env: dict | None = None):
        self.jobs = settings.check()
        self.settings = settings
        self.events_path, self.log_path = settings.run_files()
        super().__init__(settings.args(self.events_path), python, env)
        self.events: list[dict] = []
        self.total: int | None = None  # clips this run labels (the rest were done already)
        self.skipped = 0
        self.done = 0
        self.failed = 0
        self.frames = 0
        self.current: str | None = None
        self.current_fraction = 0.0
        self.eta_s: float | None = None
        self._cancel_at: float | None = None
        self._grace_s = 30.0
        self._ev_offset = 0
        self._log_offset = 0
        self._log = None

    def _open_output(self):
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        head = self.banner.encode()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in _launched, right after the launch)
        self._log.write(head)
        self._log.flush()
        self._log_offset = len(head)
        return self._log

    def _launched(self) -> None:
        self._close()  # the child has its own copy of the log file

    # ---------------------------------------------------------------- following it
    def poll(self) -> list[dict]:
        """New events since the last call (state updated from them); never blocks."""
        from uniultra.events import read_events

        new, self._ev_offset = read_events(self.events_path, self._ev_offset)
        for ev in new:
            self._apply(ev)
        self.events.extend(new)
        self._read_log()
        if self.cancel_requested and self.running and self._cancel_at is not None \
                and time.monotonic() - self._cancel_at > self._grace_s:
            self._signal(signal.SIGKILL if os.name != "nt" else signal.SIGTERM)  # safe: clips commit by rename
        return new

    def _apply(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "run_start":
            self.total, self.skipped = int(ev.get("todo", 0)), int(ev.get("skipped", 0))
        elif kind == "clip_start":
            self.current, self.current_fraction = ev.get("clip"), 0.0
        elif kind == "clip_progress" and ev.get("clip") == self.current:
            self.current_fraction = float(ev.get("done", 0)) / max(float(ev.get("total", 1)), 1.0)
        elif kind == "clip_done":
            self.done += 1
            self.frames += int(ev.get("frames", 0))
            self.current, self.current_fraction = None, 0.0
        elif kind == "clip_failed":
            self.failed += 1
            self.current, self.current_fraction = None, 0.0
        elif kind == "run_progress":
            self.eta_s = ev.get("eta_s")

    def _read_log(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except OSError:
            return
        end = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if end < 0:
            return
        self._log_offset += end + 1
        for raw in re.split(rb"\r\n|\r|\n", data[: end + 1]):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.lines.append(line)

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def fraction(self) -> float:
        """Overall progress of this run in [0, 1] (clips, plus the share of the current one)."""
        if not self.total:
            return 1.0 if self.returncode is not None else 0.0
        return min(1.0, (self.done + self.failed + self.current_fraction) / self.total)

    def status_text(self) -> str:
        """One line for the panel."""
        st = self.status
        if st == "running":
            if self.total is None:
                return "Starting (loading the model)..."
            eta = f", about {_hms(self.eta_s)} left" if self.eta_s else ""
            now = f"; labelling '{self.current}' ({self.current_fraction:.0%})" if self.current else ""
            skip = f" ({self.skipped} done before)" if self.skipped else ""
            return f"{self.done + self.failed} of {self.total} clips{skip}{now}{eta}"
        if st == "cancelled":
            return (f"Cancelled after {self.done} clips: finished clips are kept, the clip in progress left "
                    "nothing. Run again to resume.")
        if st == "error":
            return f"Error: {self.error_message()}"
        done = f"{self.done} clips labelled ({self.frames} frames)" + (f", {self.skipped} done before" if self.skipped else "")
        if st == "finished with failures":
            return f"{done}; {self.failed} failed (see the results table)"
        return done if st == "finished" else st

    @property
    def status(self) -> str:
        """"not started", "running", "finished", "finished with failures", "cancelled" or "error"."""
        rc = self.returncode
        if self.proc is None:
            return "not started"
        if rc is None:
            return "running"
        if rc == EXIT_CANCELLED or self.cancel_requested:
            return "cancelled"
        if rc == 0:
            return "finished"
        if EXIT_FAILED_BASE < rc <= EXIT_FAILED_BASE + 25:
            return "finished with failures"
        return "error"

    def error_message(self) -> str:
        """The engine's one-line error (``uniultra: error: ...``), or the last lines of its output."""
        self._read_log()
        return super().error_message()

    # ---------------------------------------------------------------- cancel
    def cancel(self, grace_s: float = 30.0) -> None:
        """Ask the batch to stop (SIGTERM: the clip in progress is dropped, finished clips stay);
        a later ``poll()`` kills whatever is still running after ``grace_s`` seconds."""
        if self._interrupt(signal.SIGTERM):
            self._cancel_at, self._grace_s = time.monotonic(), grace_s

    # ---------------------------------------------------------------- results
    def results(self) -> list[dict]:
        return read_results(self.settings.out_dir, self.jobs)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def read_results(out_dir: str | os.PathLike, jobs: Sequence | None = None) -> list[dict]:
    """One row per clip: {"name", "status", "frames", "structures", "warnings", "error", "folder"}.

    With the manifest's ``jobs``: every clip of it (done, failed or todo, as a rerun would see it);
    without: every complete result folder in ``out_dir``."""
    out = Path(out_dir)
    rows = []
    if jobs is None:
        if not out.is_dir():
            return []
        for meta in sorted(out.glob("*/clip.json")):
            rows.append(_row(meta.parent.name, "done", meta))
        return rows
    eng = _engine()
    opts = eng.Options().fingerprint()
    for j in jobs:
        st = eng.clip_status(out, j, j.fingerprint(opts)) if out.is_dir() else "todo"
        row = _row(j.name, st, out / j.name / "clip.json" if st in ("done", "changed") else None)
        if st == "changed":
            row["status"] = "todo"
            row["error"] = "made from other inputs (the manifest row changed): run again to redo"
        elif st == "failed":
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads((out / eng.STATE_DIR / "failed" / f"{j.name}.json").read_text(encoding="utf-8"))
                row["error"] = str(rec.get("error", ""))
        rows.append(row)
    return rows


def _row(name: str, status: str, meta_path: Path | None) -> dict:
    row = {"name": name, "status": status, "frames": None, "structures": [], "warnings": [], "error": "",
           "folder": str(meta_path.parent) if meta_path is not None else ""}
    if meta_path is not None:
        try:
            m = json.loads(meta_path.read_text(encoding="utf-8"))
            row.update(frames=m.get("frames"), structures=[s["name"] for s in m.get("structures", [])],
                       warnings=list(m.get("warnings", [])))
        except (OSError, ValueError, KeyError, TypeError):
            row.update(status="unreadable", error=f"{meta_path} cannot be read")
    return row


def flagged_frames(folder: str | os.PathLike) -> dict[str, list[int]]:
    """Frames to look at first when reviewing a result: per structure, the frames whose
    ``frames.csv`` row carries a flag other than ``key`` (absent, low_score, area_jump, shift)."""
    out: dict[str, list[int]] = {}
    try:
        with open(Path(folder) / "frames.csv", newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                flags = {x for x in (r.get("flags") or "").split(";") if x} - {"key"}
                if flags:
                    out.setdefault(r["structure"], []).append(int(r["frame"]))
    except (OSError, KeyError, ValueError):
        return {}
    return out


# ================================================================================ result -> scene
@dataclass
class LoadedResult:
    cine: Cine
    segmentation: object  # the proxy segmentation node (edit it in the Segment Editor)
    sequence: object  # its segmentation sequence (one item per frame)
    segment_ids: dict[str, str]  # structure name -> segment ID (the same in every frame)


def _nrrd_fields(path: Path) -> dict[str, str]:
    fields = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break
            for sep in (":=", ": "):
                if sep in line:
                    k, v = line.split(sep, 1)
                    fields[k] = v
                    break
    return fields


def _read_label_sequence(path: Path) -> list[np.ndarray]:
    """The batch's labelmap sequence as (J, I) uint8 arrays, read by Slicer's own storage node
    (in a scratch scene, so nothing of it lands in the user's)."""
    import slicer

    scratch = slicer.vtkMRMLScene()
    seq = slicer.vtkMRMLSequenceNode()
    scratch.AddNode(seq)
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    scratch.AddNode(storage)
    storage.SetFileName(str(path))
    if not storage.ReadData(seq) or seq.GetNumberOfDataNodes() == 0:
        raise ValueError(f"{path} could not be read as a labelmap sequence")
    out = []
    for i in range(seq.GetNumberOfDataNodes()):
        arr = volume_array(seq.GetNthDataNode(i))
        out.append(np.array(arr[0] if arr.ndim == 3 else arr, np.uint8))
    scratch.Clear(1)
    return out


def find_result_cine(ctx, clip: str) -> Cine | None:
    """The scene's cine whose frames were written to ``clip`` by :func:`write_scene_manifest`."""
    try:
        target = str(Path(clip).resolve())
    except OSError:
        return None
    for cine in scene_cines(ctx):
        if cine.browser.GetAttribute(CLIP_ATTRIBUTE) == target:
            return cine
    return None


def _cine_for_result(ctx, folder: Path, meta: dict) -> Cine:
    """The cine a result belongs to: the scene's, else its saved frames, else its source clip."""
    from .sequences import create_cine, load_dicom_cine, load_sequence_file

    cine = find_result_cine(ctx, meta.get("clip", ""))
    if cine is not None:
        return cine
    name = meta["name"]
    frames_file = folder / f"{name}_frames.seq.nrrd"
    if frames_file.is_file():
        return load_sequence_file(ctx, frames_file, name)
    src = Path(meta.get("clip", ""))
    low = src.name.lower()
    if src.is_file() and low.endswith((".seq.nrrd", ".nrrd", ".nhdr")):
        return load_sequence_file(ctx, src, name)
    if src.is_file() and low.endswith((".dcm", ".dicom")):
        return load_dicom_cine(ctx, src, name)
    if src.is_dir():
        from PIL import Image

        eng = _engine()
        files = sorted((f for f in src.iterdir() if f.suffix.lower() in eng.FRAME_EXT and not f.name.startswith(".")),
                       key=lambda f: eng._natural(f.name))
        if files:
            frames = [np.asarray(Image.open(f)) for f in files]
            return create_cine(ctx, frames, tuple(meta.get("spacing") or (1.0, 1.0)), 0.0, name)
    raise ValueError(f"the frames of '{name}' are not in the scene and cannot be loaded from {src}: "
                     "load the cine first, or label with 'Save frames' on")


def load_result(ctx, folder: str | os.PathLike, cine: Cine | None = None, name: str | None = None) -> LoadedResult:
    """Load one clip's result folder (``<out>/<name>``) as a segmentation sequence in ``cine``'s
    browser (default: the cine it was labelled from, see :func:`_cine_for_result`).

    A new segmentation node (never one the user made) gets one item per frame, the structures as
    segments with their names and colours, and is synchronised in the browser with "save changes"
    on, so corrections in the Segment Editor are stored into the frame shown.  The masks are laid
    on each frame's own voxel grid.  ValueError (one sentence, nothing added to the scene) when the
    folder is not a finished result or does not fit the cine."""
    import slicer

    folder = Path(folder)
    meta_path = folder / "clip.json"
    if not meta_path.is_file():
        raise ValueError(f"{folder} holds no finished clip (no clip.json): label it first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        structures = [(s["name"], int(s["label"]), s.get("segment_id") or f"Segment_{s['label']}")
                      for s in meta["structures"]]
        clip_name = meta["name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path} cannot be read ({e})") from None
    labels_file = folder / f"{clip_name}.seq.nrrd"
    if not labels_file.is_file():
        raise ValueError(f"{labels_file} is missing: label the clip again")
    labels = _read_label_sequence(labels_file)
    colours = {}
    fields = _nrrd_fields(labels_file)
    for i in range(len(structures)):
        with contextlib.suppress(KeyError, ValueError):
            colours[fields[f"Segment{i}_Name"]] = [float(v) for v in fields[f"Segment{i}_Color"].split()]
    before = _node_ids(ctx.scene)
    try:
        if cine is None:
            cine = _cine_for_result(ctx, folder, meta)
        n = cine.num_frames
        if len(labels) != n:
            raise ValueError(f"'{clip_name}' has {len(labels)} labelled frames, cine '{cine.proxy.GetName()}' has {n}")
        for f in range(n):
            shape = volume_array(cine.sequence.GetNthDataNode(f)).shape
            if shape[0] != 1 or tuple(shape[1:3]) != labels[f].shape:
                raise ValueError(f"'{clip_name}' frame {f} is {labels[f].shape[1]}x{labels[f].shape[0]}, cine "
                                 f"'{cine.proxy.GetName()}' frame {f} is {shape[2]}x{shape[1]} with {shape[0]} slice(s)")
    except BaseException:
        _remove_nodes_since(ctx.scene, before)  # a cine loaded for this result goes again
        raise
    scene = ctx.scene
    seg_node = slicer.vtkMRMLSegmentationNode()
    seg_node.SetName(scene.GenerateUniqueName(f"{clip_name} batch labels"))
    scene.AddNode(seg_node)
    seg_node.CreateDefaultDisplayNodes()
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(cine.proxy)
    ids = {}
    for name_, _label, sid in structures:
        colour = colours.get(name_, [0.5, 0.5, 0.5])
        seg_node.GetSegmentation().AddEmptySegment(sid, name_, colour)
        ids[name_] = sid
    seg_seq = slicer.vtkMRMLSequenceNode()
    seg_seq.SetName(scene.GenerateUniqueName(f"{clip_name} batch labels sequence"))
    seg_seq.SetIndexName(cine.sequence.GetIndexName())
    seg_seq.SetIndexUnit(cine.sequence.GetIndexUnit())
    seg_seq.SetAttribute(RESULT_ATTRIBUTE, str(folder.resolve()))  # (the proxy's attributes follow the items)
    scene.AddNode(seg_seq)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for f in range(n):
        vol = cine.sequence.GetNthDataNode(f)
        item = slicer.vtkMRMLSegmentationNode()
        item.GetSegmentation().DeepCopy(seg_node.GetSegmentation())
        item.SetReferenceImageGeometryParameterFromVolumeNode(vol)
        ijk = ijk_to_ras_of(vol)
        for _name, label, sid in structures:
            m = labels[f] == label
            if m.any():
                logic.SetBinaryLabelmapToSegment(oriented_image_from_array(m[None].astype(np.uint8), ijk), item, sid,
                                                 logic.MODE_REPLACE)
        seg_seq.SetDataNodeAtValue(item, cine.sequence.GetNthIndexValue(f))
    ctx.sequences_logic.AddSynchronizedNode(seg_seq, seg_node, cine.browser)
    cine.browser.SetSaveChanges(seg_seq, True)
    ctx.sequences_logic.UpdateProxyNodesFromSequences(cine.browser)
    return LoadedResult(cine, seg_node, seg_seq, ids)


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _remove_nodes_since(scene, before: set[str]) -> None:
    for nid in sorted(_node_ids(scene) - before, reverse=True):
        node = scene.GetNodeByID(nid)
        if node is not None:
            scene.RemoveNode(node)
