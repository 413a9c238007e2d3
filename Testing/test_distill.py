"""DSKD: the distillation loss decreases, the student decodes with the teacher's frozen prompt
encoder / mask decoder / no_mem_embed, feature caching and the level terms work."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from synthetic import make_dataset

from uniultra.errors import InputError
from uniultra.models import build_model, save_checkpoint
from uniultra.training.distill import DistillConfig, FeatureTap, build_student, distill


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("distill")
    data = make_dataset(base / "syn", n_train=8, n_val=2, seed=1)
    torch.manual_seed(0)
    teacher = build_model("uniultra-student-e16", image_size=64)  # a CH-Adapter model as the teacher
    tpath = base / "teacher.pt"
    save_checkpoint(teacher, tpath, {"name": "teacher"})
    return data, tpath


def test_student_reuses_teacher_decoder(setup):
    _, tpath = setup
    teacher = build_model(str(tpath))
    student = build_student(teacher, "uniultra-student-e8", 64)
    for part in ("sam_prompt_encoder", "sam_mask_decoder"):
        ts, ss = getattr(teacher.sam, part).state_dict(), getattr(student.sam, part).state_dict()
        assert all(torch.equal(ts[k], ss[k]) for k in ts)
    assert torch.equal(teacher.sam.no_mem_embed, student.sam.no_mem_embed)
    trainable = {n for n, p in student.sam.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("image_encoder.") for n in trainable)
    tap = FeatureTap(student.sam.image_encoder.trunk, list(student.sam.image_encoder.trunk.stage_ends[:3]))
    with torch.no_grad():
        student.encode(torch.randn(1, 3, 64, 64))
    terms = tap.terms()
    assert {"block0", "adapter0", "sum0", "block2", "sum2"} <= set(terms)
    assert terms["block0"].shape[-1] == 8 and terms["block2"].shape[-1] == 32
    tap.remove()
    with pytest.raises(InputError, match="not a student"):
        build_student(teacher, "sam2.1-hiera-tiny", 64)


def test_distillation_loss_decreases_with_cache(setup, tmp_path):
    data, tpath = setup
    cache = tmp_path / "cache"
    cfg = DistillConfig(teacher=str(tpath), data=[str(data)], out=str(tmp_path / "s"), student="uniultra-student-e8",
                        steps=16, batch_size=2, lr=2e-3, schedule="constant", val_every=16, log_every=4,
                        cache_dir=str(cache), progress_bar=False, threads=1)
    r = distill(cfg, progress=False)
    assert r["status"] == "finished" and r["step"] == 16
    rows = [float(x["train_loss"]) for x in csv.DictReader(open(tmp_path / "s" / "metrics.csv"))]
    assert rows[-1] < 0.7 * rows[0], rows
    files = list(cache.rglob("*.pt"))
    assert len(files) == 8  # one per training image
    t = torch.load(files[0], weights_only=True)
    assert t["fpn0"].dtype == torch.float16 and t["fpn0"].shape == (256, 16, 16)
    assert {"block1", "adapter1", "sum1"} <= set(t)
    # the student checkpoint loads and carries the teacher's decoder (frozen during distillation)
    student = build_model(r["model"])
    teacher = build_model(str(tpath))
    sd, td = student.sam.sam_mask_decoder.state_dict(), teacher.sam.sam_mask_decoder.state_dict()
    assert all(torch.equal(sd[k], td[k]) for k in td)
    assert student.arch.name == "uniultra-student-e8" and student.image_size == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = student(x, boxes=torch.tensor([[10.0, 10.0, 40.0, 40.0]]))
    assert out.shape == (1, 1, 16, 16)


def test_feature_cache_is_kept_apart_per_teacher(setup, tmp_path):
    """Two different teachers saved under the same file name (every run writes model.pt) shared one
    cache folder and the second silently learned the first one's features; now each teacher's
    encoder weights name its folder."""
    data, tpath = setup
    torch.manual_seed(1)
    other = tmp_path / "other" / tpath.name
    other.parent.mkdir()
    save_checkpoint(build_model("uniultra-student-e16", image_size=64), other, {"name": "teacher"})
    cache = tmp_path / "cache"
    for i, t in enumerate((tpath, other, tpath)):
        cfg = DistillConfig(teacher=str(t), data=[str(data)], out=str(tmp_path / f"s{i}"), student="uniultra-student-e8",
                            steps=1, batch_size=2, val_every=1, cache_dir=str(cache), progress_bar=False, threads=1)
        assert distill(cfg, progress=False)["status"] == "finished"
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 2 and all(f.startswith(f"{tpath.stem}_64_1_") for f in folders), folders


def test_distill_without_cache_and_size_check(setup, tmp_path):
    data, tpath = setup
    cfg = DistillConfig(teacher=str(tpath), data=[str(data)], out=str(tmp_path / "s2"),
                        student="uniultra-student-e8", steps=2, batch_size=2, level_terms=False, val_every=2,
                        progress_bar=False, threads=1)
    r = distill(cfg, progress=False)
    assert r["status"] == "finished" and Path(r["model"]).is_file() and r["first_loss"] > 0
    with pytest.raises(InputError, match="same size"):
        distill(DistillConfig(teacher=str(tpath), data=[str(data)], out=str(tmp_path / "s3"), image_size=128,
                              progress_bar=False, threads=1), progress=False)
