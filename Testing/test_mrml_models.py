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


def test_registry_state_install_clear(tmp_path, weights):
    src, digest = weights
    reg = tmp_path / "registry.json"
    entry = {"name": "m", "arch": "sam2.1-hiera-tiny", "image_size": 1024, "url": src.as_uri(),
             "sha256": digest, "license": "Apache-2.0", "file": "m.pt"}
    reg.write_text(json.dumps([entry, {**entry, "name": "n", "file": "n.pt", "sha256": "f" * 64}]))
    entries = models.load_registry(reg)
    assert [e.name for e in entries] == ["m", "n"]
    cache = tmp_path / "cache"
    assert models.model_state(entries[0], cache) == "not installed"
    models.install_model(entries[0], cache)
    assert models.model_state(entries[0], cache, verify=True) == "installed"
    with pytest.raises(ValueError):
        models.install_model(entries[1], cache)
    (cache / "n.pt").write_bytes(b"x")
    assert models.model_state(entries[1], cache, verify=True) == "corrupt"
    assert models.clear_cache(cache) == 2 and not cache.exists()
    with pytest.raises(ValueError, match="lacks"):
        models.ModelEntry.from_dict({"name": "x"})


def test_cache_dir_is_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIULTRA_CACHE", str(tmp_path / "c"))
    assert models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("UNIULTRA_CACHE")
    monkeypatch.delenv("UNIULTRA_HOME", raising=False)
    assert "uniultra" in str(models.default_cache_dir())
    assert REPO not in models.default_cache_dir().parents
    from uniultra.models.registry import user_models_dir

    assert models.default_cache_dir() == user_models_dir()  # the engine and Slicer share one folder
    monkeypatch.setenv("UNIULTRA_HOME", str(tmp_path / "h"))
    assert models.default_cache_dir() == user_models_dir() == tmp_path / "h" / "models"


def test_real_registry_lists_bundled_and_trained_models(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIULTRA_HOME", str(tmp_path))
    from uniultra.models.registry import register_user_model

    weights = tmp_path / "models" / "mine.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"x")
    register_user_model("mine", weights, "uniultra-student-e8", 64, "ch-adapter")
    entries = {e.name: e for e in models.load_registry()}
    assert entries["uniultra-mini-us"].source == "bundled"
    assert models.model_state(entries["mine"]) == "trained here"
    assert models.model_state(entries["sam2.1-hiera-tiny"]) == "not installed"
    assert entries["sam2.1-hiera-tiny"].url.startswith("https://dl.fbaipublicfiles.com/")
