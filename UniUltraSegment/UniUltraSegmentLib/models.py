"""Model manager without Qt: the engine's one registry, plus a careful downloader.

The registry itself (entries, the per-user folder, its `downloads/` and `registered/` parts) is
`uniultra.registry`, which imports neither torch nor Qt; this module only adds what the Slicer
panel needs on top: a downloader with progress, cancel, SHA-256 check and atomic rename (so a
half-downloaded file never looks like a model), and "import weights from a file" for sites
without internet.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from uniultra.errors import Cancelled

from .engine import _add_source_tree_engine

CHUNK = 1 << 16


class DownloadCancelled(Cancelled):
    """The user cancelled a download; the partial file has been removed (the engine's one
    cancellation exception, :class:`uniultra.errors.Cancelled`, under the name the panel uses)."""


def registry():
    """The engine's `uniultra.registry` module (torch-free)."""
    _add_source_tree_engine()
    import uniultra.registry

    return uniultra.registry


def load_registry() -> list:
    """Every model: the registry's, then those trained or registered here."""
    return list(registry().load_registry().values())


def default_cache_dir() -> Path:
    return registry().user_models_dir()


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def model_path(entry) -> Path | None:
    """Where the entry's weights are (or a download would put them)."""
    return entry.local_path()


def model_state(entry, verify: bool = False) -> str:
    """The registry's state, or "corrupt" when verify=True and the file's SHA-256 differs."""
    state = entry.state
    path = entry.local_path()
    if verify and entry.sha256 and path is not None and path.is_file() and sha256_of(path) != entry.sha256.lower():
        return "corrupt"
    return state


def can_check(entry) -> bool:
    """True when a download of `entry` is checked against a known SHA-256."""
    return bool(entry.sha256)


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


def install_model(entry, progress=None, cancel=None) -> Path:
    """Download an official entry into the downloads folder (checked when the registry has its SHA-256)."""
    if not entry.url or entry.source != "official":
        raise ValueError(f"'{entry.name}' is not downloadable (it is {entry.state})")
    return download(entry.url, entry.local_path(), entry.sha256 or None, progress, cancel)


def import_weights(entry, source: str | os.PathLike) -> Path:
    """Install an official entry from a file the user already has (no internet needed).

    The file is checked against the registry's SHA-256 when there is one, then copied
    atomically into the downloads folder."""
    source = Path(source)
    if not source.is_file():
        raise ValueError(f"'{source}' is not a file")
    if entry.source != "official":
        raise ValueError(f"'{entry.name}' is {entry.state}: only downloadable models can be imported")
    return download(source.resolve().as_uri(), entry.local_path(), entry.sha256 or None)


def clear_downloads() -> int:
    """Remove downloaded weights only (trained models and their records stay); number of files removed."""
    return registry().clear_downloads()
