"""The Train panel's stages (UniUltraTrainLib.session.TrainSession), without Qt: measure the base,
train or distill, measure the result (and the teacher), cancel and failures at each stage.  The
processes are stand-ins with the interface of runner.TrainingRun / runner.EngineProcess; the real
processes are covered by test_mrml_train_run.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mrml_fixtures import REPO

if str(REPO / "UniUltraTrain") not in sys.path:
    sys.path.insert(0, str(REPO / "UniUltraTrain"))
from UniUltraTrainLib.runner import DistillOptions, TrainOptions  # noqa: E402
from UniUltraTrainLib.session import TrainSession  # noqa: E402


def _evaluation_json(dice):
    return json.dumps({"datasets": {"us": {"dice": dice, "ellipse_dice": 0.5, "boxfill_dice": 0.4,
                                           "n_images": 4, "seconds": 2.0}}}, indent=1)


class StandInProcess:
    """An evaluation: running until the test ends it."""

    def __init__(self, model, data):
        self.model, self.data = model, data
        self.returncode = None
        self.cancel_requested = False
        self.pending: list[str] = []
        self.lines: list[str] = []
        self.cancelled_with = None

    @property
    def running(self):
        return self.returncode is None

    def end(self, rc, output=""):
        self.pending += output.splitlines()
        self.returncode = rc

    def poll(self):
        new, self.pending = self.pending, []
        self.lines += new
        return new

    def wait(self, timeout=None):
        assert self.returncode is not None
        return self.returncode

    def output(self):
        return "\n".join(self.lines)

    def cancel(self, grace_s=30.0):
        self.cancel_requested, self.cancelled_with = True, grace_s


class StandInRun(StandInProcess):
    """A training run: progress and validation as the runner reads them from its events."""

    def __init__(self, options):
        super().__init__(None, None)
        self.options = options
        self.out = Path(options.out)
        self.cmd = ["python", "-m", "uniultra.cli", "train", "--config", str(self.out / "recipe.yaml")]
        self.progress = None
        self.last_val = None
        self.status = "running"
        self._summary = None

    def finish(self, status, rc=0, summary=None):
        self.status, self.returncode, self._summary = status, rc, summary

    def summary(self):
        return self._summary

    def error_message(self):
        return "out of memory"


class Launcher:
    def __init__(self, fail_training=False):
        self.runs, self.evaluations = [], []
        self.fail_training = fail_training

    def train(self, options):
        if self.fail_training:
            raise OSError("PythonSlicer not found")
        self.runs.append(StandInRun(options))
        return self.runs[-1]

    def evaluate(self, model, data):
        self.evaluations.append(StandInProcess(model, data))
        return self.evaluations[-1]


def _session(tmp_path, launcher, distill=False, measure_before=True):
    if distill:
        options = DistillOptions(data=[str(tmp_path / "ds")], out=str(tmp_path / "run"), teacher="teacher-model")
    else:
        options = TrainOptions(data=[str(tmp_path / "ds")], out=str(tmp_path / "run"), base="base-model")
    return TrainSession(options, distill=distill, measure_before=measure_before,
                        start_training=launcher.train, start_evaluation=launcher.evaluate)


def test_measure_train_measure_done(tmp_path):
    la = Launcher()
    s = _session(tmp_path, la)
    u = s.start()
    assert s.active and s.stage == "measuring" and u.status == "Measuring the base model..."
    (before,) = la.evaluations
    assert (before.model, before.data) == ("base-model", str(tmp_path / "ds")) and not la.runs
    assert s.poll().log == [] and not la.runs  # still measuring
    before.end(0, "loading...\n" + _evaluation_json(0.61))
    u = s.poll()
    assert u.log[0] == "loading..." and not any(line.lstrip().startswith(("{", "}", '"')) for line in u.log)
    assert s.results["before"]["dice"] == pytest.approx(0.61) and u.results_changed
    (run,) = la.runs
    assert u.training_started and u.status == "Training..." and u.log[-1].startswith("$ python -m uniultra.cli train")
    assert s.stage == "training" and not s.can_register

    run.pending, run.progress, run.last_val = ["step 3"], (3, 10), (3, 0.8)
    u = s.poll()
    assert u.log == ["step 3"] and u.progress == (3, 10) and u.status == "step 3/10, last val Dice 0.800"
    assert not u.training_ended and not u.ended

    run.finish("finished", summary={"best_val_dice": 0.83, "model": str(tmp_path / "run" / "best.pt")})
    u = s.poll()
    assert u.training_ended and s.results["training best"] == {"dice": 0.83}
    assert u.status == "Finished; measuring the trained model..." and s.stage == "measuring"
    after = la.evaluations[-1]
    assert after.model == str(tmp_path / "run" / "best.pt") and len(la.evaluations) == 2
    after.end(0, _evaluation_json(0.9))
    u = s.poll()
    assert u.ended and u.models_changed and u.results_changed and u.error is None
    assert s.stage == "done" and not s.active and s.can_register
    assert s.results["after"]["dice"] == pytest.approx(0.9) and len(la.runs) == 1
    assert s.poll().log == []  # nothing more happens


def test_distill_measures_student_then_teacher(tmp_path):
    la = Launcher()
    s = _session(tmp_path, la, distill=True, measure_before=False)
    u = s.start()
    assert u.training_started and not la.evaluations and s.base == "teacher-model"
    la.runs[0].finish("finished", summary={"best_val_dice": 0.7})
    s.poll()
    assert la.evaluations[0].model == str(tmp_path / "run" / "model.pt")  # no model in the summary: model.pt
    la.evaluations[0].end(0, _evaluation_json(0.7))
    u = s.poll()
    assert not u.ended and la.evaluations[1].model == "teacher-model"
    la.evaluations[1].end(0, _evaluation_json(0.8))
    assert s.poll().ended and set(s.results) == {"training best", "after", "teacher"}


def test_cancel_while_measuring_the_base_trains_nothing(tmp_path):
    la = Launcher()
    s = _session(tmp_path, la)
    s.start()
    u = s.cancel()
    assert la.evaluations[0].cancelled_with == 5 and u.status is None
    la.evaluations[0].end(-2)
    u = s.poll()
    assert u.ended and u.status == "Cancelled before training started." and s.stage == "cancelled"
    assert not la.runs and not s.active and "evaluation (before) failed" in u.log[-1]


def test_cancel_during_training_keeps_resume_state(tmp_path):
    la = Launcher()
    s = _session(tmp_path, la, measure_before=False)
    s.start()
    u = s.cancel()
    assert la.runs[0].cancel_requested and u.status.startswith("Stopping after the current step")
    la.runs[0].finish("cancelled", rc=0)
    u = s.poll()
    assert u.ended and u.training_ended and s.stage == "cancelled" and "Resume" in u.status
    assert not la.evaluations and not s.can_register


def test_failed_training_is_reported_once(tmp_path):
    la = Launcher()
    s = _session(tmp_path, la, measure_before=False)
    s.start()
    la.runs[0].finish("failed", rc=1)
    u = s.poll()
    assert u.ended and u.error == "Training failed:\nout of memory" and u.status == "Training failed: out of memory"
    assert s.stage == "failed" and not la.evaluations
    assert s.poll().error is None


def test_a_launch_that_fails_ends_the_session(tmp_path):
    s = _session(tmp_path, Launcher(fail_training=True), measure_before=False)
    u = s.start()
    assert u.ended and "PythonSlicer not found" in u.error and not s.active and s.stage == "failed"
    with pytest.raises(RuntimeError, match="already started"):
        s.start()


def test_unreadable_measurement_is_logged_and_training_goes_on(tmp_path):
    la = Launcher()
    s = _session(tmp_path, la)
    s.start()
    la.evaluations[0].end(0, "no json here")
    u = s.poll()
    assert any("could not read the evaluation" in line for line in u.log)
    assert "before" not in s.results and u.training_started and len(la.runs) == 1


def test_cancel_while_measuring_the_student_skips_the_teacher(tmp_path):
    la = Launcher()
    s = _session(tmp_path, la, distill=True, measure_before=False)
    s.start()
    la.runs[0].finish("finished", summary={})
    s.poll()
    s.cancel()
    la.evaluations[0].end(-2)
    u = s.poll()
    assert u.ended and s.stage == "done" and len(la.evaluations) == 1 and s.can_register
