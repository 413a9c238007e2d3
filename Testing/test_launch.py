"""The one launch of engine subprocesses (uniultra.launch.EngineSubprocess), shared by the Train
module's runner (a pipe read by a thread) and the Segment module's batch runner (a log file and
an events file): its own process group, so a cancel reaches the workers it started too."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from mrml_fixtures import REPO

from uniultra.launch import EngineSubprocess

if str(REPO / "UniUltraTrain") not in sys.path:
    sys.path.insert(0, str(REPO / "UniUltraTrain"))
from UniUltraSegmentLib.batch import BatchRun  # noqa: E402
from UniUltraTrainLib.runner import EngineProcess  # noqa: E402

# stands in for the interpreter: `<this> -m uniultra.cli ...` starts a worker, prints its pid, waits
FAKE_ENGINE = """#!{python}
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(worker.pid, flush=True)
time.sleep(120)
"""


class _FileRun(EngineSubprocess):
    def __init__(self, python, out):
        super().__init__(["batch"], python)
        self.out = out

    def _open_output(self):
        self._file = open(self.out, "w")  # noqa: SIM115
        return self._file

    def _launched(self):
        self._file.close()

    def poll(self):
        self.polls = getattr(self, "polls", 0) + 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def test_both_runners_share_the_launch_and_signalling():
    for cls in (EngineProcess, BatchRun):
        assert issubclass(cls, EngineSubprocess)
        for name in ("start", "running", "returncode", "wait", "_signal", "_interrupt"):
            assert name not in vars(cls), f"{cls.__name__} has its own {name}"


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX here")
def test_a_signal_reaches_the_workers_the_engine_started(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_ENGINE.format(python=sys.executable))
    fake.chmod(0o755)
    run = _FileRun(str(fake), tmp_path / "out.txt").start()
    assert run.cmd[:3] == [str(fake), "-m", "uniultra.cli"] and run.running and run.returncode is None
    with pytest.raises(RuntimeError, match="already started"):
        run.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "out.txt").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int((tmp_path / "out.txt").read_text().split()[0])
    assert _alive(worker)
    with pytest.raises(TimeoutError, match="'uniultra batch' still running"):
        run.wait(0.2)
    assert run._interrupt(signal.SIGTERM) and run.cancel_requested
    assert run.wait(30) == -signal.SIGTERM and run.polls >= 2
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the worker outlived the cancel: the signal did not reach the group"
    assert not run.running and not run._interrupt(signal.SIGTERM)
    assert run.error_message() == f"the batch process ended with status {-signal.SIGTERM}"
    run.lines += ["loading", "uniultra: error: the manifest has no rows", "Traceback..."]
    assert run.error_message() == "the manifest has no rows"


def test_a_failed_launch_closes_the_log(tmp_path):
    run = EngineProcess(["--help"], python=str(tmp_path / "no-such-python"), log_path=tmp_path / "run.log")
    with pytest.raises(OSError):
        run.start()
    assert run.proc is None and run._log is None and not run.running
    assert (tmp_path / "run.log").read_text().startswith("$ ")
