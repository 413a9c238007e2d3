"""How front ends start the engine in a subprocess: interpreter, environment, command line, launch.

The Slicer modules (Train: `uniultra train|distill|evaluate`; Segment: `uniultra batch`) run long
work in its own process so the application stays responsive and Cancel can always stop it.  This
module is the one place that decides how that process is started (:class:`EngineSubprocess`).  It
imports neither torch nor Qt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO


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


class EngineSubprocess:
    """One `uniultra ...` subprocess, started in its own process group (so a signal reaches the
    workers it starts too), stdin closed, stderr into stdout.

    What the front ends' runs share lives here: the command line and environment, the launch,
    ``running`` / ``returncode`` and signalling the whole group.  How a run is followed stays in
    the subclass, which supplies ``_open_output`` (where stdout goes) and ``_launched`` (called
    right after the launch, also when it failed), ``poll`` (follow it, never blocking) and
    ``_drained`` (all output read once the process has ended): the Train module's
    ``runner.EngineProcess`` reads a pipe in a thread; the Segment module's ``batch.BatchRun``
    sends the output to a log file and reads files only, never blocking and with no thread."""

    what = "this process"  # for the message when started twice

    def __init__(self, args: Sequence[str], python: str | None = None, env: dict | None = None,
                 cwd: str | None = None):
        self.cmd = command(args, python)
        self.env = engine_env(env)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.cancel_requested = False
        self.lines: list[str] = []  # what the process printed, as far as it has been read

    def _open_output(self) -> int | IO:
        """Where the process's output goes (``subprocess.PIPE`` or an open file)."""
        raise NotImplementedError

    def _launched(self) -> None:
        """After the launch (``self.proc`` is None when it failed)."""

    def poll(self):
        """Follow the run: read what is new (from a timer on the main thread); never blocks."""
        raise NotImplementedError

    def _drained(self) -> bool:
        """Whether everything the ended process wrote has been read."""
        return True

    @property
    def banner(self) -> str:
        """The first line of a run's log: the command line."""
        return f"$ {' '.join(self.cmd)}\n"

    def start(self):
        if self.proc is not None:
            raise RuntimeError(f"{self.what} was already started")
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True  # its own process group: Cancel reaches all of it
        stdout = self._open_output()
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=stdout, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, **kwargs)
            self.started_at = time.monotonic()
        finally:
            self._launched()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends and its output is read (tests, scripts), polling all the
        while; returns its exit status."""
        assert self.proc is not None, "not started"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            rc = self.proc.poll()
            if rc is not None and self._drained():
                self.poll()
                return rc
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"'uniultra {self.cmd[3] if len(self.cmd) > 3 else ''}' still running "
                                   f"after {timeout} s")
            time.sleep(0.05)

    def error_message(self) -> str:
        """The engine's one-line error (``uniultra: error: ...``), or the last lines of its output."""
        for line in reversed(self.lines):
            if line.startswith("uniultra: error:"):
                return line[len("uniultra: error:"):].strip()
        sub = self.cmd[3] if len(self.cmd) > 3 else "engine"
        return "\n".join(self.lines[-5:]) or f"the {sub} process ended with status {self.returncode}"

    def _interrupt(self, sig) -> bool:
        """The first step of a cancel: note it and send ``sig`` to the group (CTRL_BREAK_EVENT on
        Windows); False when the process is not running."""
        if not self.running:
            return False
        self.cancel_requested = True
        self._signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else sig)  # type: ignore[attr-defined]
        return True

    def _signal(self, sig) -> None:
        """``sig`` to the whole process group (on Windows: terminate, or the signal to the process)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if os.name == "nt":
                if sig == signal.SIGTERM:
                    self.proc.terminate()
                else:
                    self.proc.send_signal(sig)
            else:
                os.killpg(self.proc.pid, sig)


__all__ = ["python_executable", "engine_root", "engine_env", "command", "EngineSubprocess"]
