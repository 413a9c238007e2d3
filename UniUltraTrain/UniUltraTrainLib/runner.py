"""Train runner (no Qt): the `uniultra train` / `uniultra distill` command line, run as a subprocess.

Training runs in its own process (`PythonSlicer` inside Slicer, any Python with the engine
outside) so the application stays responsive, a crash cannot take the scene with it, and
Cancel can always stop it.  The runner

* writes what the panel chose (base model, adaptation method, epochs, lr, ...) as a recipe file,
  ``<out>/recipe.yaml``, and launches ``uniultra train --config <out>/recipe.yaml`` (defaults and
  checks are the engine's: :mod:`uniultra.training.config`, imported without torch);
* starts it in its own process group and streams its output line by line for the log;
* follows the trainer's machine-readable events, ``<out>/events.jsonl`` (step, validation,
  checkpoint, finished/cancelled/failed: :mod:`uniultra.events`), for progress and the latest
  validation Dice, and reads ``metrics.csv`` (step, epoch, lr, train_loss, val_dice,
  val_<dataset>..., img_per_s, elapsed_s) for the live chart, ``summary.json`` at the end,
  ``last.pt`` for Resume;
* cancels by sending SIGINT to the group (the trainer stops after the current step and saves its
  resume state), escalating to terminate/kill after a grace period; ``best.pt`` stays;
* evaluates models on the validation split with ``uniultra evaluate --json`` (Dice next to the
  ellipse-in-box and filled-box baselines, seconds per image) and registers a trained model in
  the engine's user registry with its provenance.

Nothing here imports torch: the engine is reached through its command line, its torch-free
configuration and event modules, and registration (`uniultra.models.registry`, imported lazily).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import queue
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# torch-free; importable once UniUltraTrainLib is (its __init__ finds a source checkout's engine)
from uniultra.launch import EngineSubprocess, command, engine_env, engine_root, python_executable  # noqa: F401
from uniultra.registry import DEFAULT_MODEL as DEFAULT_BASE  # the bundled default

# the bases the Train panel offers first (the user's own models follow)
BASES = (DEFAULT_BASE, "sam2.1-hiera-tiny", "sam2.1-hiera-small", "sam2-hiera-tiny")
DEFAULT_STUDENT = "uniultra-student-e16"
METHODS = ("ch-adapter", "lora", "adapter", "cnn-branch", "full", "decoder")
STUDENTS = ("uniultra-student-e8", "uniultra-student-e16", "uniultra-student-e24", "uniultra-student-e32",
            "uniultra-student-e48")
DEVICES = ("auto", "cpu", "cuda", "mps")



# ------------------------------------------------------------------------------------ options
@dataclass
class _RunOptions:
    """The options `uniultra train` and `uniultra distill` share; None = the engine's default."""

    data: list[str]
    out: str
    epochs: int | None = None
    steps: int | None = None
    lr: float | None = None
    image_size: int | None = None  # default: the base model's
    batch_size: int | None = None
    device: str = "auto"
    seed: int | None = None
    register: str | None = None
    description: str = ""
    resume: bool = False
    extra_args: list[str] = field(default_factory=list)

    def _check_common(self, base: str) -> None:
        """Raise ValueError naming the option and what to do; ``base`` is the model trained from.
        Values are checked by the engine's configuration (the same check as the command line's)."""
        if not self.data:
            raise ValueError("no training data: export a dataset first (or choose a dataset folder)")
        for d in self.data:
            if not Path(d).is_dir():
                raise ValueError(f"training data folder '{d}' does not exist: export the dataset first")
        if not self.out:
            raise ValueError("no output folder: choose where the trained model goes")
        base = base.strip()
        if not base:
            raise ValueError("no base model: choose the bundled default, a checkpoint file or a trained model")
        if base.endswith((".pt", ".pth", ".ckpt")) and not Path(base).is_file():
            raise ValueError(f"base checkpoint '{base}' does not exist: choose the file again")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device '{self.device}' is not one of {', '.join(DEVICES)}")
        self.config()  # the engine's checks (learning rate, image size, epochs, model name, ...)

    def recipe(self) -> dict:
        """The options the panel set, as recipe keys (the engine supplies every other default)."""
        r = {"data": [str(d) for d in self.data], "out": str(self.out), "device": self.device,
             "progress_bar": False}
        for key in ("epochs", "steps", "lr", "image_size", "batch_size", "seed", "register"):
            if getattr(self, key) is not None:
                r[key] = getattr(self, key)
        if self.description:
            r["description"] = self.description
        return r

    def config(self):
        """The engine's configuration object for :meth:`recipe` (raises ValueError when invalid)."""
        from uniultra.training.config import DistillConfig, TrainConfig

        cls = DistillConfig if isinstance(self, DistillOptions) else TrainConfig
        return cls(**self.recipe())

    def write_recipe(self) -> Path:
        """Write ``<out>/recipe.yaml`` (JSON, which YAML reads) and return its path."""
        path = recipe_path(self.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "# written by the UniUltra Train module; run with `uniultra train|distill --config` this file\n"
        path.write_text(text + json.dumps(self.recipe(), indent=2) + "\n", encoding="utf-8")
        return path


@dataclass
class TrainOptions(_RunOptions):
    """What the Train panel offers; becomes a `uniultra train` recipe."""

    base: str = DEFAULT_BASE  # registry name, SAM2/SAM2.1 checkpoint file, earlier trained model
    method: str = "ch-adapter"
    random_init: bool = False  # an architecture name trains from random weights anyway

    def check(self) -> None:
        """Raise ValueError naming the option and what to do."""
        if self.method not in METHODS:
            raise ValueError(f"adaptation method '{self.method}' is not one of {', '.join(METHODS)}")
        self._check_common(self.base)

    def recipe(self) -> dict:
        r = {"model": self.base.strip(), "peft": self.method, **super().recipe()}
        if self.random_init:
            r["random_init"] = True
        return r


@dataclass
class DistillOptions(_RunOptions):
    """What the Distill panel offers; becomes a `uniultra distill` recipe."""

    teacher: str = DEFAULT_BASE
    student: str = DEFAULT_STUDENT

    def check(self) -> None:
        if not self.student:
            raise ValueError("no student: choose a student size (e.g. uniultra-student-e16)")
        self._check_common(self.teacher)

    def recipe(self) -> dict:
        return {"teacher": self.teacher.strip(), "student": self.student, **super().recipe()}


def recipe_path(out: str | os.PathLike) -> Path:
    return Path(out) / "recipe.yaml"


def _args(subcommand: str, o: _RunOptions) -> list[str]:
    args = [subcommand, "--config", str(recipe_path(o.out))]
    if o.resume:
        args.append("--resume")
    return args + list(o.extra_args)


def train_args(o: TrainOptions) -> list[str]:
    """`uniultra train --config <out>/recipe.yaml ...` arguments (without the program); the
    recipe itself is written by :meth:`TrainOptions.write_recipe` (TrainingRun does it)."""
    return _args("train", o)


def distill_args(o: DistillOptions) -> list[str]:
    """`uniultra distill --config <out>/recipe.yaml ...` arguments (without the program)."""
    return _args("distill", o)


def evaluate_args(model: str, data: str, split: str = "val", device: str = "auto", seed: int = 0,
                  limit: int | None = None) -> list[str]:
    args = ["evaluate", "--model", model, "--data", str(data), "--split", split, "--device", device,
            "--seed", str(seed), "--json"]
    if limit is not None:
        args += ["--limit", str(int(limit))]
    return args


# ------------------------------------------------------------------------------------ process
# How the engine is started (PythonSlicer inside Slicer, PYTHONPATH, unbuffered output, its own
# process group) has one copy, uniultra/launch.py, shared with the Segment module's batch runner;
# its names are imported above for callers of the runner.
class EngineProcess(EngineSubprocess):
    """One `uniultra ...` subprocess with streamed output and a cancel that leaves files usable.

    The launch, `running`, `returncode` and signalling are :class:`uniultra.launch.EngineSubprocess`'s
    (shared with the Segment module's batch runner); this class follows the output through a pipe
    read by a thread.  `poll()` (call it from a timer on the main thread) returns the new log lines
    since the last call.  Everything the process printed is in `lines`, and also in `log_path` when
    given.  A training run (:class:`TrainingRun`) also follows the run's events file: `progress`
    (done, total) and `last_val` (step, val Dice) come from there, never from printed text.
    """

    def __init__(self, args: Sequence[str], python: str | None = None, env: dict | None = None,
                 cwd: str | None = None, log_path: str | os.PathLike | None = None):
        super().__init__(args, python, env, cwd)
        self.log_path = Path(log_path) if log_path else None
        self.progress: tuple[int, int] | None = None
        self.last_val: tuple[int, float] | None = None
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._log = None

    # -------------------------------------------------------------- life cycle
    def _open_output(self) -> int:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in _finish)
            self._log.write(self.banner)
        return subprocess.PIPE

    def _launched(self) -> None:
        if self.proc is None:  # the launch failed
            self._finish()
            return
        self._reader = threading.Thread(target=self._read, name="uniultra-engine-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            parts = re.split(rb"\r\n|\r|\n", buf)
            buf = parts.pop()
            for p in parts:
                self._queue.put(p.decode("utf-8", "replace"))
        if buf:
            self._queue.put(buf.decode("utf-8", "replace"))
        self._queue.put(None)  # end of output

    def poll(self) -> list[str]:
        """New log lines; a training run also updates `progress` and `last_val` from its events."""
        if self._reader is not None and self._reader.is_alive():
            # Inside Slicer the main thread keeps the GIL while Qt waits for events (PythonQt), so
            # the reader thread only runs when main-thread Python does: a short join here hands it
            # the GIL once per poll instead of starving it.
            self._reader.join(0.005)
        out = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._finish()
                continue
            line = line.rstrip()
            if not line:
                continue
            self.lines.append(line)
            if self._log is not None:
                self._log.write(line + "\n")
            out.append(line)
        self._poll_events()
        return out

    def _poll_events(self) -> None:
        """Overridden by runs that write an events file."""

    def _finish(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _drained(self) -> bool:
        return (self._reader is None or not self._reader.is_alive()) and self._queue.empty()

    def cancel(self, grace_s: float = 30.0) -> None:
        """Ask the process group to stop (SIGINT: the trainer saves its resume state after the
        current step); terminate, then kill, whatever is left after `grace_s` seconds."""
        if not self._interrupt(signal.SIGINT) or grace_s <= 0:
            return
        t = threading.Thread(target=self._escalate, args=(grace_s,), daemon=True)
        t.start()

    def _escalate(self, grace_s: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
        self.terminate()

    def terminate(self, grace_s: float = 5.0) -> None:
        """Terminate the whole process group now (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL if os.name != "nt" else signal.SIGTERM)

    def output(self) -> str:
        return "\n".join(self.lines)


class TrainingRun(EngineProcess):
    """A `uniultra train` / `uniultra distill` run in folder `out`, launched from a recipe file."""

    def __init__(self, options: TrainOptions | DistillOptions, python: str | None = None, env: dict | None = None):
        options.check()
        self.options = options
        self.out = Path(options.out)
        args = distill_args(options) if isinstance(options, DistillOptions) else train_args(options)
        super().__init__(args, python, env, log_path=self.out / "slicer-train.log")
        self.events: list[dict] = []
        self.events_path = self.out / "events.jsonl"
        self._events_offset = 0

    def start(self) -> TrainingRun:
        self.options.write_recipe()
        with contextlib.suppress(OSError):  # earlier runs' events (a resumed run appends)
            self._events_offset = self.events_path.stat().st_size
        super().start()
        return self

    def _poll_events(self) -> None:
        from uniultra.events import read_events

        new, self._events_offset = read_events(self.events_path, self._events_offset)
        for ev in new:
            self.events.append(ev)
            if ev["event"] == "step" and ev.get("total_steps"):
                self.progress = (int(ev["step"]), int(ev["total_steps"]))
            elif ev["event"] == "start" and ev.get("total_steps"):
                self.progress = (int(ev["step"]), int(ev["total_steps"]))
            elif ev["event"] == "validation" and ev.get("val_dice") is not None:
                self.last_val = (int(ev["step"]), float(ev["val_dice"]))

    def last_event(self, *kinds: str) -> dict | None:
        return next((e for e in reversed(self.events) if e["event"] in kinds), None)

    @property
    def can_resume(self) -> bool:
        return can_resume(self.out)

    def metrics(self) -> dict:
        return read_metrics(self.out / "metrics.csv")

    def summary(self) -> dict | None:
        return read_summary(self.out)

    @property
    def status(self) -> str:
        """"running", "finished", "cancelled", "failed" or "not started"."""
        if self.proc is None:
            return "not started"
        rc = self.proc.poll()
        if rc is None:
            return "running"
        self._poll_events()
        end = self.last_event("finished", "cancelled", "failed")
        if self.cancel_requested or (end is not None and end["event"] == "cancelled"):
            return "cancelled"
        if rc == 0:
            s = self.summary()
            return "cancelled" if s is not None and s.get("status") == "cancelled" else "finished"
        return "failed"

    def error_message(self) -> str:
        """The engine's one-line error (a `failed` event or `uniultra: error: ...`), or the last lines."""
        failed = self.last_event("failed")
        if failed is not None and failed.get("error"):
            return str(failed["error"])
        return super().error_message()


def can_resume(out: str | os.PathLike) -> bool:
    """A run folder with a resume state (`last.pt`)."""
    return (Path(out) / "last.pt").is_file()


# ------------------------------------------------------------------------------------ files
def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_metrics(path: str | os.PathLike) -> dict:
    """The trainer's metrics.csv as chart series.

    Returns {"columns": [...], "rows": [dict], "loss": [(step, train_loss)], "val_dice": [(step, val)],
    "lr": [(step, lr)]}; empty series when the file is not there yet (or is being replaced).
    """
    path = Path(path)
    out: dict = {"columns": [], "rows": [], "loss": [], "val_dice": [], "lr": []}
    if not path.is_file():
        return out
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            out["columns"] = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, csv.Error):
        return out
    for r in rows:
        step = _float(r.get("step"))
        if step is None:
            continue
        row = {k: (_float(v) if k != "step" else int(step)) for k, v in r.items()}
        out["rows"].append(row)
        for key, series in (("train_loss", "loss"), ("val_dice", "val_dice"), ("lr", "lr")):
            if row.get(key) is not None:
                out[series].append((int(step), row[key]))
    return out


def read_summary(out: str | os.PathLike) -> dict | None:
    p = Path(out) / "summary.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ results
def parse_json_output(text: str) -> dict:
    """The JSON object a `--json` command printed (log lines around it are ignored)."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
        start = text.find("{", start + 1)
    raise ValueError("the engine printed no JSON result")


def evaluate(model: str, data: str | os.PathLike, split: str = "val", device: str = "auto",
             python: str | None = None, timeout: float | None = None, env: dict | None = None) -> dict:
    """`uniultra evaluate --json` on one split, run to the end (use EngineProcess for async).

    Returns {"dice", "ellipse_dice", "boxfill_dice", "n_images", "seconds_per_image", "datasets": {...}}
    averaged over datasets."""
    p = EngineProcess(evaluate_args(model, str(data), split, device), python, env).start()
    rc = p.wait(timeout)
    if rc != 0:
        msg = next((line for line in reversed(p.lines) if line.startswith("uniultra: error:")), p.output()[-500:])
        raise RuntimeError(f"evaluating '{model}' on '{data}' failed: {msg}")
    return summarize_evaluation(parse_json_output(p.output()))


def summarize_evaluation(res: dict) -> dict:
    ds = res.get("datasets", {})

    def mean(key):
        v = [d[key] for d in ds.values() if d.get(key) is not None]
        return sum(v) / len(v) if v else None

    n = sum(int(d.get("n_images", 0)) for d in ds.values())
    secs = sum(float(d.get("seconds", 0.0)) for d in ds.values())
    return {"dice": mean("dice"), "ellipse_dice": mean("ellipse_dice"), "boxfill_dice": mean("boxfill_dice"),
            "n_images": n, "seconds_per_image": secs / n if n else None, "datasets": ds}


def comparison_rows(before: dict | None, after: dict | None, labels=("before", "after")) -> list[dict]:
    """Rows for the result table: model Dice before/after next to the box baselines."""
    rows = []
    for name, r in ((labels[0], before), (labels[1], after)):
        if r:
            rows.append({"model": name, "dice": r.get("dice"), "seconds_per_image": r.get("seconds_per_image")})
    ref = after or before
    if ref:
        rows.append({"model": "ellipse in box (baseline)", "dice": ref.get("ellipse_dice"), "seconds_per_image": None})
        rows.append({"model": "filled box (baseline)", "dice": ref.get("boxfill_dice"), "seconds_per_image": None})
    return rows


def compare_models(models: dict[str, str], data: str | os.PathLike, split: str = "val", device: str = "auto",
                   python: str | None = None, timeout: float | None = None, env: dict | None = None) -> list[dict]:
    """Distillation's speed/Dice comparison: each model ({label: name or path}) evaluated on the same
    split, side by side in one go; `speedup` is relative to the first model (seconds per image)."""
    rows = []
    for label, model in models.items():
        r = evaluate(model, data, split, device, python, timeout, env)
        rows.append({"model": label, "name": model, "dice": r["dice"], "seconds_per_image": r["seconds_per_image"],
                     "ellipse_dice": r["ellipse_dice"]})
    ref = rows[0]["seconds_per_image"] if rows else None
    for row in rows:
        spi = row["seconds_per_image"]
        row["speedup"] = (ref / spi) if ref and spi else None
    return rows


def dataset_summary(data: Sequence[str | os.PathLike]) -> dict:
    """{dataset name: {"count": {...}, "labels": {...}}} from each dataset's meta.json / split.csv."""
    out = {}
    for d in data:
        d = Path(d)
        meta = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        count = meta.get("count")
        if not count and (d / "split.csv").is_file():
            count = {}
            with open(d / "split.csv", newline="") as f:
                for r in csv.DictReader(f):
                    count[r.get("split", "")] = count.get(r.get("split", ""), 0) + 1
        out[d.name] = {"count": count or {}, "labels": meta.get("labels", {}), "path": str(d.resolve())}
    return out


def register_model(name: str, run_out: str | os.PathLike, options: TrainOptions | DistillOptions | None = None,
                   before: dict | None = None, after: dict | None = None, description: str = ""):
    """Register the run's model in the engine's user registry, with provenance; returns the entry.

    Reads the architecture, image size and method from the run's summary/config; the weights
    stay where the run wrote them (the registry entry points at them).
    """
    from uniultra.models.registry import register_user_model

    out = Path(run_out)
    summary = read_summary(out) or {}
    model_path = Path(summary.get("model_full") or summary.get("model") or out / "model.pt")
    if not model_path.is_file():
        raise ValueError(f"no trained model in '{out}': finish (or resume) the training first")
    config = {}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    params = summary.get("params") or {}
    arch = params.get("arch") or config.get("student") or config.get("model") or ""
    image_size = int(params.get("image_size") or config.get("image_size") or 0)
    method = params.get("peft") or config.get("peft")
    if isinstance(method, dict):
        method = method.get("method")
    data = list(getattr(options, "data", None) or config.get("data") or [])
    base = getattr(options, "base", None) or getattr(options, "teacher", None) or config.get("model")
    extra = {
        "base": base,
        "method": method,
        "student": getattr(options, "student", None),
        "data": dataset_summary(data),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "run": str(out.resolve()),
        "val_dice_before": (before or {}).get("dice"),
        "val_dice_after": (after or {}).get("dice") if after else summary.get("best_val_dice"),
        "baselines": {"ellipse": (after or before or {}).get("ellipse_dice"),
                      "boxfill": (after or before or {}).get("boxfill_dice")},
        "steps": summary.get("step"),
        "trained_with": "3D Slicer UniUltraTrain",
    }
    desc = description or f"{method or 'trained'} from {base} on {', '.join(Path(d).name for d in data)}"
    return register_user_model(name, model_path, arch, image_size, method, description=desc, extra=extra)
