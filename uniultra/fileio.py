"""Atomic file writes, torch-free and standard-library only: the one implementation that the
engine, the CLI, the registry and both Slicer modules use."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], keep_ext: bool = False) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then ``os.replace`` it onto
    ``path``: readers never see half a file.  On any failure (an exception, including
    KeyboardInterrupt) the temporary file is removed and ``path`` is untouched.

    The temporary name ends in ``.tmp``; ``keep_ext=True`` ends it in ``path``'s own extensions
    instead (``.seg.nrrd``), for writers that choose the format from the file name (VTK/MRML
    storage nodes).  The result gets the permissions of a normal new file (mkstemp makes 0600)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + ("".join(dest.suffixes) if keep_ext else "")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=str(dest.parent))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return dest


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as UTF-8 (newlines as given), atomically."""

    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, _w)


def atomic_write_csv(path: str | os.PathLike, rows, fields) -> Path:
    """``rows`` (dicts) as CSV with the header ``fields`` (missing or None values empty), atomically."""
    import csv

    def _w(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(fields))
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})

    return atomic_write(path, _w)
