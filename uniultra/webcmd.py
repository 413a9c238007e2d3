"""`uniultra web [FILE_OR_FOLDER] [options]`: start UniUltra Web (UniUltraWeb/uniultra_web).

UniUltra Web runs in its own environment (.venv-web, `make web-setup`): trame-slicer 2.0 pins
slicer-core 5.11.  When this interpreter has trame-slicer, the app runs here; otherwise this
command hands over to the web environment's Python (same arguments), so `uniultra web` works
from the main environment too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from uniultra.errors import InputError

REPO = Path(__file__).resolve().parents[1]
WEB_PACKAGE = REPO / "UniUltraWeb"


def web_python() -> Path | None:
    """The web environment's interpreter, if it was set up."""
    for name in ("bin/python", "Scripts/python.exe"):
        p = REPO / ".venv-web" / name
        if p.is_file():
            return p
    return None


def run(argv: list[str]) -> int:
    if not (WEB_PACKAGE / "uniultra_web" / "__main__.py").is_file():
        raise InputError(f"UniUltra Web is not in this installation ({WEB_PACKAGE} is missing); use a source checkout")
    if importlib.util.find_spec("trame_slicer") is not None:
        sys.path.insert(0, str(WEB_PACKAGE))
        from uniultra_web.__main__ import main

        return main(argv)
    py = web_python()
    if py is None:
        raise InputError("UniUltra Web needs its own environment (trame-slicer pins slicer-core 5.11): "
                         f"run `make web-setup` in {REPO}, then `uniultra web` again")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(WEB_PACKAGE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(str(py), [str(py), "-m", "uniultra_web", *argv], env)
    return 0  # not reached
