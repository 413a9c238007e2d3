"""`uniultra train --teacher`: feature hints from a frozen teacher next to the mask loss.

The projections learn (the hint terms fall), the teacher's embeddings come from and go to its
cache (a second run computes nothing), the model keeps its own decoder and trains it, the
projections are saved for resume but not in the model, and bad combinations are refused."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from synthetic import make_dataset

from uniultra.errors import InputError
from uniultra.models import build_model, save_checkpoint
from uniultra.training.tasks import TeacherHint
from uniultra.training.trainer import TrainConfig, train

STUDENT = "uniultra-student-e8"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("hint")
    data = make_dataset(base / "syn", n_train=6, n_val=2, seed=3)
    torch.manual_seed(0)
    teacher = build_model("uniultra-student-e16", image_size=64)
    tpath = base / "teacher.pt"
    save_checkpoint(teacher, tpath, {"name": "teacher"})
    return data, tpath


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=[str(data)], out=str(out), model=STUDENT, image_size=64, peft="full", steps=24, batch_size=3,
                lr=3e-3, optimizer="adamw", schedule="constant", val_every=24, progress_bar=False, threads=1,
                log_every=1, augment=False, loss_weights="dice=1,bce=1,iou=1")
    base.update(kw)
    return TrainConfig(**base)


def test_hint_terms_fall_and_cache_serves_the_teacher(setup, tmp_path):
    data, tpath = setup
    cache = tmp_path / "tcache"
    r = train(cfg(data, tmp_path / "run", teacher=str(tpath), teacher_cache=str(cache), hint_weight=1.0),
              progress=False)
    assert r["status"] == "finished"
    steps = [json.loads(x) for x in open(tmp_path / "run" / "events.jsonl") if '"event": "step"' in x]
    parts = [s.get("parts") or s for s in steps]
    first, last = parts[0], parts[-1]
    for k in ("hint16", "hint8", "hint4"):  # image embedding (64/16) and the two high-resolution maps
        assert k in first and k in last, sorted(first)
    assert last["hint4"] + last["hint8"] + last["hint16"] < 0.8 * (first["hint4"] + first["hint8"] + first["hint16"])
    entries = list(cache.rglob("*.pt"))
    assert len(entries) == 6  # one per training image: the frozen teacher's embedding, computed once

    # the resume state holds the projections; the model file is a plain model of the student's kind
    last_pt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert set(last_pt["extra"]["hint"]) == {f"{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    model = build_model(r["model"])
    base = build_model(STUDENT, image_size=64, random_init=True)
    assert model.arch.name == STUDENT and set(model.sam.state_dict()) == set(base.sam.state_dict())
    assert not torch.equal(model.sam.sam_mask_decoder.state_dict()["output_upscaling.0.weight"],
                           base.sam.sam_mask_decoder.state_dict()["output_upscaling.0.weight"])

    # a second run reads every teacher embedding from the cache
    hits = {}
    orig = TeacherHint.forward

    def spy(self, images, emb):
        out = orig(self, images, emb)
        hits["cache"] = self._teacher[0]._embed_cache
        return out

    TeacherHint.forward = spy
    try:
        train(cfg(data, tmp_path / "run2", teacher=str(tpath), teacher_cache=str(cache), steps=4, val_every=4),
              progress=False)
    finally:
        TeacherHint.forward = orig
    assert hits["cache"].misses == 0 and hits["cache"].hits >= 12
    assert len(list(cache.rglob("*.pt"))) == 6


def test_hint_changes_training_and_weight_zero_does_not(setup, tmp_path):
    data, tpath = setup
    plain = train(cfg(data, tmp_path / "plain", steps=3, val_every=3, seed=1), progress=False)
    zero = train(cfg(data, tmp_path / "zero", steps=3, val_every=3, seed=1, teacher=str(tpath), hint_weight=0.0),
                 progress=False)
    hinted = train(cfg(data, tmp_path / "hinted", steps=3, val_every=3, seed=1, teacher=str(tpath),
                       hint_weight=1.0), progress=False)
    assert zero["weights_digest"] == plain["weights_digest"]
    assert hinted["weights_digest"] != plain["weights_digest"]
    rows = list(csv.DictReader(open(tmp_path / "hinted" / "metrics.csv")))
    assert rows and float(rows[-1]["train_loss"]) > 0


def test_hint_refusals(setup, tmp_path):
    data, tpath = setup
    with pytest.raises(InputError, match="--teacher-cache needs --teacher"):
        cfg(data, tmp_path / "a", teacher_cache=str(tmp_path / "c"))
    with pytest.raises(InputError, match="--hint-weight -1: give 0 or more"):
        cfg(data, tmp_path / "a", teacher=str(tpath), hint_weight=-1)
    with pytest.raises(InputError, match="same input size"):
        train(cfg(data, tmp_path / "b", image_size=128, teacher=str(tpath), steps=1), progress=False)
    assert not (tmp_path / "b" / "model.pt").exists()
    with pytest.raises(InputError, match="--teacher nothing-like-this"):
        train(cfg(data, tmp_path / "c", teacher="nothing-like-this", steps=1), progress=False)
    # resume with another teacher is refused
    train(cfg(data, tmp_path / "d", teacher=str(tpath), steps=2, val_every=2), progress=False)
    with pytest.raises(InputError, match="different settings"):
        train(cfg(data, tmp_path / "d", steps=4, val_every=2, resume=True), progress=False)
