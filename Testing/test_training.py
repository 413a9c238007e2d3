"""Trainer: losses on known inputs, learning, bit-identical resume, cancel, adapter-only
checkpoints, 2-process DDP (gloo) and the CLI subcommands.  Tiny synthetic data, 64 px models."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic import make_dataset

from uniultra.errors import InputError
from uniultra.training.losses import (
    LossWeights,
    bce_loss,
    dice_loss,
    focal_loss,
    iou_mse_loss,
    segmentation_loss,
)
from uniultra.training.trainer import Schedule, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
STUDENT = "uniultra-student-e8"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "syn")


def cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=[str(data)], out=str(out), model=STUDENT, image_size=64, steps=4, batch_size=2, lr=2e-3,
                optimizer="adamw", schedule="cosine", val_every=2, progress_bar=False, threads=1, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def trained(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["trainable"]


# ------------------------------------------------------------------------------------ losses
def test_losses_known_values():
    t = torch.zeros(1, 1, 4, 4)
    t[..., :2, :] = 1
    perfect = (t * 2 - 1) * 50
    assert dice_loss(perfect, t).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-perfect, t).item() == pytest.approx(1 - 1 / 17, abs=1e-4)  # eps=1: 1 / (8 + 8 + 1)
    zero = torch.zeros_like(t)
    assert bce_loss(zero, t).item() == pytest.approx(math.log(2), abs=1e-6)
    # focal at p = 0.5: alpha-weighted CE * 0.25; positives alpha 0.25, negatives 0.75, half each
    assert focal_loss(zero, t).item() == pytest.approx(math.log(2) * 0.25 * 0.5, abs=1e-6)
    assert focal_loss(perfect, t).item() < 1e-8
    assert iou_mse_loss(torch.tensor([1.0]), perfect, t).item() == pytest.approx(0.0)
    assert iou_mse_loss(torch.tensor([1.0]), -perfect, t).item() == pytest.approx(1.0)
    w = LossWeights.parse("dice=2,focal=0,iou=0")
    loss, parts = segmentation_loss(-perfect, t, w)
    assert loss.item() == pytest.approx(2 * parts["dice"]) and "focal" not in parts
    # multimask: the loss is taken on the mask with the highest actual IoU, upsampled to the target
    two = torch.cat([-perfect, perfect], 1)[..., ::2, ::2]  # [1, 2, 2, 2] at half resolution
    best, _ = segmentation_loss(two, t, LossWeights.parse("dice=1,focal=0,iou=0"))
    assert best.item() < 0.05
    assert LossWeights.parse("sam-unet").dice == 20 and LossWeights.parse(None).focal == 20
    with pytest.raises(ValueError):
        LossWeights.parse("dice=1,unknown=3")


def test_schedules():
    exp = Schedule("exp", total=100, per_epoch=10, gamma=0.5)
    assert exp(0) == 1.0 and exp(10) == 0.5 and exp(25) == 0.25
    poly = Schedule("poly", total=100, per_epoch=10, warmup=10)
    assert poly(0) == pytest.approx(0.1) and poly(10) == pytest.approx(1.0) and poly(100) == pytest.approx(0.0)
    cos = Schedule("cosine", total=100, per_epoch=10, floor=0.1)
    assert cos(0) == pytest.approx(1.0) and cos(100) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------ training
def test_few_steps_reduce_loss(data, tmp_path):
    out = tmp_path / "run"
    r = train(cfg(data, out, steps=10, val_every=10, augment=False, schedule="constant", lr=3e-3,
                  loss_weights="dice=1,focal=20,iou=0", log_every=2, batch_size=2), progress=False)
    assert r["status"] == "finished" and r["step"] == 10
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    losses = [float(x["train_loss"]) for x in rows if x["train_loss"]]
    assert losses[-1] < 0.7 * losses[0], losses
    for f in ("best.pt", "model.pt", "last.pt", "metrics.csv", "curves.png", "summary.json", "config.json"):
        assert (out / f).is_file(), f
    assert {"step", "epoch", "lr", "train_loss", "val_dice", "val_syn", "img_per_s", "elapsed_s"} <= set(rows[0])
    from uniultra.models import build_model

    m = build_model(str(out / "model.pt"))
    assert m.image_size == 64 and m.arch.name == STUDENT


def test_resume_is_bit_identical_and_cancel_keeps_last_good(data, tmp_path):
    a = tmp_path / "a"
    ra = train(cfg(data, a), progress=False)
    assert ra["status"] == "finished"

    b = tmp_path / "b"
    calls = {"n": 0}

    def cancel():  # polled after every step: stop after step 3 (one step after the step-2 validation)
        calls["n"] += 1
        return calls["n"] >= 3

    rb = train(cfg(data, b), progress=False, cancel=cancel)
    assert rb["status"] == "cancelled" and rb["step"] == 3
    assert not (b / "model.pt").exists()
    assert json.loads((b / "summary.json").read_text())["status"] == "cancelled"
    last = torch.load(b / "last.pt", map_location="cpu", weights_only=False)
    assert last["state"]["step"] == 3
    best = torch.load(b / "best.pt", map_location="cpu", weights_only=True)  # last good model (step 2)
    assert best["uniultra"]["step"] == 2

    with pytest.raises(InputError, match="already holds a run"):
        train(cfg(data, b), progress=False)
    rb2 = train(cfg(data, b, resume=True), progress=False)
    assert rb2["status"] == "finished" and rb2["resumed"] and rb2["step"] == 4
    wa, wb = trained(a / "last.pt"), trained(b / "last.pt")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = torch.load(a / "last.pt", map_location="cpu", weights_only=False)["optimizer"]["state"]
    ob = torch.load(b / "last.pt", map_location="cpu", weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"]) for k in oa)
    ha = [r for r in csv.DictReader(open(a / "metrics.csv"))]
    hb = [r for r in csv.DictReader(open(b / "metrics.csv"))]
    assert [(r["step"], r["train_loss"], r["val_dice"]) for r in ha] == \
        [(r["step"], r["train_loss"], r["val_dice"]) for r in hb]
    with pytest.raises(InputError, match="different settings"):
        train(cfg(data, b, resume=True, lr=1e-2), progress=False)


def test_adapter_only_checkpoint_is_small_and_reloads(data, tmp_path):
    from uniultra.models import build_model
    from uniultra.models.checkpoint import sha256_file

    base = build_model("sam2.1-hiera-tiny", image_size=64, random_init=True)
    base_path = tmp_path / "base.pt"
    torch.save({"model": base.sam.state_dict()}, base_path)  # a Meta-format base checkpoint
    out = tmp_path / "lora"
    r = train(cfg(data, out, model=str(base_path), peft="lora", peft_options={"rank": 2}, steps=2, val_every=2,
                  final_full=True), progress=False)
    assert r["adapter_only"] and r["status"] == "finished"
    model_pt, full_pt = out / "model.pt", out / "model_full.pt"
    assert model_pt.stat().st_size < 0.05 * full_pt.stat().st_size
    ck = torch.load(model_pt, map_location="cpu", weights_only=True)
    assert "trained" in ck and ck["uniultra"]["base_sha256"] == sha256_file(base_path)
    assert ck["uniultra"]["base"] == str(base_path.resolve())
    m = build_model(str(model_pt))
    p = dict(m.sam.named_parameters())
    assert all(torch.equal(p[k], v.float()) for k, v in ck["trained"].items())
    x = torch.randn(1, 3, 64, 64)
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    with torch.no_grad():
        a = m(x, boxes=box)
        b = build_model(str(full_pt))(x, boxes=box)
    assert torch.allclose(a, b, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    r = train(cfg(Path(data), Path(out), steps=2, val_every=2, threads=1), progress=False)
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps({"digest": r["weights_digest"], "step": r["step"],
                                                                "world": r["world_size"],
                                                                "val": r["best_val_dice"]}))


def test_two_process_gloo_ends_with_identical_weights(data, tmp_path):
    import torch.multiprocessing as mp

    res = tmp_path / "res"
    res.mkdir()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(data), str(tmp_path / "ddp"), str(res)), nprocs=2,
                       join=True, start_method="spawn")
    r0, r1 = (json.loads((res / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["world"] == 2 and r0["step"] == 2 and r0["digest"] == r1["digest"] and r0["val"] == r1["val"]
    assert (tmp_path / "ddp" / "model.pt").is_file()  # written by rank 0 only


# ------------------------------------------------------------------------------------ CLI
def _parser():
    from uniultra.training.cli_commands import add_distill_parser, add_train_parser

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    add_train_parser(sub)
    add_distill_parser(sub)
    return ap


def test_cli_parsers_and_input_errors(data, tmp_path):
    ap = _parser()
    a = ap.parse_args(["train", "--model", STUDENT, "--data", str(data), "--data", str(data), "--out", str(tmp_path),
                       "--no-augment", "--two-pass", "--lora-rank", "8", "--loss-weights", "sam-unet"])
    assert a.data == [str(data), str(data)] and a.augment is False and a.two_pass is True and a.lora_rank == 8
    assert a.func.__name__ == "run_train"
    d = ap.parse_args(["distill", "--teacher", "t.pt", "--data", str(data), "--out", str(tmp_path),
                       "--no-level-terms", "--cache-features", str(tmp_path / "c")])
    assert d.level_terms is False and d.func.__name__ == "run_distill"
    from uniultra.training.cli_commands import config_from_args
    from uniultra.training.config import DistillConfig

    w = config_from_args(DistillConfig, ap.parse_args(["distill", "--teacher", "t.pt", "--data", str(data), "--out",
                                                       str(tmp_path), "--level-weight", "0.1", "--fpn-weight", "2"]))
    assert (w.level_weight, w.fpn_weight) == (0.1, 2.0)
    bad = [(["--lr", "0"], "--lr"), (["--image-size", "100"], "--image-size 100"),
           (["--peft", "magic"], "magic"), (["--loss-weights", "dice=1,x=2"], "--loss-weights")]
    for extra, msg in bad:
        args = ap.parse_args(["train", "--model", STUDENT, "--data", str(data), "--out", str(tmp_path / "bad"),
                              "--steps", "1", "--image-size", "64", "--no-progress", *extra])
        with pytest.raises(InputError, match=msg):
            args.func(args)
    args = ap.parse_args(["train", "--model", STUDENT, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x"),
                          "--steps", "1", "--image-size", "64"])
    with pytest.raises(InputError, match="nope"):
        args.func(args)


def test_train_default_script_small(data, tmp_path):
    out = tmp_path / "mini" / "mini.pt"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train_default.py"), "--data-root", str(data.parent),
                        "--datasets", "syn", "--steps", "2", "--batch-size", "2", "--image-size", "64",
                        "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(out, map_location="cpu", weights_only=True)
    info = ck["uniultra"]
    assert info["name"] == "uniultra-mini-us" and info["datasets"] == ["syn"] and "val_dice" in info
    assert all(v.dtype == torch.float16 for v in ck["model"].values() if v.is_floating_point())
    assert (out.parent / "mini.metrics.csv").is_file() and "syn" in r.stdout


def test_validation_dice_equals_evaluate_dice(data):
    """The trainer's validation and `uniultra evaluate` draw the same prompts (one generator) and
    score them the same way: the same numbers for the same model, split, seed and jitter.  The
    model has learnt nothing much, so its masks are partial and the Dice is not trivially 0 or 1."""
    from uniultra.evaluation import evaluate_dataset
    from uniultra.inference import Predictor
    from uniultra.models import build_model
    from uniultra.training.data import val_set
    from uniultra.training.validation import validate

    torch.manual_seed(0)
    model = build_model(STUDENT, image_size=64, random_init=True).eval()
    val = validate(model, val_set([data], "val", jitter=0.1, seed=4), torch.device("cpu"), batch=2)
    p = Predictor(model, "cpu")

    def seg(image, boxes, points, labels):
        p.set_image(image)
        return p.predict(boxes=boxes)

    ev = evaluate_dataset(seg, data, split="val", jitter=0.1, seed=4, progress=False)["datasets"]["syn"]
    assert ev["n_images"] == 3
    assert val["syn"] == pytest.approx(ev["dice"], abs=1e-4)
    other = evaluate_dataset(seg, data, split="val", jitter=0.1, seed=5, progress=False)["datasets"]["syn"]["dice"]
    assert other != pytest.approx(ev["dice"], abs=1e-4)  # the seed matters: the match above is not luck
