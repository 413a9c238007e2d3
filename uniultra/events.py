"""Machine-readable progress: JSON-lines events, their reader, and the human text made from them.

One event is one line ``{"event": KIND, "time": unix seconds, ...fields}``.  Long-running work
(training, distillation, batch labelling) appends events to a file (``<out>/events.jsonl`` for
a training run, ``--events PATH`` for any command); front ends (the Slicer Train panel, a
dashboard, a SLURM log scraper) read the file instead of parsing printed text, and the
printed text itself is made from the same events by :func:`format_event`.

Training event kinds (fields beyond ``event``/``time``):

``start``       ``task, out, step, total_steps, resumed, device, world_size``
``step``        ``step, total_steps, epoch``; on logging steps also ``loss, parts {name: value},
                lr, img_per_s, elapsed_s``
``validation``  ``step, val_dice, per_dataset {name: Dice}, best, best_step, improved``
``checkpoint``  ``step, path, kind`` (``last`` | ``best`` | ``model`` | ``model_full``)
``note``        ``message`` (a warning or remark for the user)
``finished``    ``step, status`` (``finished`` | ``early-stopped``), ``best_val_dice, model``
``cancelled``   ``step, last`` (the resume state to continue from)
``failed``      ``error`` (one line)

This module imports no torch (the Slicer side reads events with it).  The one progress
callback type of the engine is :data:`Progress`: ``progress(done, total, message)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

Progress = Callable[[int, int, str], None]
"""``progress(done, total, message)``: called by long work after each unit (step, image, clip)."""

log = logging.getLogger("uniultra")


def jsonable(v: Any):
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _clean(v):
    """NaN/inf become null (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def event_line(kind: str, /, **fields) -> str:
    """The JSON line (with its newline) of one event."""
    return json.dumps(_clean({"event": kind, "time": round(time.time(), 3), **fields}), default=jsonable) + "\n"


def emit_event(stream: IO[str] | None, kind: str, /, **fields) -> None:
    """Write one event to an open text stream (flushed); ``None`` writes nothing."""
    if stream is not None:
        stream.write(event_line(kind, **fields))
        stream.flush()


class LazyAppend:
    """An append-mode text file opened at the first write (a run refused up front writes nothing)."""

    def __init__(self, path: str | os.PathLike):
        self.path, self._f = Path(path), None

    def write(self, text: str) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._f.write(text)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class EventLog:
    """Events to zero or more JSON-lines files, and their human form to ``say`` (or ``logging``).

    ``emit(kind, **fields)`` writes the event line to every file and passes the text of
    :func:`format_event` to ``say`` (default: ``logging.getLogger("uniultra").info``) unless the
    event is marked ``quiet`` (step events while a progress bar shows the same)."""

    def __init__(self, paths=(), say: Callable[[str], None] | None = None, enabled: bool = True):
        self.enabled = enabled
        self.files = [LazyAppend(p) for p in paths if p] if enabled else []
        self.say = say or log.info

    def emit(self, kind: str, /, quiet: bool = False, **fields) -> dict:
        ev = {"event": kind, **fields}
        if not self.enabled:
            return ev
        line = event_line(kind, **fields)
        for f in self.files:
            f.write(line)
            f.flush()
        text = None if quiet else format_event(ev)
        if text:
            self.say(text)
        return ev

    def close(self) -> None:
        for f in self.files:
            f.close()


def read_events(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Events appended to ``path`` since byte ``offset``: ``(events, new offset)``.

    A half-written last line is left for the next call; unreadable lines are skipped.
    A missing file gives ``([], offset)``."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    out = []
    for raw in data[: end + 1].splitlines():
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if isinstance(ev, dict) and "event" in ev:
            out.append(ev)
    return out, offset + end + 1


def _f(v, fmt: str = ".4f") -> str:
    return "nan" if v is None else format(v, fmt)


def format_event(ev: dict) -> str | None:
    """One human-readable line for an event (``None`` for events that print nothing)."""
    kind = ev.get("event")
    if kind == "start":
        if ev.get("resumed"):
            return f"resumed {ev.get('out')} at step {ev.get('step')}/{ev.get('total_steps')}"
        return (f"{ev.get('task', 'training')}: {ev.get('total_steps')} steps on {ev.get('device')}"
                + (f" x {ev['world_size']} processes" if (ev.get("world_size") or 1) > 1 else "")
                + f", output in {ev.get('out')}")
    if kind == "step":
        if ev.get("loss") is None:
            return None
        parts = " ".join(f"{k}={_f(v)}" for k, v in (ev.get("parts") or {}).items() if k != "loss")
        speed = f" {ev['img_per_s']:.3g} img/s" if ev.get("img_per_s") else ""
        return (f"step {ev['step']}/{ev['total_steps']} loss {_f(ev['loss'])}"
                + (f" ({parts})" if parts else "") + f" lr {_f(ev.get('lr'), '.3g')}{speed}")
    if kind == "validation":
        per = " ".join(f"{k}={_f(v)}" for k, v in (ev.get("per_dataset") or {}).items())
        return (f"step {ev['step']}: val Dice {_f(ev.get('val_dice'))} {per} "
                f"(best {_f(ev.get('best'))} @ {ev.get('best_step')})").replace("  ", " ")
    if kind == "checkpoint":
        return None if ev.get("kind") == "last" else f"saved {ev.get('kind')} {ev.get('path')}"
    if kind == "note":
        return ev.get("message")
    if kind == "finished":
        best = ev.get("best_val_dice")
        return (f"{ev.get('status', 'finished')} at step {ev.get('step')}"
                + (f", best val Dice {best:.4f} @ {ev.get('best_step')}" if best is not None else "")
                + (f": {ev['model']}" if ev.get("model") else ""))
    if kind == "cancelled":
        return f"stopped at step {ev.get('step')}: resume with --resume (state in {ev.get('last')})"
    if kind == "failed":
        return f"failed: {ev.get('error')}"
    return None


def console_progress(desc: str = "", unit: str = "step") -> Progress:
    """A :data:`Progress` that draws a tqdm bar on stderr (the command-line edge only)."""
    from tqdm import tqdm

    state: dict = {"bar": None, "done": 0}

    def progress(done: int, total: int, message: str = "") -> None:
        bar = state["bar"]
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, initial=done, desc=desc, unit=unit, dynamic_ncols=True,
                                      file=sys.stderr)
            state["done"] = done
        bar.update(done - state["done"])
        state["done"] = done
        if message:
            bar.set_postfix_str(message, refresh=False)
        if done >= total:
            bar.close()
            state["bar"] = None

    return progress


__all__ = ["Progress", "EventLog", "LazyAppend", "emit_event", "event_line", "jsonable", "read_events", "format_event",
           "console_progress"]
