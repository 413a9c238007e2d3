"""The one training loop: :class:`Trainer` runs a :class:`Task` (what is trained and its loss).

The trainer owns everything two training jobs have in common:

* devices and processes: CPU/CUDA/MPS, ``torchrun`` (``WORLD_SIZE`` > 1: DistributedDataParallel,
  gloo on CPU, nccl on CUDA; each rank reads its share of every batch; only rank 0 writes files);
* the data order (:class:`~uniultra.training.data.EpochSampler`: a sample depends only on
  ``(seed, epoch, position)``), optimiser (Adam/AdamW), LR schedule, gradient accumulation with
  ``no_sync``, AMP (bf16/fp16 autocast on CUDA, a grad scaler for fp16), gradient clipping;
* validation every ``val_every`` steps, the best model by mean val Dice, early stop
  (``patience``), a time limit;
* checkpoints through :class:`CheckpointSaver`: ``last.pt`` (resume state: trained weights,
  optimiser, scheduler, scaler, RNG states, loop position; refused when the settings differ),
  ``best.pt``, ``model.pt`` (the best, or the last without a val split), ``model_full.pt``;
* stopping: ``cancel()`` returning True or raising :class:`~uniultra.errors.Cancelled`, the
  progress callback raising it, or Ctrl-C (SIGINT) stop after the current step with the resume
  state saved; ``best.pt`` stays as it was;
* records: ``events.jsonl`` (see :mod:`uniultra.events`; the human log lines are made from the
  same events), ``metrics.csv``, ``curves.png``, ``config.json``/``config.yaml``, ``summary.json``,
  and registration in the user model registry.

A task (:mod:`uniultra.training.tasks`) supplies only what differs: the model, the data, the
loss module and the checkpoint metadata.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from uniultra.device import pick_device
from uniultra.errors import Cancelled, InputError
from uniultra.events import EventLog, Progress, console_progress
from uniultra.training.config import AMP_MODES, SCHEDULES, RunConfig, to_yaml
from uniultra.training.validation import validate


# ------------------------------------------------------------------------------------ helpers
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """:func:`uniultra.device.pick_device` (``cuda``/``auto`` mean this DDP process's GPU)."""
    return pick_device(name, local_rank)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode not in AMP_MODES:
        raise InputError(f"--amp {mode}: use one of {', '.join(AMP_MODES)}")
    if device.type != "cuda":
        return None  # autocast is not used on CPU/MPS (slower or unsupported there)
    if mode in ("auto", "bf16"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if mode == "fp16" else None


class Schedule:
    """LR factor per optimiser step (a picklable callable for LambdaLR)."""

    def __init__(self, kind: str, total: int, per_epoch: int, warmup: int = 0, gamma: float = 0.98,
                 power: float = 0.9, floor: float = 0.0):
        if kind not in SCHEDULES:
            raise InputError(f"--schedule {kind}: use one of {', '.join(SCHEDULES)}")
        self.kind, self.total, self.per_epoch = kind, max(1, total), max(1, per_epoch)
        self.warmup, self.gamma, self.power, self.floor = int(warmup), gamma, power, floor

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "exp":
            return self.gamma ** (step // self.per_epoch)
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "poly":
            return max(self.floor, (1.0 - frac) ** self.power)
        return self.floor + (1 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def sigint_stop(on_first: Callable[[], None] | None = None) -> tuple[dict, Callable[[], None]]:
    """Ctrl-C asks a training loop to stop after the current step (``stop["flag"]`` turns
    true; a second Ctrl-C aborts).  Returns ``(stop, restore)``; call ``restore()`` when the
    loop ends.  Outside the main thread (e.g. Slicer's worker) no handler is installed."""
    stop = {"flag": False}
    if threading.current_thread() is not threading.main_thread():
        return stop, lambda: None

    def _on_sigint(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        if on_first is not None:
            on_first()
    old = signal.signal(signal.SIGINT, _on_sigint)
    return stop, (lambda: None) if old is None else (lambda: signal.signal(signal.SIGINT, old))


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C: the main process stops cleanly after the current step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def expand_data_dirs(dirs) -> list[Path]:
    from uniultra.data.datasets import find_datasets

    out: list[Path] = []
    if not dirs:
        raise InputError("--data: give at least one dataset folder (images/, masks/, split.csv)")
    for d in dirs:
        p = Path(d).expanduser()
        if not p.exists():
            raise InputError(f"--data {d}: folder not found; check the path")
        out.extend(find_datasets(p))
    return out


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    from uniultra.fileio import atomic_write_csv

    atomic_write_csv(path, rows, fields)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """Training loss and validation Dice against the optimiser step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from uniultra.data.io import atomic_write

    tr = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    va = [(r["step"], r["val_dice"]) for r in rows if r.get("val_dice") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        ax.plot(*zip(*tr), color="tab:blue", lw=1, label="train loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.set_yscale("log")
    if va:
        ax2 = ax.twinx()
        ax2.plot(*zip(*va), "o-", color="tab:red", ms=3, label="val Dice")
        ax2.set_ylabel("val Dice (jittered boxes)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _scalar(v) -> float:
    return float(v.detach()) if torch.is_tensor(v) else float(v)


# ------------------------------------------------------------------------------------ task
class Task:
    """What a training job trains and how its loss is computed (the rest is the Trainer's).

    ``setup(trainer)`` sets: ``model`` (the :class:`~uniultra.models.UniUltraModel` that is
    validated and saved), ``module`` (an ``nn.Module`` whose ``forward(*inputs)`` returns
    ``(loss, parts)``; DDP wraps it), ``dataset`` (indexed by ``(index, salt)``), ``weights``
    (sampling weights or None), ``vals`` (``ValImage`` s), ``roots`` and ``data_counts``."""

    name = "train"
    adapter_only = False     # best/model files: the trained parameters only (+ the base's identity)
    half = False             # best/model files in fp16
    model = module = dataset = weights = None
    vals: list = []
    roots: list = []         # dataset folders
    data_counts: dict = {}   # training images per dataset name

    def setup(self, trainer: Trainer) -> None:
        raise NotImplementedError

    def inputs(self, batch: dict, device: torch.device) -> tuple:
        """The CPU batch -> the arguments of ``module.forward`` on ``device``."""
        return ({k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()},)

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's parameters that train (saved in the resume state by name)."""
        return [(n, p) for n, p in self.model.sam.named_parameters() if p.requires_grad]

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """Other modules that train and are discarded afterwards (e.g. projections)."""
        return {}

    def checkpoint_meta(self) -> dict:
        return {}

    def title(self) -> str:
        return f"{self.model.arch.name} @ {self.model.image_size}px"

    def registration(self, cfg) -> tuple[str | None, str, dict]:
        """(method, description, extra provenance) for the user model registry."""
        return (self.model.peft or {}).get("method"), cfg.description, {}

    def summary(self, result: dict) -> None:
        """Add task-specific keys to the run summary."""

    def close(self) -> None:
        """Remove hooks and the like (always called)."""


# ------------------------------------------------------------------------------------ checkpoints
class CheckpointSaver:
    """The run folder's checkpoints: ``last.pt`` (resume state), ``best.pt`` (best validation),
    ``model.pt`` / ``model_full.pt`` (the result).  Writes are atomic and on rank 0 only;
    ``resume`` refuses a state made with other settings (``RunConfig.RESUME_KEYS``)."""

    def __init__(self, out: Path, rank: int = 0, events: EventLog | None = None):
        self.out, self.rank, self.events = out, rank, events
        self.last, self.best = out / "last.pt", out / "best.pt"

    def check_new_run(self, cfg: RunConfig) -> None:
        if self.last.exists() and not cfg.resume and not cfg.overwrite:
            raise InputError(f"--out {self.out} already holds a run (last.pt): pass --resume to continue it, "
                             "or choose another --out")

    def save_resume(self, trainer: Trainer) -> None:
        if self.rank != 0:
            return
        from uniultra.models.checkpoint import atomic_torch_save

        atomic_torch_save({
            "trainable": {n: p.detach().cpu().clone() for n, p in trainer.task.trainable()},
            "extra": {k: m.state_dict() for k, m in trainer.task.extra_modules().items()},
            "optimizer": trainer.opt.state_dict(), "scheduler": trainer.sched.state_dict(),
            "scaler": trainer.scaler.state_dict(), "rng": rng_state(), "state": trainer.state,
            "config": asdict(trainer.cfg),
        }, self.last)
        self._note(self.last, "last", trainer.state["step"])

    def resume(self, trainer: Trainer) -> bool:
        """Restore ``last.pt`` into the trainer (True), or False when there is none."""
        cfg = trainer.cfg
        if not cfg.resume:
            return False
        if not self.last.is_file():
            trainer.events.emit("note", message=f"--resume: no {self.last} yet, starting a new run")
            return False
        ck = self._read_last()
        saved, now = ck.get("config", {}), cfg.settings()
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            raise InputError(f"--resume: {self.last} was made with different settings ({', '.join(diff)}); "
                             "use the same settings or another --out")
        trainable = trainer.task.trainable()
        missing = {n for n, _ in trainable} - set(ck["trainable"])
        if missing:
            raise InputError(f"--resume: {self.last} lacks trained parameters (e.g. {sorted(missing)[:2]})")
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(ck["trainable"][n].to(p.device))
        extra = ck.get("extra") or ({"proj": ck["proj"]} if "proj" in ck else {})
        for k, m in trainer.task.extra_modules().items():
            m.load_state_dict(extra[k])
        trainer.opt.load_state_dict(ck["optimizer"])
        trainer.sched.load_state_dict(ck["scheduler"])
        if "scaler" in ck:
            trainer.scaler.load_state_dict(ck["scaler"])
        trainer.state.update(ck["state"])
        set_rng_state(ck["rng"])
        return True

    def _read_last(self) -> dict:
        """``last.pt`` as a dict, or one line saying it is damaged (a copy cut short, a full disk)."""
        import pickle
        import zipfile

        try:
            ck = torch.load(self.last, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
                AttributeError, ImportError, IndexError, KeyError) as e:
            raise InputError(f"--resume: {self.last} is damaged and cannot be read ({type(e).__name__}); "
                             "restore it from a copy, or start afresh with --overwrite") from None
        keys = ("trainable", "optimizer", "scheduler", "state", "rng")
        if not isinstance(ck, dict) or any(k not in ck for k in keys):
            raise InputError(f"--resume: {self.last} is not a resume state of uniultra train/distill; "
                             "start afresh with --overwrite or choose another --out")
        return ck

    def clean_stale(self) -> list[str]:
        """Remove the temporary files a killed run left while writing (``.last.pt.XXXX.tmp``...):
        every file here is written to such a name and renamed, so a leftover one is never needed."""
        removed = []
        if self.rank != 0 or not self.out.is_dir():
            return removed
        for tmp in self.out.glob(".*.tmp"):
            if tmp.is_file():
                try:
                    tmp.unlink()
                    removed.append(tmp.name)
                except OSError:
                    pass
        return removed

    def save_model(self, trainer: Trainer, path: Path, val: dict | None = None, full: bool = False,
                   half: bool | None = None, kind: str = "model") -> None:
        if self.rank != 0:
            return
        from uniultra.models.checkpoint import save_checkpoint

        task, cfg = trainer.task, trainer.cfg
        meta = dict(task.checkpoint_meta())
        meta.update({"val_dice": (val or {}).get("mean"), "val_dice_per_dataset": val or {},
                     "step": trainer.state["step"], "date": _dt.datetime.now().isoformat(timespec="seconds")})
        if cfg.name or cfg.register:
            meta["name"] = cfg.name or cfg.register
        save_checkpoint(task.model, path, meta, half=task.half if half is None else half,
                        trained_only=(task.adapter_only and not full))
        self._note(path, kind, trainer.state["step"])

    def load_best(self, model, device) -> None:
        """Put the weights of ``best.pt`` back into ``model``."""
        ck = torch.load(self.best, map_location="cpu", weights_only=True)
        if "trained" in ck:
            model.sam.load_state_dict({k: v.to(device) for k, v in ck["trained"].items()}, strict=False)
        else:
            model.sam.load_state_dict(ck["model"])

    def _note(self, path: Path, kind: str, step: int) -> None:
        if self.events is not None:
            self.events.emit("checkpoint", step=step, path=str(path), kind=kind)


# ------------------------------------------------------------------------------------ trainer
class Trainer:
    """Runs ``task`` as configured by ``cfg`` (a :class:`RunConfig`); ``fit()`` returns the summary.

    ``progress(done, total, message)`` is called after every optimiser step (True: a console
    bar; None: a bar when ``cfg.progress_bar``); ``cancel()`` is polled after every step;
    ``log`` receives the human-readable lines (default: the ``uniultra`` logger)."""

    def __init__(self, cfg: RunConfig, task: Task, progress: Progress | bool | None = None,
                 cancel: Callable[[], bool] | None = None, log: Callable[[str], None] | None = None,
                 register: bool = True):
        self.cfg, self.task, self.cancel, self.log, self.register = cfg, task, cancel, log, register
        self.rank, self.world, self.local_rank = dist_info()
        if progress is None:
            progress = cfg.progress_bar
        if progress is True and self.rank == 0:
            progress = console_progress(task.name)
        self.progress = progress if callable(progress) and self.rank == 0 else None
        self.events = EventLog(say=log, enabled=False)
        self.state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best": -1.0, "best_step": 0, "bad": 0,
                      "history": [], "elapsed": 0.0, "run_loss": 0.0, "run_n": 0, "best_val": {}, "stopped": "",
                      "first_loss": None}

    # -------------------------------------------------------------- entry
    def fit(self) -> dict:
        own_group = False
        if self.world > 1 and not dist.is_initialized():
            cuda = self.cfg.device in ("auto", "cuda") and torch.cuda.is_available()
            dist.init_process_group("nccl" if cuda else "gloo")
            own_group = True
        try:
            return self._fit()
        finally:
            self.task.close()
            self.events.close()
            if own_group and dist.is_initialized():
                dist.destroy_process_group()

    def _fit(self) -> dict:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.device = resolve_device(cfg.device, self.local_rank)
        if self.device.type == "cpu":
            # Adam's second moments and the Sobel magnitudes reach denormal floats, which are up to
            # ~10x slower on x86 CPUs; flushing them to zero changes nothing measurable.  The flag is
            # per thread: intra-op threads that already exist keep the slow mode (measured: 20x
            # slower steps), so a host process that ran torch ops in parallel before should call
            # torch.set_flush_denormal(True) at start-up (or train with threads=1).
            torch.set_flush_denormal(True)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp = amp_dtype(cfg.amp, self.device)
        self.out = Path(cfg.out).expanduser()
        self.saver = CheckpointSaver(self.out, self.rank)
        created = self.rank == 0 and not self.out.exists()
        stale = []
        if self.rank == 0:
            from uniultra.checks import check_events_file, check_output_dir

            check_output_dir(self.out, "--out")  # a file, under a file, not writable: before any folder is made
            if cfg.events:  # appended to: never a split.csv, a recipe or a checkpoint
                check_events_file(cfg.events, "--events")
            self.saver.check_new_run(cfg)
            stale = self.saver.clean_stale()
            self.out.mkdir(parents=True, exist_ok=True)
        paths = [self.out / "events.jsonl", cfg.events] if self.rank == 0 else []
        self.events = EventLog(paths, say=self.log, enabled=self.rank == 0)
        self.saver.events = self.events
        if stale:
            self.events.emit("note", message=f"removed {len(stale)} half-written file(s) of an interrupted run: "
                                             f"{', '.join(sorted(stale))}")
        try:
            self.task.setup(self)
            self._build_loop()
            resumed = self.saver.resume(self)
            if self.rank == 0:
                (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
                (self.out / "config.yaml").write_text(to_yaml(cfg))
            self.events.emit("start", task=self.task.name, out=str(self.out), step=self.state["step"],
                             total_steps=self.total_steps, resumed=resumed, device=str(self.device),
                             world_size=self.world)
            status = self._loop()
            return self._finish(status, resumed)
        except Exception as e:
            # a refusal (InputError) is printed once by the caller (`uniultra: error: ...`); the
            # event still goes to events.jsonl for those who follow the run
            self.events.emit("failed", quiet=isinstance(e, InputError),
                             error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            if created and {p.name for p in self.out.iterdir()} <= {"events.jsonl"}:
                import shutil  # refused before any work (bad data, options): leave no new run folder

                shutil.rmtree(self.out, ignore_errors=True)
            raise

    # -------------------------------------------------------------- set-up
    def _build_loop(self) -> None:
        cfg, task = self.cfg, self.task
        per_step = cfg.batch_size * self.world * cfg.accumulate
        epoch_size = cfg.epoch_size or len(task.dataset)
        self.steps_per_epoch = max(1, epoch_size // per_step)
        self.epoch_size = self.steps_per_epoch * per_step
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        self.n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.val_every = cfg.val_every or self.steps_per_epoch
        from uniultra.training.data import EpochSampler

        self.sampler = EpochSampler(len(task.dataset), self.epoch_size, cfg.seed, task.weights, self.rank, self.world)
        if not task.vals:
            self.events.emit("note", message="warning: no validation images (val split empty): the last model is kept")
        params = [p for _, p in task.trainable()]
        for m in task.extra_modules().values():
            params += list(m.parameters())
        if not params:
            raise InputError(f"{task.name}: nothing to train")
        self.params = params
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, Schedule(cfg.schedule, self.total_steps, self.steps_per_epoch, cfg.warmup_steps, cfg.gamma,
                               cfg.poly_power, cfg.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.amp == torch.float16))
        self.net = task.module
        if self.world > 1:
            dev = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(task.module, device_ids=dev,
                                                                 find_unused_parameters=True)
        names = sorted({v.dataset for v in task.vals})
        self.val_names = names
        self.csv_fields = ["step", "epoch", "lr", "train_loss", "val_dice"] + [f"val_{n}" for n in names] + \
            ["img_per_s", "elapsed_s"]

    def _loader(self):
        cfg = self.cfg
        # Persistent workers are safe: every sample is seeded by the (index, salt) the sampler hands
        # out in this process, so workers hold no per-epoch state.
        return torch.utils.data.DataLoader(
            self.task.dataset, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.num_workers,
            drop_last=True, generator=torch.Generator().manual_seed(cfg.seed),  # no draws on the global RNG
            pin_memory=(self.device.type == "cuda"), persistent_workers=cfg.num_workers > 0,
            prefetch_factor=4 if cfg.num_workers else None, worker_init_fn=_worker_init if cfg.num_workers else None)

    # -------------------------------------------------------------- the loop
    def _step(self, it) -> tuple[torch.Tensor, dict, int]:
        """One optimiser step over ``accumulate`` micro-batches: (mean loss, last parts, images)."""
        cfg, dev = self.cfg, self.device
        self.opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=dev)
        parts, n_img = {}, 0
        for micro in range(cfg.accumulate):
            batch = next(it)
            inputs = self.task.inputs(batch, dev)
            sync = self.net.no_sync() if self.world > 1 and micro < cfg.accumulate - 1 else contextlib.nullcontext()
            ac = torch.autocast(dev.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
            with sync:
                with ac:
                    loss, parts = self.net(*inputs)
                self.scaler.scale(loss / cfg.accumulate).backward()
            step_loss += loss.detach().float() / cfg.accumulate
            n_img += batch["image"].shape[0] * self.world
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return step_loss, parts, n_img

    def _wants_stop(self, stop: dict) -> bool:
        try:
            want = stop["flag"] or bool(self.cancel is not None and self.cancel())
        except Cancelled:
            want = True
        if self.world > 1:
            t = torch.tensor([float(want)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t)
            want = bool(t.item() > 0)
        return want

    def _validate(self, step: int) -> dict:
        st = self.state
        v = validate(self.task.model, self.task.vals, self.device, self.amp, self.cfg.val_batch, self.rank,
                     self.world)
        improved = v["mean"] > st["best"]
        if improved:
            st.update(best=v["mean"], best_step=step, bad=0, best_val=v)
            self.saver.save_model(self, self.saver.best, val=v, kind="best")
        else:
            st["bad"] += 1
        self.events.emit("validation", step=step, val_dice=v["mean"],
                         per_dataset={n: v[n] for n in self.val_names}, best=st["best"], best_step=st["best_step"],
                         improved=improved)
        return v

    def _over_time(self) -> bool:
        over = bool(self.cfg.time_limit_s and time.perf_counter() - self._t_start > self.cfg.time_limit_s)
        if self.world > 1 and self.cfg.time_limit_s:
            t = torch.tensor([float(over)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t)
            over = bool(t.item() > 0)
        return over

    def _loop(self) -> str:
        """Epochs of optimiser steps until the end, a stop request, early stop or the time limit."""
        cfg, st = self.cfg, self.state
        stop, restore_sigint = sigint_stop(lambda: self.events.emit(
            "note", message="\nstopping after the current step (Ctrl-C again to abort)..."))
        self._t_start = time.perf_counter() - st["elapsed"]
        self._t_win, self._n_win, self._t_event, self._run_loss_t = time.perf_counter(), 0, 0.0, None
        status = "finished"
        self.task.module.train()
        loader = self._loader()
        try:
            while st["step"] < self.total_steps and status == "finished":
                self.sampler.set_epoch(st["epoch"], st["step_in_epoch"] * cfg.accumulate * cfg.batch_size)
                it = iter(loader)
                epoch_done = False
                while not epoch_done and st["step"] < self.total_steps and status == "finished":
                    status, epoch_done = self._one_step(it, stop)
                del it
        finally:
            del loader
            restore_sigint()
        return status

    def _one_step(self, it, stop: dict) -> tuple[str, bool]:
        """Step, record, validate, checkpoint; returns (status, whether the epoch ended)."""
        cfg, st = self.cfg, self.state
        epoch = st["epoch"]
        step_loss, parts, n_img = self._step(it)
        self._n_win += n_img
        st["step"] += 1
        st["step_in_epoch"] += 1
        st["run_n"] += 1
        self._run_loss_t = step_loss if self._run_loss_t is None else self._run_loss_t + step_loss
        step = st["step"]
        want_stop = self._wants_stop(stop)
        log_step = step % cfg.log_every == 0 or step % self.val_every == 0 or step == self.total_steps
        checkpoint = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if log_step or want_stop or checkpoint or step == 1 or self.progress is not None:
            st["run_loss"] += float(self._run_loss_t)  # the only GPU synchronisation of a step
            self._run_loss_t = None
            if st["first_loss"] is None:
                st["first_loss"] = float(step_loss)
        validated = self._record(step, epoch, parts, log_step)
        if self.progress is not None:
            try:
                self.progress(step, self.total_steps, f"loss {float(step_loss):.4f}")
            except Cancelled:
                want_stop = True
        early = bool(cfg.patience and st["bad"] >= cfg.patience)
        if not early and self._over_time():
            if self.task.vals and not validated:
                self._validate(step)
                validated = True
            early = True
            st["stopped"] = f"time limit {cfg.time_limit_s:.0f} s reached at step {step}"
        epoch_done = st["step_in_epoch"] >= self.steps_per_epoch
        if epoch_done:
            st["epoch"] += 1
            st["step_in_epoch"] = 0
        st["elapsed"] = time.perf_counter() - self._t_start
        if validated or want_stop or early or checkpoint or step == self.total_steps:
            self.saver.save_resume(self)
        if want_stop:
            return "cancelled", epoch_done
        if early:
            st["stopped"] = st["stopped"] or f"no val improvement in {cfg.patience} validations"
            return "early-stopped", epoch_done
        return "finished", epoch_done

    def _record(self, step: int, epoch: int, parts: dict, log_step: bool) -> bool:
        """The metrics row and events of a step (validating when due); True when it validated."""
        st, spe = self.state, self.steps_per_epoch
        row = self._log_row(step, epoch, parts) if log_step else None
        validated = bool(self.task.vals and (step % self.val_every == 0 or step == self.total_steps))
        if validated:
            v = self._validate(step)
            row = row or {"step": step, "epoch": epoch + st["step_in_epoch"] / spe,
                          "lr": self.opt.param_groups[0]["lr"], "elapsed_s": time.perf_counter() - self._t_start}
            row["val_dice"] = v["mean"]
            row.update({f"val_{n}": v[n] for n in self.val_names})
        if row is not None:
            st["history"].append(row)
            if self.rank == 0:
                write_csv(self.out / "metrics.csv", st["history"], self.csv_fields)
        else:
            self._step_event(step, epoch)
        return validated

    def _log_row(self, step: int, epoch: int, parts: dict) -> dict:
        st = self.state
        now = time.perf_counter()
        row = {"step": step, "epoch": epoch + st["step_in_epoch"] / self.steps_per_epoch,
               "lr": self.opt.param_groups[0]["lr"], "train_loss": st["run_loss"] / max(1, st["run_n"]),
               "img_per_s": self._n_win / max(1e-9, now - self._t_win), "elapsed_s": now - self._t_start}
        st["run_loss"], st["run_n"] = 0.0, 0
        self._t_win, self._n_win = now, 0
        self._t_event = now
        self.events.emit("step", quiet=self.progress is not None, step=step, total_steps=self.total_steps,
                         epoch=row["epoch"], loss=row["train_loss"],
                         parts={k: _scalar(v) for k, v in parts.items()}, lr=row["lr"],
                         img_per_s=row["img_per_s"], elapsed_s=row["elapsed_s"])
        return row

    def _step_event(self, step: int, epoch: int) -> None:
        """Progress without the loss (no GPU synchronisation), at most ten per second."""
        now = time.perf_counter()
        if now - self._t_event >= 0.1:
            self._t_event = now
            self.events.emit("step", step=step, total_steps=self.total_steps,
                             epoch=epoch + self.state["step_in_epoch"] / self.steps_per_epoch)

    # -------------------------------------------------------------- the end
    def _digest(self) -> str:
        digest = hashlib.sha256()
        for n, p in self.task.trainable():  # of the last weights (identical on every rank under DDP)
            digest.update(n.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _finish(self, status: str, resumed: bool) -> dict:
        st, task, out = self.state, self.task, self.out
        vals = task.vals
        hist = [r for r in st["history"] if r.get("train_loss") is not None]
        result = {"status": status, "stopped": st["stopped"], "weights_digest": self._digest(),
                  "step": st["step"], "total_steps": self.total_steps, "epochs": self.n_epochs,
                  "steps_per_epoch": self.steps_per_epoch, "best_val_dice": st["best"] if vals else None,
                  "best_step": st["best_step"], "best_val": st["best_val"], "out": str(out),
                  "resumed": resumed, "world_size": self.world, "device": str(self.device),
                  "elapsed_s": st["elapsed"], "adapter_only": task.adapter_only,
                  "first_loss": st["first_loss"], "last_loss": hist[-1]["train_loss"] if hist else None,
                  "params": task.model.param_report(), "events": str(out / "events.jsonl")}
        if status == "cancelled":
            result["last"] = str(self.saver.last)
            self.events.emit("cancelled", step=st["step"], last=str(self.saver.last))
            if self.rank == 0:
                task.summary(result)
                (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
            return result
        if self.rank == 0:
            self._write_results(result)
        if self.world > 1:
            dist.barrier()
        self.events.emit("finished", step=st["step"], status=status, best_val_dice=result["best_val_dice"],
                         best_step=st["best_step"], model=result.get("model"))
        return result

    def _write_results(self, result: dict) -> None:
        """model.pt (the best by validation, or the last), model_full.pt, curves, registration."""
        cfg, st, task, out, saver = self.cfg, self.state, self.task, self.out, self.saver
        if task.vals and saver.best.is_file():
            saver.load_best(task.model, self.device)
        else:
            saver.save_model(self, saver.best, kind="best")
        saver.save_model(self, out / "model.pt", val=st["best_val"])
        result["model"] = str(out / "model.pt")
        if getattr(cfg, "final_full", False):
            saver.save_model(self, out / "model_full.pt", val=st["best_val"], full=True,
                             half=cfg.final_half, kind="model_full")
            result["model_full"] = str(out / "model_full.pt")
        if st["history"]:
            with contextlib.suppress(Exception):
                plot_curves(st["history"], out / "curves.png", title=task.title())
                result["curves"] = str(out / "curves.png")
        result["metrics"] = str(out / "metrics.csv")
        task.summary(result)
        if cfg.register and self.register:
            result["registered"] = self.register_model(Path(result.get("model_full") or result["model"]))
        (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))

    def register_model(self, path: Path, extra: dict | None = None) -> str:
        """Register ``path`` as ``cfg.register`` in the user model registry; returns the name."""
        from uniultra.models.registry import register_user_model

        cfg, task, st = self.cfg, self.task, self.state
        method, description, more = task.registration(cfg)
        info = {"data": dict(task.data_counts), "date": _dt.datetime.now().isoformat(timespec="seconds"),
                "val_dice": st["best"] if task.vals else None, "val_dice_per_dataset": st["best_val"],
                "steps": st["step"], "seed": cfg.seed, **more, **(extra or {})}
        entry = register_user_model(cfg.register, path, task.model.arch.name, task.model.image_size, method,
                                    description=description, extra=info)
        return entry.name


__all__ = ["Trainer", "Task", "CheckpointSaver", "Schedule", "resolve_device", "amp_dtype", "sigint_stop",
           "seed_all", "expand_data_dirs", "write_csv", "plot_curves", "validate"]
