"""UniUltra Web tests: run from the web environment (`make web-test`, .venv-web).

Paths: the web package, the Slicer-side library, the engine and the project's MRML test helpers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
for p in (REPO / "UniUltraWeb", REPO / "UniUltraSegment", REPO, REPO / "Testing"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

DATA = Path(os.environ["UNIULTRA_DATA"]) if os.environ.get("UNIULTRA_DATA") else REPO.parent / "shared" / "data"
BUSI_IMAGE = DATA / "busi" / "images" / "benign_001.png"
BUSI_MASK = DATA / "busi" / "masks" / "benign_001.png"
ECHO_DICOM = DATA / "dicom" / "US-PAL-8-10x-echo.dcm"


@pytest.fixture(scope="session")
def busi_image() -> Path:
    if not BUSI_IMAGE.is_file():
        pytest.skip(f"shared ultrasound data not found: {BUSI_IMAGE} (set UNIULTRA_DATA)")
    return BUSI_IMAGE


@pytest.fixture(scope="session")
def echo_dicom() -> Path:
    if not ECHO_DICOM.is_file():
        pytest.skip(f"shared ultrasound data not found: {ECHO_DICOM} (set UNIULTRA_DATA)")
    return ECHO_DICOM
