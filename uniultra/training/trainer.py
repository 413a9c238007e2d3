"""Promptable-segmentation training: ``train(TrainConfig(...))``.

The loop, checkpoints, resume, DDP, AMP, cancel and events are the one
:class:`~uniultra.training.engine.Trainer`'s; what is trained (model, data, prompts, loss) is
:class:`~uniultra.training.tasks.SegmentationTask`'s; every option with its default and check
is in :class:`~uniultra.training.config.TrainConfig` (a recipe file sets them: docs/RECIPES.md).

* Optimiser Adam/AdamW; schedules ``constant``, ``exp`` (ExponentialLR(gamma) per epoch, the
  paper's), ``poly`` (linear warm-up then poly decay, finetune-SAM), ``cosine``; gradient
  accumulation; bf16 autocast on CUDA (``amp="auto"``), fp32 elsewhere.
* Validation every ``val_every`` optimiser steps (default: every epoch) on the ``val`` split:
  mean Dice per image with seeded, 10%-jittered boxes (prompts seeded exactly as
  ``evaluate_dataset``), averaged over datasets; the best model by val Dice is kept; early stop
  after ``patience`` validations without improvement.  The test split is never read.
* Files in ``out``: ``last.pt`` (resume state), ``best.pt`` (adapter-only when the base has
  weights, else full), ``model.pt`` (the selected model; ``final_full``: a full checkpoint,
  optionally fp16), ``events.jsonl``, ``metrics.csv``, ``curves.png``, ``config.json``,
  ``config.yaml`` (the whole recipe), ``summary.json``.
* Resume (``resume=True``): restores trainable weights, optimiser, scheduler, grad scaler, the
  RNG states of torch/numpy/python and the data position; the data order depends only on
  ``(seed, epoch)`` and every sample on ``(seed, epoch, position)``, so a resumed run ends with
  the same weights, bit for bit, as an uninterrupted one on the same device and thread count.
* Cancel: ``cancel()`` returning True (or raising ``Cancelled``), or Ctrl-C (SIGINT), stops after
  the current optimiser step; the resume state is saved at that step and ``best.pt`` is left as it was.
* Multi-process: started with ``torchrun`` (``WORLD_SIZE`` > 1) it uses DistributedDataParallel
  (gloo on CPU, nccl on CUDA); each rank reads its share of every batch; only rank 0 writes files.
"""

from __future__ import annotations

from collections.abc import Callable

from uniultra.events import Progress
from uniultra.training.config import AMP_MODES, OPTIMIZERS, SCHEDULES, TrainConfig
from uniultra.training.engine import (
    Schedule,
    Trainer,
    amp_dtype,
    expand_data_dirs,
    plot_curves,
    resolve_device,
    sigint_stop,
    validate,
)
from uniultra.training.tasks import SegmentationTask, batch_layout


def train(config: TrainConfig, progress: Progress | bool | None = None, cancel: Callable[[], bool] | None = None,
          log: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) a run described by ``config``; see the module doc.

    ``progress(done, total, message)`` is called after every optimiser step (True: a console
    bar; None: a bar when ``config.progress_bar``); ``cancel()`` is polled after every step;
    ``log`` gets the human-readable lines (default: the ``uniultra`` logger).  Returns a summary
    dict (also written to ``summary.json``)."""
    return Trainer(config, SegmentationTask(), progress, cancel, log).fit()


__all__ = ["TrainConfig", "train", "Schedule", "resolve_device", "amp_dtype", "sigint_stop", "validate",
           "plot_curves", "expand_data_dirs", "batch_layout", "SCHEDULES", "OPTIMIZERS", "AMP_MODES"]
