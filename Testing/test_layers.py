"""The engine's torch-free layer: what the Slicer modules (and any front end) may import before
PyTorch is installed.  Each module is imported in a fresh interpreter with `import torch` made to
fail, so a stray top-level torch import anywhere in its import chain fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_FREE = [
    "uniultra.errors", "uniultra.fileio", "uniultra.registry", "uniultra.events",
    "uniultra.data.dicom", "uniultra.data.intensity", "uniultra.data.io",
]


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    prelude = ("import sys\n"
               "class _Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torch', 'torchvision', 'sam2', 'hydra'):\n"
               "            raise ImportError(f'{name} is blocked in this test')\n"
               "sys.meta_path.insert(0, _Block())\n")
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_import_without_torch(module):
    r = run_without_torch(f"import {module}\nassert 'torch' not in sys.modules\nprint('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_blocking_works():
    r = run_without_torch("import uniultra.data.transforms")
    assert r.returncode != 0 and "blocked" in r.stderr
