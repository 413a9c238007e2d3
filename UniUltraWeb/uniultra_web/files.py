"""Which files the browser may open, and where uploads go (no trame here).

* The browser never sends a path.  It picks an entry of `FileCatalog`, the list the server built
  from FILE_OR_FOLDER at start; the server maps the index back to its own path.
* An upload is a name and bytes: the name is reduced to a safe base name with a supported
  extension, the size is checked (declared and actual), and the file is written inside the
  session's upload folder only (created 0700; the resolved path must stay inside it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .loaders import SUPPORTED_EXT, extension

MAX_FILES = 2000


class UploadError(ValueError):
    """An upload that was refused (one line for the user)."""


class FileCatalog:
    """The server-side files offered to the browser: one file, or the supported files under a folder."""

    def __init__(self, root: str | Path | None):
        self.extensions = tuple(SUPPORTED_EXT)
        self.root: Path | None = None
        self._paths: list[Path] = []
        if root is None:
            return
        root = Path(root).expanduser()
        if not root.exists():
            raise ValueError(f"'{root}' does not exist: give an image file or a folder of images")
        root = root.resolve()
        if root.is_file():
            if extension(root.name) not in self.extensions:
                raise ValueError(f"'{root}' is not a supported file ({', '.join(self.extensions)})")
            self.root, self._paths = root.parent, [root]
            return
        self.root = root
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and extension(f) in self.extensions:
                    p = Path(dirpath) / f
                    # a link that leads out of the folder is not offered
                    if p.resolve().is_relative_to(root):
                        found.append(p)
                if len(found) >= MAX_FILES:
                    break
            if len(found) >= MAX_FILES:
                break
        if not found:
            raise ValueError(f"no supported file in '{root}' ({', '.join(self.extensions)})")
        self._paths = found

    def names(self) -> list[str]:
        if self.root is None:
            return []
        return [str(p.relative_to(self.root)) if p.is_relative_to(self.root) else p.name for p in self._paths]

    def path(self, index: int) -> Path:
        """The server's path for list entry `index` (IndexError for anything else)."""
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self._paths):
            raise IndexError(f"no file number {index!r}")
        return self._paths[index]

    def __len__(self) -> int:
        return len(self._paths)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, extensions) -> str:
    """A base name made of [A-Za-z0-9._-] that keeps a supported extension, or UploadError."""
    base = str(name or "").replace("\\", "/").split("/")[-1]
    ext = extension(base)
    if ext not in extensions:
        raise UploadError(f"upload '{base[:80]}' refused: not a supported type ({', '.join(extensions)})")
    stem = _SAFE.sub("_", base[: -len(ext)]).strip("._")[:80] or "upload"
    return stem + ext


def save_upload(upload: dict, folder: str | Path, extensions, max_bytes: int) -> Path:
    """Write one trame VFileInput upload ({name, size, content}) into `folder`; the path written."""
    if not isinstance(upload, dict):
        raise UploadError("upload refused: not a file")
    name = safe_name(upload.get("name", ""), extensions)
    declared = upload.get("size")
    if isinstance(declared, (int, float)) and declared > max_bytes:
        raise UploadError(f"upload '{name}' refused: {declared / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB limit")
    content = upload.get("content")
    if isinstance(content, list):  # chunked uploads arrive as a list of parts
        content = b"".join(bytes(c) for c in content)
    if not isinstance(content, (bytes, bytearray)):
        raise UploadError(f"upload '{name}' refused: no file content")
    if len(content) > max_bytes:
        raise UploadError(f"upload '{name}' refused: {len(content) / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB limit")
    if not content:
        raise UploadError(f"upload '{name}' refused: the file is empty")
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = folder.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise UploadError(f"upload '{name}' refused: bad file name")
    stem, ext, i = path.name[: -len(extension(path.name))], extension(path.name), 1
    while path.exists():  # never overwrite an earlier upload
        path = root / f"{stem}_{i}{ext}"
        i += 1
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    return path
