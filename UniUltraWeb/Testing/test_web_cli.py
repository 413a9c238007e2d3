"""`uniultra web` refuses bad input with one error line and exit status 2, before any server starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from browser import REPO

CASES = [
    (["/nonexistent/folder"], "does not exist"),
    (["--host", "10.0.0.5"], "--host 10.0.0.5 listens beyond this machine: give a secret --token"),
    (["--host", "0.0.0.0", "--token", "1234567890123456789"], "must not be a number"),
    (["--host", "0.0.0.0", "--token", "abc def ghi jkl mno"], "may only hold"),
    (["--port", "99999"], "is not a port number"),
    (["--max-upload-mb", "0"], "--max-upload-mb must be positive"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("args,message", CASES)
def test_bad_input_is_one_line(args, message, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "UniUltraWeb"))
    env.pop("UNIULTRA_WEB_TOKEN", None)
    r = subprocess.run([sys.executable, "-m", "uniultra_web", *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("uniultra: error: ") and message in lines[0], r.stderr
    assert not r.stdout.strip() and not list(tmp_path.iterdir())
