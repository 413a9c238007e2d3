"""The Train panel's multi-stage run, without Qt: what happens after Start, in what order.

Stages: optionally measure the base model on the validation split ("before"), train or distill,
then measure the result ("after") and, after a distillation, the teacher ("teacher"); then done.
Cancel works in every stage: during "before" nothing is trained; during training the trainer
stops after its step and keeps its resume state; during the last measurements only the
measurement stops.

:class:`TrainSession` owns that state (the processes, the queue of measurements, the results);
the panel (UniUltraTrain.py) creates one per Start, calls :meth:`TrainSession.start`,
:meth:`~TrainSession.poll` from its timer and :meth:`~TrainSession.cancel`, and shows each
:class:`Update` it gets back (log lines, status line, progress, tables, buttons).  Processes are
started through the two callables it is given, so tests drive it with stand-ins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import runner


@dataclass
class Update:
    """What the panel shows after a call; empty fields mean "no change"."""

    log: list[str] = field(default_factory=list)
    status: str | None = None  # the status line
    progress: tuple[int, int] | None = None  # (done, total) training steps
    training_started: bool = False  # a training process started: set up the chart
    training_ended: bool = False  # it ended: draw the chart's final state
    results_changed: bool = False  # refill the result tables
    ended: bool = False  # the session is over: buttons back, timer off
    models_changed: bool = False  # a new model exists: refresh the model lists
    error: str | None = None  # show this in an error dialog


class TrainSession:
    """One Start of the Train (or Distill) panel.

    ``start_training(options)`` returns a started :class:`runner.TrainingRun`;
    ``start_evaluation(model, data)`` a started :class:`runner.EngineProcess` of
    ``uniultra evaluate --json``."""

    def __init__(self, options, *, distill: bool, measure_before: bool,
                 start_training: Callable, start_evaluation: Callable):
        self.options = options
        self.distill = distill
        self._start_training = start_training
        self._start_evaluation = start_evaluation
        self.results: dict[str, dict] = {}  # "before", "after", "teacher", "training best"
        self.queue: list[tuple[str, str, str]] = []  # (key, model, data) measurements still to run
        if measure_before:
            self.queue.append(("before", self.base, self.data))
        self.run = None  # the TrainingRun, once started
        self.evaluation = None  # the EngineProcess of the measurement in progress
        self.eval_key: str | None = None
        self.stage = "new"  # "measuring", "training", "done", "cancelled" or "failed"

    @property
    def base(self) -> str:
        """The model training starts from (the teacher of a distillation)."""
        return self.options.teacher if self.distill else self.options.base

    @property
    def data(self) -> str:
        """The dataset measured on (the first of the run's datasets)."""
        return self.options.data[0]

    @property
    def active(self) -> bool:
        """A process of this session is running or about to (Start stays disabled)."""
        return self.stage in ("measuring", "training")

    @property
    def can_register(self) -> bool:
        return self.run is not None and not self.run.running and self.run.status == "finished"

    # ------------------------------------------------------------------ driving it
    def start(self) -> Update:
        if self.stage != "new":
            raise RuntimeError("this session was already started")
        u = Update()
        if self.queue:
            u.status = "Measuring the base model..."
            self._next_evaluation(u)
        else:
            u.status = "Training..."
            self._train(u)
        return u

    def poll(self) -> Update:
        """New output and what follows from it (the next stage starts here); never blocks for long."""
        u = Update()
        if self.evaluation is not None:
            ev = self.evaluation
            u.log += [line for line in ev.poll() if not line.lstrip().startswith(("{", "}", '"'))]
            if not ev.running and ev.returncode is not None:
                ev.wait(5)
                self._evaluation_done(ev, u)
        elif self.run is not None and self.stage == "training":
            self._poll_training(u)
        return u

    def cancel(self) -> Update:
        u = Update()
        if self.evaluation is not None and self.evaluation.running:
            self.queue = []
            self.evaluation.cancel(grace_s=5)
        if self.run is not None and self.run.running:
            self.run.cancel()
            u.status = "Stopping after the current step; the last checkpoint is kept (Resume continues)."
        return u

    # ------------------------------------------------------------------ stages
    def _train(self, u: Update) -> None:
        self.stage = "training"
        try:
            self.run = self._start_training(self.options)
        except Exception as exc:  # noqa: BLE001 - any launch failure ends the session with its message
            self._could_not_start(u, "training", exc)
            return
        u.log.append(f"$ {' '.join(self.run.cmd)}")
        u.training_started = True

    def _next_evaluation(self, u: Update) -> None:
        self.stage = "measuring"
        key, model, data = self.queue.pop(0)
        self.eval_key = key
        u.log.append(f"evaluating {model} on the validation split ({key})...")
        try:
            self.evaluation = self._start_evaluation(model, data)
        except Exception as exc:  # noqa: BLE001
            self.queue = []
            self._could_not_start(u, f"the evaluation ({key})", exc)

    def _could_not_start(self, u: Update, what: str, exc: Exception) -> None:
        self._end(u, "failed", f"Could not start {what}: {exc}")
        u.error = f"Could not start {what}:\n{exc}"

    def _end(self, u: Update, stage: str, status: str) -> None:
        self.stage = stage
        u.ended = True
        u.status = status

    def _poll_training(self, u: Update) -> None:
        run = self.run
        u.log += run.poll()
        if run.progress:
            done, total = run.progress
            u.progress = (done, total)
            u.status = f"step {done}/{total}" + (f", last val Dice {run.last_val[1]:.3f}" if run.last_val else "")
        if run.running:
            return
        run.wait(10)
        status = run.status
        u.log.append(f"training {status} (exit status {run.returncode})")
        u.training_ended = True
        if status == "finished":
            summary = run.summary() or {}
            self.results["training best"] = {"dice": summary.get("best_val_dice")}
            model = summary.get("model") or str(run.out / "model.pt")
            self.queue.append(("after", model, self.data))
            if self.distill:
                self.queue.append(("teacher", self.options.teacher, self.data))
            u.status = "Finished; measuring the trained model..."
            self._next_evaluation(u)
        elif status == "cancelled":
            self._end(u, "cancelled", "Cancelled. Press Resume to continue from the last checkpoint.")
        else:
            self._end(u, "failed", "Training failed: " + run.error_message())
            u.error = "Training failed:\n" + run.error_message()

    def _evaluation_done(self, ev, u: Update) -> None:
        key = self.eval_key
        self.evaluation = None
        if ev.returncode == 0:
            try:
                self.results[key] = runner.summarize_evaluation(runner.parse_json_output(ev.output()))
            except ValueError as exc:
                u.log.append(f"could not read the evaluation: {exc}")
        else:
            u.log.append(f"evaluation ({key}) failed: " + "\n".join(ev.lines[-3:]))
        if key == "before":
            if ev.cancel_requested:
                self._end(u, "cancelled", "Cancelled before training started.")
                return
            u.status = "Training..."
            u.results_changed = True
            self._train(u)
            return
        if self.queue:
            self._next_evaluation(u)
            return
        self._end(u, "done", "Done. Review the result and register the model.")
        u.results_changed = True
        u.models_changed = True
