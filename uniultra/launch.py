"""How front ends start the engine in a subprocess: interpreter, environment, command line.

The Slicer modules (Train: `uniultra train|distill`; Segment: `uniultra batch`) run long work in
its own process so the application stays responsive and Cancel can always stop it.  This module
is the one place that decides how that process is started.  It imports neither torch nor Qt.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path


def python_executable() -> str:
    """The interpreter for engine subprocesses: `PythonSlicer` inside Slicer, else this Python."""
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        exe = shutil.which("PythonSlicer")
        if exe:
            return exe
    return sys.executable


def engine_root() -> Path:
    """The folder that holds the `uniultra` package (installed next to the modules, or the source tree)."""
    return Path(__file__).resolve().parents[1]


def engine_env(extra: dict | None = None) -> dict:
    """Environment for the subprocess: the engine importable, unbuffered output, no tqdm colour."""
    env = dict(os.environ)
    root = str(engine_root())
    parts = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def command(args: Sequence[str], python: str | None = None) -> list[str]:
    """The whole command line: `<python> -m uniultra.cli <args>`."""
    return [python or python_executable(), "-m", "uniultra.cli", *args]


__all__ = ["python_executable", "engine_root", "engine_env", "command"]
