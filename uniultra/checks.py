"""One place that checks what a user gives: numbers (finite, in range), output paths (writable,
not a folder, not an input), and multi-file outputs written as one staged unit.

Every check raises :class:`uniultra.errors.InputError` with one line that names the option or
file and says what to do.  Torch-free (the Slicer modules use it too).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from uniultra.errors import InputError

# a number as a user types it, negative included: -1, -1.5, -.5, -1e1, -inf, -nan (argparse's own
# pattern only knows -1 and -1.5, so `--box -1e1 ...` or `--anchor -inf` were taken for options)
# (and a negative fraction such as `--shard -1/2`, so that its own check names the mistake)
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$|^-\d+/\d+$",
                             re.IGNORECASE)


def number(value, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False) -> float:
    """``value`` as a finite number in [lo, hi] (open ends with ``lo_open``/``hi_open``); whole
    numbers only with ``integer``.  ``name`` is the option or field ("--margin", "x.csv line 3: x0")."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} {value!r}: not a number") from None
    if not math.isfinite(v):
        raise InputError(f"{name} {value}: give a finite number (not NaN or infinity)")
    if integer and v != int(v):
        raise InputError(f"{name} {value}: give a whole number")
    shown = f"{int(v)}" if integer else f"{v:g}"
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise InputError(f"{name} {shown}: must be {'more than' if lo_open else 'at least'} {lo:g}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise InputError(f"{name} {shown}: must be {'less than' if hi_open else 'at most'} {hi:g}")
    return int(v) if integer else v


def numbers(values: Iterable, name: str, **limits) -> list[float]:
    """Every value through :func:`number` (e.g. a box's four corners)."""
    vals = list(values)
    for v in vals:
        try:
            number(v, name, **limits)
        except InputError as e:
            raise InputError(f"{name} {' '.join(str(x) for x in vals)}: {str(e).split(': ', 1)[-1]}") from None
    return [float(v) for v in vals]


def box_corners(values, name: str) -> tuple[float, float, float, float]:
    """A box as a user gives it (``name``: "--box", "x.csv line 3: box"): four finite numbers,
    two opposite corners in either order (returned with x0 <= x1, y0 <= y1); a box of zero width
    or height is refused (it holds no object: the model answers it with an empty mask)."""
    x0, y0, x1, y1 = numbers(values, name)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    if x0 == x1 or y0 == y1:
        raise InputError(f"{name} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty: it has zero "
                         f"{'width' if x0 == x1 else 'height'}; give two opposite corners of a box around the object")
    return x0, y0, x1, y1


def arg_number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
               integer: bool = False):
    """An argparse ``type=``: a finite number in range (the option is named by argparse)."""

    def parse(text: str):
        try:
            return number(text, "", lo, hi, lo_open, hi_open, integer)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None

    parse.__name__ = "whole number" if integer else "number"
    return parse


def image_array(image, name: str = "image"):
    """``image`` as an array a model can take, or one line naming it (``name``: the file, the
    CSV line or the frame): (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of a numeric dtype, at
    least 2x2 pixels, no NaN or infinity."""
    import numpy as np

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InputError(f"{name} has shape {a.shape}: expected a 2D grey (H, W) or colour (H, W, 3) image")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise InputError(f"{name} is {a.shape[1]}x{a.shape[0]} pixels: it is too small to segment")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise InputError(f"{name} has dtype {a.dtype}: expected integer or floating-point pixels")
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or infinite pixels: replace them before segmenting")
    return a


# ------------------------------------------------------------------------------ outputs
def readable_file(path, kind: str = "", folder_hint: str = "choose a file") -> Path:
    """``path`` as a Path if it is an existing file; otherwise an InputError naming it (and its
    ``kind``, e.g. "DICOM") and what to do.  One check for the engine's readers and the Slicer logic."""
    p = Path(path)
    what = f"{kind} '{p}'" if kind else f"'{p}'"
    if not p.exists():
        raise InputError(f"cannot read {what}: file not found; check the path")
    if p.is_dir():
        raise InputError(f"cannot read {what}: it is a folder; {folder_hint}")
    try:
        empty = p.is_file() and p.stat().st_size == 0
    except OSError:
        empty = False
    if empty:
        raise InputError(f"cannot read {what}: the file is empty (0 bytes); it was not copied or saved "
                         "completely, copy it again")
    return p


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _existing_ancestor(path: Path, option: str) -> Path:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{option} {path}: {parent} is a file, not a folder; choose another location")
            return parent
        if len(os.fsencode(parent.name)) > _name_max(Path(".")):
            raise InputError(f"{option} {path}: the folder name {parent.name[:40]}... is too long; use a shorter one")
    return Path(".")


def _check_name(path: Path, option: str, base: Path) -> None:
    for part in path.parts:
        if "\0" in part:
            raise InputError(f"{option} {path!r}: a file name cannot hold a NUL character")
    if len(os.fsencode(path.name)) > _name_max(base):
        raise InputError(f"{option} {path.name[:40]}...: the file name is too long "
                         f"({len(os.fsencode(path.name))} bytes); use a shorter one")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def check_output_file(path, option: str, inputs: Iterable = ()) -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, under a file,
    in a folder without write permission, a name too long, or one of the ``inputs``."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise InputError(f"{option} {str(path)!r}: give a file name")
    base = _existing_ancestor(p, option)
    _check_name(p, option, base)
    if p.is_dir():
        raise InputError(f"{option} {p}: is a folder; give a file name")
    if os.path.exists(p) and not p.is_file():  # writing replaces it with a plain file (/dev/null, a pipe)
        raise InputError(f"{option} {p}: is a device, pipe or socket, not a regular file; give a file name")
    for i in inputs:
        if i is not None and _same(p, Path(i)):
            raise InputError(f"{option} {p}: is also an input; choose another output name")
    if not os.access(base, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InputError(f"{option} {p}: no permission to write in {base}; choose a folder you can write to")
    return p


def check_events_file(path, option: str = "--events", inputs: Iterable = ()) -> Path:
    """An output file that is appended to (a JSON-lines event log): :func:`check_output_file`,
    and an existing non-empty file must already be such a log (its first line a JSON object
    with an "event"), so that a mistyped name never appends to a manifest, a CSV or a checkpoint."""
    import json

    p = check_output_file(path, option, inputs)
    try:
        if p.is_file() and p.stat().st_size:
            with open(p, "rb") as f:
                first = f.readline(1 << 16).decode("utf-8")
            if first.startswith('{"event"') and not first.endswith("\n"):
                return p  # another worker is writing its first event
            ev = json.loads(first)
            if not isinstance(ev, dict) or "event" not in ev:
                raise ValueError(first)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{option} {p}: exists and is not a JSON-lines event log (it would be appended to); "
                         "choose a new file name") from None
    except OSError:
        pass  # unreadable: opening it for appending reports it
    return p


def check_output_dir(path, option: str, inputs: Iterable = ()) -> Path:
    """Refuse, before any work, an output folder that cannot be made or written into."""
    p = Path(path)
    if str(path) == "":
        raise InputError(f"{option}: give a folder")
    base = _existing_ancestor(p, option)
    _check_name(p, option, base)
    if p.exists() and not p.is_dir():
        raise InputError(f"{option} {p}: is a file, not a folder; choose a folder")
    for i in inputs:
        if i is not None and _same(p, Path(i)):
            raise InputError(f"{option} {p}: is also an input; choose another output folder")
    target = p if p.is_dir() else base
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"{option} {p}: no permission to write in {target}; choose a folder you can write to")
    return p


class StagedFiles:
    """Write several output files as one unit: ``staged.path(final)`` gives a temporary name
    beside ``final``; on success all are moved in, on any failure none is (the temporaries go).
    Moving in is undone as a whole too: should the second move fail (disk, permissions), the
    first file is taken out again and any file it replaced is put back."""

    def __init__(self):
        self.pending: list[tuple[Path, Path]] = []

    def path(self, final) -> Path:
        final = Path(final)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp{final.suffix}")
        self.pending.append((tmp, final))
        return tmp

    def __enter__(self) -> StagedFiles:
        return self

    def _commit(self) -> None:
        moved: list[tuple[Path, Path | None]] = []  # (final, the older file set aside or None)
        try:
            for tmp, final in self.pending:
                backup = None
                if os.path.lexists(final):
                    backup = final.with_name(f".{final.name}.{os.getpid()}.old")
                    os.replace(final, backup)
                moved.append((final, backup))
                os.replace(tmp, final)
        except BaseException:
            for final, backup in reversed(moved):
                try:
                    if backup is not None:
                        os.replace(backup, final)
                    else:
                        final.unlink()
                except OSError:
                    pass
            raise
        for _, backup in moved:
            if backup is not None:
                try:
                    backup.unlink()
                except OSError:
                    pass

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        finally:
            for tmp, _ in self.pending:
                try:
                    tmp.unlink()
                except OSError:
                    pass
        return False


# ------------------------------------------------------------------------------ OS errors
_OS_HINTS = {
    errno.EISDIR: "is a folder; give a file name",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EACCES: "permission denied; choose a location you can write to (or read)",
    errno.EPERM: "not permitted; choose a location you can write to",
    errno.ENAMETOOLONG: "the name is too long; use a shorter one",
    errno.ENOENT: "not found; check the path",
    errno.ENOSPC: "the disk is full; free some space or choose another disk",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.EEXIST: "already exists; choose another name",
}


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the file and what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    hint = _OS_HINTS.get(e.errno) or (e.strerror or str(e) or type(e).__name__)
    if len(where) > 200:
        where = where[:100] + "..." + where[-60:]
    return f"{where}: {hint}" if where else f"{hint} ({e})"
