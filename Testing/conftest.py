"""Shared pytest fixtures.

``data_root``: the shared ultrasound data folder (README there), from the environment variable
``UNIULTRA_DATA`` or ``<repo>/../shared/data``; tests using it are skipped with a clear reason when
it is missing.  ``dataset_root(name)`` gives one dataset folder inside it (skips if absent).
``ckpt``: a small model (uniultra-student-e8, 64 px, random weights: speed, not quality) saved in
the engine's checkpoint format, once per session; tests only read it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _data_dir() -> Path:
    env = os.environ.get("UNIULTRA_DATA")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> str:
    import torch

    from uniultra.models import build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(build_model("uniultra-student-e8", image_size=64), path)
    return str(path)


@pytest.fixture(scope="session")
def data_root() -> Path:
    d = _data_dir()
    if not d.is_dir():
        pytest.skip(f"shared ultrasound data not found at {d} (set UNIULTRA_DATA to the data folder)")
    return d


@pytest.fixture(scope="session")
def dataset_root(data_root):
    def _get(name: str) -> Path:
        p = data_root / name
        if not (p / "split.csv").is_file():
            pytest.skip(f"dataset '{name}' not found in {data_root}")
        return p

    return _get


@pytest.fixture(scope="session")
def echo_dicom(data_root) -> Path:
    p = data_root / "dicom" / "US-PAL-8-10x-echo.dcm"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (restored afterwards), for comparisons with a recording made
    with one thread.  With two, reductions are summed in another order: the bundled model's logits
    (up to 68) move by 2.3e-5, as much as a real change of how an adapter is wired in (3.1e-5)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
