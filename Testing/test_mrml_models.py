"""Model registry and downloader (no Qt): file:// downloads, SHA-256, atomic install, cancel."""

from __future__ import annotations

import hashlib
import json

import pytest
from mrml_fixtures import REPO  # noqa: F401  (puts UniUltraSegment on sys.path)
from UniUltraSegmentLib import models

pytestmark = pytest.mark.mrml


@pytest.fixture
def weights(tmp_path):
    src = tmp_path / "src" / "w.pt"
    src.parent.mkdir()
    src.write_bytes(b"weights" * 50000)
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def test_download_verifies_and_installs_atomically(tmp_path, weights):
    src, digest = weights
    seen = []
    dest = models.download(src.as_uri(), tmp_path / "cache" / "w.pt", digest, progress=lambda d, t: seen.append(d))
    assert dest.read_bytes() == src.read_bytes()
    assert seen[-1] == src.stat().st_size and len(seen) > 1
    assert [p.name for p in dest.parent.iterdir()] == ["w.pt"]  # no partial file left


def test_bad_checksum_and_cancel_leave_nothing(tmp_path, weights):
    src, _ = weights
    dest = tmp_path / "cache" / "w.pt"
    with pytest.raises(ValueError, match="SHA-256"):
        models.download(src.as_uri(), dest, "0" * 64)
    with pytest.raises(models.DownloadCancelled):
        models.download(src.as_uri(), dest, None, cancel=lambda: True)
    with pytest.raises(OSError, match="could not download"):
        models.download((tmp_path / "nope.pt").as_uri(), dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def _registry(tmp_path, monkeypatch, entries):
    """A registry.json with `entries` (plus the real bundled default) and a private user folder."""
    import shutil

    from uniultra.registry import REPO_ROOT

    res = tmp_path / "Resources"
    (res / "models").mkdir(parents=True)
    real = json.loads((REPO_ROOT / "Resources" / "models" / "registry.json").read_text())
    bundled = [e for e in real["models"] if e["source"] == "bundled"]
    (res / "models" / "registry.json").write_text(json.dumps({"models": entries + bundled}))
    for e in bundled:
        (res / e["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / "Resources" / e["file"], res / e["file"])
    monkeypatch.setenv("UNIULTRA_RESOURCES", str(res))
    monkeypatch.setenv("UNIULTRA_CACHE", str(tmp_path / "user"))
    monkeypatch.delenv("UNIULTRA_HOME", raising=False)


def test_registry_state_install_import_clear(tmp_path, monkeypatch, weights):
    src, digest = weights
    entry = {"name": "m", "arch": "sam2.1-hiera-tiny", "image_size": 1024, "url": src.as_uri(),
             "sha256": digest, "license": "Apache-2.0", "file": "m.pt"}
    _registry(tmp_path, monkeypatch, [entry, {**entry, "name": "n", "file": "n.pt", "sha256": "f" * 64}])
    entries = {e.name: e for e in models.load_registry()}
    m, n = entries["m"], entries["n"]
    assert models.model_state(m) == "downloadable" and models.can_check(m)
    path = models.install_model(m)
    assert path == tmp_path / "user" / "downloads" / "m.pt"
    assert models.model_state(m, verify=True) == "installed"
    with pytest.raises(ValueError, match="SHA-256"):
        models.install_model(n)
    with pytest.raises(ValueError, match="SHA-256"):
        models.import_weights(n, src)  # a file that is not the registry's model is refused
    models.import_weights(m, src)
    n.local_path().write_bytes(b"x")
    assert models.model_state(n, verify=True) == "corrupt"
    # a model trained here: its record lives in registered/, and Clear downloads leaves it alone
    from uniultra.registry import register_user_model

    trained = tmp_path / "runs" / "mine.pt"
    trained.parent.mkdir()
    trained.write_bytes(b"w")
    register_user_model("mine", trained, "uniultra-student-e8", 64, "ch-adapter")
    assert models.clear_downloads() == 2
    assert not (tmp_path / "user" / "downloads").exists()
    entries = {e.name: e for e in models.load_registry()}
    assert models.model_state(entries["mine"]) == "trained here" and trained.is_file()
    assert models.model_state(entries["uniultra-mini-us"]) == "bundled"


def test_one_name_one_model_in_engine_and_slicer(tmp_path, monkeypatch, weights):
    """A user record named like a registry model does not replace it, anywhere."""
    src, digest = weights
    _registry(tmp_path, monkeypatch, [{"name": "sam2.1-hiera-tiny", "arch": "sam2.1-hiera-tiny", "image_size": 1024,
                                       "url": src.as_uri(), "sha256": digest, "license": "x", "file": "t.pt"}])
    from uniultra.models.registry import get_entry, register_user_model  # the old import path still works

    with pytest.raises(ValueError, match="registry model"):
        register_user_model("sam2.1-hiera-tiny", src, "sam2.1-hiera-tiny", 1024, None)
    rogue = tmp_path / "user" / "registered" / "sam2.1-hiera-tiny.json"
    rogue.parent.mkdir(parents=True)
    rogue.write_text(json.dumps({"name": "sam2.1-hiera-tiny", "arch": "x", "image_size": 64, "file": "/tmp/x.pt"}))
    slicer_side = {e.name: e for e in models.load_registry()}["sam2.1-hiera-tiny"]
    assert slicer_side.source == get_entry("sam2.1-hiera-tiny").source == "official"


def test_user_folder_is_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIULTRA_CACHE", str(tmp_path / "c"))
    assert models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("UNIULTRA_CACHE")
    monkeypatch.delenv("UNIULTRA_HOME", raising=False)
    assert "uniultra" in str(models.default_cache_dir())
    assert REPO not in models.default_cache_dir().parents
    monkeypatch.setenv("UNIULTRA_HOME", str(tmp_path / "h"))
    assert models.default_cache_dir() == tmp_path / "h" / "models"


def test_registry_import_is_torch_free():
    import subprocess
    import sys

    path = str(REPO / "UniUltraSegment")
    code = (f"import sys; sys.path.insert(0, {path!r}); from UniUltraSegmentLib import models; "
            "models.load_registry(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), check=True)
    assert out.stdout.strip() == "False"
