"""Model manager without Qt: the registry of downloadable weights and a careful downloader.

Weights are only fetched when the user asks, into a per-user cache folder (never the
extension's install folder), with progress, cancel, a SHA-256 check and an atomic rename so a
half-downloaded file never looks like a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 16


class DownloadCancelled(Exception):
    """The user cancelled a download; the partial file has been removed."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    arch: str
    image_size: int
    url: str
    sha256: str
    license: str
    file: str
    source: str = "official"  # official (downloadable) | bundled (ships with the extension) | user (trained here)

    @classmethod
    def from_dict(cls, d: dict) -> ModelEntry:
        source = str(d.get("source") or "official")
        required = ("name", "url", "file") if source == "official" else ("name", "file")
        missing = [k for k in required if not d.get(k)]
        if missing:
            raise ValueError(f"registry entry {d.get('name', d)!r} lacks {', '.join(missing)}")
        return cls(
            name=str(d["name"]),
            arch=str(d.get("arch", "")),
            image_size=int(d.get("image_size", 1024) or 1024),
            url=str(d.get("url") or ""),
            sha256=str(d.get("sha256", "") or "").lower(),
            license=str(d.get("license", "")),
            file=str(d["file"]),
            source=source,
        )


def default_registry_path() -> Path:
    """`Resources/models/registry.json` at the extension's top level (next to this module's parents)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "Resources" / "models" / "registry.json"
        if cand.exists():
            return cand
    return here.parents[2] / "Resources" / "models" / "registry.json"


def load_registry(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Registry entries (a list or {"models": [...]}) followed by the models trained here, which
    the engine records as JSON files in the user model folder."""
    path = Path(path) if path else default_registry_path()
    entries: list[ModelEntry] = []
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("models", [])
        entries = [ModelEntry.from_dict(d) for d in data]
    user_dir = Path(cache_dir or default_cache_dir())
    known = {e.name for e in entries}
    for meta in sorted(user_dir.glob("*.json")) if user_dir.is_dir() else []:
        try:
            d = json.loads(meta.read_text(encoding="utf-8"))
            entry = ModelEntry.from_dict({**d, "source": d.get("source") or "user"})
        except (OSError, ValueError, TypeError):
            continue  # one broken file must not hide the other models
        if entry.name not in known:
            entries.append(entry)
    return entries


def default_cache_dir() -> Path:
    """Per-user model folder, the same one the engine uses (uniultra.models.registry.user_models_dir):
    $UNIULTRA_CACHE, else $UNIULTRA_HOME/models, else the platform's user cache / uniultra / models."""
    env = os.environ.get("UNIULTRA_CACHE")
    if env:
        return Path(env)
    home = os.environ.get("UNIULTRA_HOME")
    if home:
        return Path(home) / "models"
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "uniultra" / "models"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def model_path(entry: ModelEntry, cache_dir: str | os.PathLike | None = None) -> Path:
    if entry.source == "bundled":
        return default_registry_path().parent.parent / entry.file
    return Path(cache_dir or default_cache_dir()) / entry.file  # an absolute `file` stays as it is


def model_state(entry: ModelEntry, cache_dir: str | os.PathLike | None = None, verify: bool = False) -> str:
    """bundled / trained here / installed, "not installed", "missing", or "corrupt" (checksum
    differs; only when verify=True)."""
    p = model_path(entry, cache_dir)
    if not p.exists():
        return "not installed" if entry.source == "official" else "missing"
    if verify and entry.sha256 and sha256_of(p) != entry.sha256:
        return "corrupt"
    return {"bundled": "bundled", "user": "trained here"}.get(entry.source, "installed")


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download `url` to `dest`: temporary file in the same folder, SHA-256 check, atomic rename.

    progress(done_bytes, total_bytes or -1) is called per chunk; cancel() -> True stops the
    download (DownloadCancelled).  On any failure the partial file is removed and `dest` is
    left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=str(dest.parent))
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http/https/file by design)
            except Exception as exc:  # noqa: BLE001
                raise OSError(f"could not download {url}: {exc}. Check the network or download it by hand") from exc
            with response:
                total = int(response.headers.get("Content-Length") or -1) if hasattr(response, "headers") else -1
                done = 0
                while True:
                    if cancel is not None and cancel():
                        raise DownloadCancelled(f"download of {url} cancelled")
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        digest = h.hexdigest()
        if sha256 and digest != sha256.lower():
            raise ValueError(
                f"downloaded file from {url} has SHA-256 {digest}, expected {sha256.lower()}: "
                "the file is corrupt or changed; it was not installed"
            )
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def install_model(entry: ModelEntry, cache_dir=None, progress=None, cancel=None) -> Path:
    return download(entry.url, model_path(entry, cache_dir), entry.sha256 or None, progress, cancel)


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Remove downloaded models; returns the number of files removed."""
    d = Path(cache_dir or default_cache_dir())
    if not d.exists():
        return 0
    n = sum(1 for p in d.rglob("*") if p.is_file())
    shutil.rmtree(d)
    return n
