"""UniUltraTrain runner: `uniultra train` launched as the module launches it, on a dataset exported from
the real Slicer core; cancel, resume, register, and the model used through UniUltraSegment's bridge."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from mrml_fixtures import REPO, make_volume, mrml_context
from UniUltraSegmentLib.segments import SegmentEditor, create_segmentation_for, get_or_add_segment

if str(REPO / "UniUltraTrain") not in sys.path:
    sys.path.insert(0, str(REPO / "UniUltraTrain"))
from UniUltraTrainLib import curate, runner  # noqa: E402
from UniUltraTrainLib.chart import TrainingChart  # noqa: E402

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)
STUDENT = "uniultra-student-e8"  # the smallest architecture: random weights, fast at 64 px


def _has_subcommand(name: str) -> bool:
    r = subprocess.run(runner.command([name, "--help"], sys.executable), env=runner.engine_env(),
                       capture_output=True, text=True, timeout=120)
    return r.returncode == 0


@pytest.fixture(scope="module")
def train_cli():
    if not _has_subcommand("train"):
        pytest.skip("`uniultra train` is not registered yet (uniultra/training/cli_commands.py is missing)")


@pytest.fixture(scope="module")
def distill_cli(train_cli):
    if not _has_subcommand("distill"):
        pytest.skip("`uniultra distill` is not registered yet (uniultra/training/cli_commands.py)")


def test_command_lines(tmp_path):
    o = runner.TrainOptions(data=[str(tmp_path)], out=str(tmp_path / "run"), base="sam2.1-hiera-tiny",
                            method="lora", epochs=3, lr=5e-5, image_size=256, device="cpu", register="mine")
    o.check()
    recipe = tmp_path / "run" / "recipe.yaml"
    a = runner.train_args(o)
    assert a == ["train", "--config", str(recipe)]
    o.resume = True
    assert runner.train_args(o) == ["train", "--config", str(recipe), "--resume"]
    cmd = runner.command(a, "/x/PythonSlicer")
    assert cmd[:3] == ["/x/PythonSlicer", "-m", "uniultra.cli"]
    # the recipe holds what the panel set; the engine's configuration reads it with its own defaults
    assert o.write_recipe() == recipe
    from uniultra.training.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, recipe)
    assert (cfg.model, cfg.peft, cfg.epochs, cfg.lr, cfg.image_size, cfg.device, cfg.register) == \
        ("sam2.1-hiera-tiny", "lora", 3, 5e-5, 256, "cpu", "mine")
    assert cfg.data == [str(tmp_path)] and cfg.out == str(tmp_path / "run") and cfg.progress_bar is False
    assert cfg.batch_size == TrainConfig.__dataclass_fields__["batch_size"].default  # not re-implemented here
    d = runner.DistillOptions(data=[str(tmp_path)], out=str(tmp_path / "d"), teacher="t.pt", student=STUDENT)
    assert runner.distill_args(d)[:3] == ["distill", "--config", str(tmp_path / "d" / "recipe.yaml")]
    assert d.recipe()["teacher"] == "t.pt" and d.recipe()["student"] == STUDENT and "epochs" not in d.recipe()
    env = runner.engine_env()
    assert str(REPO) in env["PYTHONPATH"].split(os.pathsep) and env["PYTHONUNBUFFERED"] == "1"
    bad = [
        ({"method": "magic"}, "adaptation method 'magic'"),
        ({"lr": 0.0}, "learning rate"),
        ({"image_size": 100}, "image-size 100"),
        ({"epochs": 0}, "epochs 0"),
        ({"register": "my model"}, "register my model"),
        ({"base": str(tmp_path / "missing.pt")}, "missing.pt' does not exist"),
        ({"data": [str(tmp_path / "nope")]}, "nope' does not exist"),
    ]
    for change, message in bad:
        kw = dict(data=[str(tmp_path)], out=str(tmp_path / "run"))
        kw.update(change)
        with pytest.raises(ValueError, match=message):
            runner.TrainOptions(**kw).check()


def test_events_metrics_and_chart(ctx, tmp_path):
    from uniultra.events import EventLog, read_events

    log = EventLog([tmp_path / "events.jsonl"], say=lambda m: None)
    log.emit("step", step=1, total_steps=4, epoch=0.25)
    log.emit("validation", step=2, val_dice=0.5, per_dataset={"ds": 0.5}, best=0.5, best_step=2, improved=True)
    events, offset = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events] == ["step", "validation"] and events[1]["per_dataset"] == {"ds": 0.5}
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"event": "step", "step": 3, "tot')  # a line still being written is left for later
    assert read_events(tmp_path / "events.jsonl", offset) == ([], offset)
    (tmp_path / "metrics.csv").write_text(
        "step,epoch,lr,train_loss,val_dice,val_ds,img_per_s,elapsed_s\n"
        "2,0.5,0.0001,1.5,,,10,1\n3,1.0,0.0001,,0.4,0.4,,2\n4,1.3,0.0001,1.2,,,11,3\n")
    m = runner.read_metrics(tmp_path / "metrics.csv")
    assert m["loss"] == [(2, 1.5), (4, 1.2)] and m["val_dice"] == [(3, 0.4)]
    assert runner.read_metrics(tmp_path / "absent.csv")["loss"] == []
    chart = TrainingChart.create(ctx.scene)
    chart.update(m)
    assert chart.values("loss") == [(2.0, 1.5), (4.0, 1.2)] and chart.values("val_dice") == [(3.0, 0.4)]
    assert chart.chart.GetNumberOfPlotSeriesNodes() == 2
    assert runner.parse_json_output('log line\n{"datasets": {"a": {"dice": 0.5}}}\n') == {"datasets": {"a": {"dice": 0.5}}}
    rows = runner.comparison_rows({"dice": 0.5, "ellipse_dice": 0.8, "boxfill_dice": 0.6},
                                  {"dice": 0.9, "ellipse_dice": 0.8, "boxfill_dice": 0.6})
    assert [r["model"] for r in rows][:2] == ["before", "after"] and rows[2]["dice"] == 0.8


def _export_tiny_dataset(ctx, out):
    """Four 2D 'ultrasound' images with a bright lesion each, labelled in the scene, exported."""
    rng = np.random.default_rng(0)
    cases = []
    for c in range(4):
        img = rng.integers(0, 60, (1, 48, 56), dtype=np.uint8)
        lab = np.zeros_like(img)
        y, x = rng.integers(6, 24, 2)
        img[0, y:y + 16, x:x + 20] += 150
        lab[0, y:y + 16, x:x + 20] = 1
        vol = make_volume(ctx, img, name=f"patient{c}")
        seg = create_segmentation_for(ctx, vol)
        sid = get_or_add_segment(seg, "lesion")
        editor = SegmentEditor(ctx)
        editor.configure(seg, vol, sid)
        from UniUltraSegmentLib.segments import oriented_image_from_array

        editor.save_state_for_undo()
        editor.modify(seg, sid, oriented_image_from_array(lab, curate.ijk_to_ras_of(vol)), "add")
        cases.append(curate.make_case(ctx, seg))
    return curate.export_dataset(cases, ["lesion"], out, val_fraction=0.25, seed=0, preview=False)


def _wait_for_step(run, step, timeout=300):  # generous: a loaded 2-core machine starts torch slowly
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        run.poll()
        if run.progress and run.progress[0] >= step:
            return
        if not run.running:
            pytest.fail("training ended before it could be cancelled:\n" + run.output()[-2000:])
        time.sleep(0.02)
    pytest.fail("no training progress:\n" + run.output()[-2000:])


def test_train_cancel_resume_register_and_segment(ctx, tmp_path, monkeypatch, train_cli):
    home = tmp_path / "home"
    monkeypatch.setenv("UNIULTRA_HOME", str(home))  # the user registry, for this process and the runs
    res = _export_tiny_dataset(ctx, tmp_path / "ds")
    assert res.counts == {"train": 3, "val": 1}
    out = tmp_path / "run"
    total = 14
    options = runner.TrainOptions(data=[str(res.out)], out=str(out), base=STUDENT, method="ch-adapter",
                                  steps=total, lr=1e-3, image_size=64, batch_size=1, device="cpu",
                                  extra_args=["--threads", "1"])
    # 1. start, cancel after a couple of steps: the resume state stays, no final model
    run = runner.TrainingRun(options, python=sys.executable).start()
    _wait_for_step(run, 2)
    run.cancel(grace_s=60)
    rc = run.wait(120)
    assert run.status == "cancelled", run.output()[-2000:]
    assert run.can_resume and not (out / "model.pt").exists(), f"rc={rc}\n" + run.output()[-2000:]
    stopped = run.progress[0]
    assert stopped < total
    # 2. resume to the end and register through the trainer
    options.resume = True
    options.register = "e8-trained"
    run2 = runner.TrainingRun(options, python=sys.executable).start()
    assert run2.wait(180) == 0, run2.output()[-3000:]
    assert run2.status == "finished"
    summary = run2.summary()
    assert summary["status"] == "finished" and summary["resumed"] is True and summary["step"] == total
    assert any("resumed" in line for line in run2.lines)  # the human line made from the start event
    assert run2.last_val is not None and run2.last_val[0] == total  # from events.jsonl, not from printed text
    kinds = [e["event"] for e in run2.events]
    assert kinds[0] == "start" and kinds[-1] == "finished" and "validation" in kinds and "checkpoint" in kinds
    m = run2.metrics()
    assert m["val_dice"] and m["val_dice"][-1][0] == total and m["loss"]
    assert (out / "model.pt").is_file() and (out / "slicer-train.log").is_file()
    # 3. validation Dice of the trained model next to the baselines, through `uniultra evaluate`
    after = runner.evaluate(str(out / "model.pt"), res.out, "val", "cpu", python=sys.executable, timeout=420)
    assert after["n_images"] == res.counts["val"]
    # model.pt is the best by validation, and validation scores exactly as `uniultra evaluate` does
    assert after["dice"] == pytest.approx(summary["best_val_dice"], abs=1e-3)
    assert after["ellipse_dice"] > 0.5 and after["boxfill_dice"] > 0.5  # a rectangle: the box baselines fit it
    # 4. register with provenance; both entries appear in the engine registry
    entry = runner.register_model("e8-slicer", out, options, before=None, after=after)
    from uniultra.models.registry import load_registry

    reg = load_registry()
    assert {"e8-trained", "e8-slicer"} <= set(reg)
    e = reg["e8-slicer"]
    assert e.source == "user" and e.installed and e.image_size == 64 and e.arch == STUDENT
    assert e.extra["base"] == STUDENT and e.extra["method"] == "ch-adapter" and e.extra["date"]
    assert e.extra["data"]["ds"]["count"] == res.counts and e.extra["val_dice_after"] == after["dice"]
    assert entry.name == "e8-slicer"
    # 5. UniUltraSegment's engine bridge loads the model by name and by file and segments with it
    from UniUltraSegmentLib.engine import load_predictor, predict_mask

    image = np.zeros((48, 56), np.uint8)
    image[10:26, 12:32] = 200
    for model in ("e8-slicer", str(out / "model.pt")):
        predictor = load_predictor(model, device="cpu")
        mask = predict_mask(predictor, image, boxes=[(12, 10, 31, 25)])
        assert mask.shape == (48, 56) and mask.dtype == bool


def test_distill_and_compare(ctx, tmp_path, monkeypatch, distill_cli):
    monkeypatch.setenv("UNIULTRA_HOME", str(tmp_path / "home"))
    res = _export_tiny_dataset(ctx, tmp_path / "ds")
    teacher = runner.TrainOptions(data=[str(res.out)], out=str(tmp_path / "teacher"), base="uniultra-student-e16",
                                  steps=2, lr=1e-3, image_size=64, batch_size=1, device="cpu")
    t = runner.TrainingRun(teacher, python=sys.executable).start()
    assert t.wait(180) == 0, t.output()[-3000:]
    options = runner.DistillOptions(data=[str(res.out)], out=str(tmp_path / "student"),
                                    teacher=str(tmp_path / "teacher" / "model.pt"), student=STUDENT, steps=2,
                                    lr=1e-3, image_size=64, batch_size=1, device="cpu", register="tiny-student")
    run = runner.TrainingRun(options, python=sys.executable).start()
    assert run.wait(180) == 0, run.output()[-3000:]
    assert run.status == "finished" and run.progress == (2, 2)
    assert run.last_val is not None and run.last_val[0] == 2  # the distillation's validation reaches the panel
    student = (run.summary() or {}).get("model") or str(tmp_path / "student" / "model.pt")
    rows = runner.compare_models({"teacher": options.teacher, "student": student}, res.out, "val", "cpu",
                                 python=sys.executable, timeout=420)
    assert [r["model"] for r in rows] == ["teacher", "student"]
    assert all(r["seconds_per_image"] > 0 for r in rows)
    # the teacher's Dice is the one its training run's validation reported for its model.pt
    assert rows[0]["dice"] == pytest.approx(t.summary()["best_val_dice"], abs=1e-3)
    assert rows[1]["dice"] is not None and rows[1]["ellipse_dice"] == pytest.approx(rows[0]["ellipse_dice"])
