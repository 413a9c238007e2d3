"""Promptable-segmentation training: ``train(TrainConfig(...))``.

What a run does
---------------
* Builds the model with :func:`uniultra.models.build_model` (registry name, architecture name or
  checkpoint path, plus an adaptation method).  Only the parameters that receive gradients in
  single-image training are optimised (memory attention/encoder are frozen: they are unused).
* Data: the ``train`` split of each ``--data`` folder (a dataset in the uniform layout, or a folder
  of them), one instance per sample with a simulated prompt (jittered box by default), decoded
  into RAM once, resized to S x S; the target mask is kept at S and the decoder's S/4 logits are
  upsampled to S for the loss.  Several datasets are mixed with optional sampling weights.
* Optimiser Adam/AdamW; schedules ``constant``, ``exp`` (ExponentialLR(gamma) per epoch, the
  paper's), ``poly`` (linear warm-up then poly decay, finetune-SAM), ``cosine``; gradient
  accumulation; bf16 autocast on CUDA (``amp="auto"``), fp32 elsewhere.
* Validation every ``val_every`` optimiser steps (default: every epoch) on the ``val`` split:
  mean Dice per image with seeded, 10%-jittered boxes (prompts seeded exactly as
  ``evaluate_dataset``), averaged over datasets; the best model by val Dice is kept; early stop
  after ``patience`` validations without improvement.  The test split is never read.
* Files in ``out``: ``last.pt`` (resume state), ``best.pt`` (adapter-only when the base has
  weights, else full), ``model.pt`` (the selected model; ``final_full``: a full checkpoint,
  optionally fp16), ``metrics.csv``, ``curves.png``, ``config.json``, ``summary.json``.
* Resume (``resume=True``): restores trainable weights, optimiser, scheduler, grad scaler, the
  RNG states of torch/numpy/python and the data position; the data order depends only on
  ``(seed, epoch)`` and every sample on ``(seed, epoch, position)``, so a resumed run ends with
  the same weights, bit for bit, as an uninterrupted one on the same device and thread count.
* Cancel: ``cancel()`` returning True, or Ctrl-C (SIGINT), stops after the current optimiser step;
  the resume state is saved at that step and ``best.pt`` is left as it was.
* Multi-process: started with ``torchrun`` (``WORLD_SIZE`` > 1) it uses DistributedDataParallel
  (gloo on CPU, nccl on CUDA); each rank reads its share of every batch; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from uniultra.errors import InputError
from uniultra.training.losses import LossWeights, promptable_loss

SCHEDULES = ("constant", "exp", "poly", "cosine")
OPTIMIZERS = ("adam", "adamw")
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    model: str = "sam2.1-hiera-tiny"      # registry name, architecture name or checkpoint path
    random_init: bool = False             # registry name: ignore its weights
    peft: str | None = "ch-adapter"
    peft_options: dict = field(default_factory=dict)
    scope: str = "encoder+decoder"
    image_size: int = 1024
    data_weights: list[float] | None = None
    epochs: int = 50
    steps: int | None = None              # optimiser steps in all (overrides epochs)
    epoch_size: int | None = None         # samples per epoch (default: all training images)
    batch_size: int = 4                   # per process
    accumulate: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "exp"
    gamma: float = 0.98                   # exp schedule, per epoch
    warmup_steps: int = 0
    poly_power: float = 0.9
    min_lr_ratio: float = 0.0             # cosine floor
    grad_clip: float = 0.0
    loss_weights: str = "ultrasam"        # "dice=1,focal=20,iou=1" or ultrasam / sam-unet
    two_pass: bool = False                # UltraSam refinement training
    prompt: str = "box"                   # box | point | box+points | mixed
    jitter: float = 0.1                   # per-edge box jitter, fraction of the box size
    shift_px: float = 0.0
    n_pos: int = 1
    n_neg: int = 0
    augment: bool = True
    aug_options: dict = field(default_factory=dict)
    max_instances: int = 1
    min_area_frac: float = 0.0
    val_every: int = 0                    # optimiser steps; 0 = every epoch
    val_jitter: float = 0.1
    val_seed: int = 0
    val_limit: int | None = None          # images per dataset
    val_split: str = "val"
    val_batch: int = 16
    patience: int = 0                     # validations without improvement; 0 = never stop early
    time_limit_s: float | None = None     # stop (validate, keep the best) after this much training time
    checkpoint_every: int = 0             # extra resume checkpoints every N steps (0: at validations)
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    seed: int = 0
    amp: str = "auto"
    num_workers: int = 0
    preload: bool = True
    adapter_only: bool = True             # best/model checkpoints: trained params only when possible
    final_full: bool = False              # also write model_full.pt (whole state dict)
    final_half: bool = False              # store model_full.pt in fp16
    register: str | None = None
    name: str | None = None               # model name stored in the checkpoints (default: register)
    description: str = ""
    log_every: int = 10
    progress_bar: bool = True
    threads: int | None = None
    max_images: int | None = None         # per dataset, evenly spread over the train split
    embed_cache: str | None = None        # reuse a frozen encoder's embeddings (embed_cache.py)


# ------------------------------------------------------------------------------------ helpers
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise InputError("--device mps: Apple MPS is not available; use --device cpu or auto")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode not in AMP_MODES:
        raise InputError(f"--amp {mode}: use one of {', '.join(AMP_MODES)}")
    if device.type != "cuda":
        return None  # autocast is not used on CPU/MPS (slower or unsupported there)
    if mode in ("auto", "bf16"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16":
        return torch.float16
    return None


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


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C: the main process stops cleanly after the current step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def _seed_all(seed: int) -> None:
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


def _base_identity(cfg: TrainConfig, model) -> tuple[str | None, str | None]:
    """(base name/path, SHA-256) when the base has weights that an adapter-only file can refer to
    (the same resolution order as ``build_model``: a bare architecture or ``random_init`` has none)."""
    from uniultra.models import load_registry, resolve_model
    from uniultra.models.architectures import canonical_arch
    from uniultra.models.checkpoint import sha256_file

    if cfg.random_init or "base_peft" in (model.peft or {}):
        return None, None
    try:
        canonical_arch(cfg.model)
        is_arch = True
    except ValueError:
        is_arch = False
    if is_arch and cfg.model not in load_registry():
        return None, None
    entry, path = resolve_model(cfg.model)
    if path is None or not Path(path).is_file():
        return None, None
    base = entry.name if entry is not None else str(Path(path).resolve())
    return base, sha256_file(path)


# ------------------------------------------------------------------------------------ loss module
class _LossModule(torch.nn.Module):
    """Wraps the model so that DDP sees one forward that returns the loss."""

    def __init__(self, model, weights: LossWeights, two_pass: bool):
        super().__init__()
        self.model = model
        self.weights = weights
        self.two_pass = two_pass

    def forward(self, batch: dict, layout: dict):
        """``layout`` is computed on the CPU copy of the batch (no GPU synchronisation)."""
        b, n = layout["shape"]
        rows = layout["rows"].to(batch["image"].device, non_blocking=True)
        image_index = torch.div(rows, n, rounding_mode="floor")
        masks = batch["masks"].reshape(b * n, 1, *batch["masks"].shape[-2:])[rows]
        boxes = batch["boxes"].reshape(b * n, 4)[rows]
        pc = batch["point_coords"].reshape(b * n, *batch["point_coords"].shape[2:])[rows]
        pl = batch["point_labels"].reshape(b * n, -1)[rows]
        return promptable_loss(self.model, batch["image"], masks, self.weights, boxes=boxes, point_coords=pc,
                               point_labels=pl, two_pass=self.two_pass, has_box=layout["has_box"],
                               image_index=image_index, has_points=layout["has_points"], sync=False)


def batch_layout(batch: dict) -> dict:
    """Which prompt rows are real, which have boxes or points (from the CPU batch)."""
    valid = batch["valid"]
    b, n = valid.shape
    rows = torch.nonzero(valid.reshape(-1)).flatten()
    pl = batch["point_labels"].reshape(b * n, -1)[rows]
    return {"shape": (b, n), "rows": rows, "has_box": batch["has_box"].reshape(-1)[rows].clone(),
            "has_points": bool((pl >= 0).any())}


# ------------------------------------------------------------------------------------ validation
@torch.no_grad()
def validate(model, images, device: torch.device, amp: torch.dtype | None = None, batch: int = 16,
             rank: int = 0, world: int = 1) -> dict:
    """Mean Dice per dataset (and their mean, ``"mean"``) of ``model`` on ``ValImage`` s."""
    from uniultra.data.transforms import box_to_model, image_to_tensor, upsample_logits
    from uniultra.evaluation.metrics import dice

    was_training = model.training
    model.eval()
    S = model.image_size
    names = sorted({v.dataset for v in images})
    sums = torch.zeros(len(names), 2, dtype=torch.float64)
    mine = images[rank::world]
    ac = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    for k in range(0, len(mine), batch):
        chunk = mine[k: k + batch]
        x = torch.stack([image_to_tensor(v.image, S) for v in chunk]).to(device)
        rows, boxes = [], []
        for j, v in enumerate(chunk):
            for bx in v.boxes:
                rows.append(j)
                boxes.append(box_to_model(bx, v.gt.shape, S))
        logits = None
        with ac:
            emb = model.encode(x)
            if rows:
                idx = torch.as_tensor(rows, device=device)
                e = {"image_embed": emb["image_embed"][idx],
                     "high_res_feats": None if emb["high_res_feats"] is None else [h[idx] for h in emb["high_res_feats"]]}
                logits, _ = model.decode(e, torch.as_tensor(np.asarray(boxes), dtype=torch.float32, device=device))
        logits = logits.float().cpu() if logits is not None else None
        for j, v in enumerate(chunk):
            pred = np.zeros(v.gt.shape, bool)
            for r in [r for r, jj in enumerate(rows) if jj == j]:
                pred |= upsample_logits(logits[r, 0], v.gt.shape, S).numpy() > 0
            d = names.index(v.dataset)
            sums[d, 0] += dice(pred, v.gt)
            sums[d, 1] += 1
    if world > 1:
        red = sums.to(device) if device.type == "cuda" else sums
        dist.all_reduce(red)
        sums = red.cpu()
    if was_training:
        model.train()
    out = {n: float(sums[i, 0] / max(1.0, float(sums[i, 1]))) for i, n in enumerate(names)}
    out["mean"] = float(np.mean([out[n] for n in names])) if names else float("nan")
    return out


# ------------------------------------------------------------------------------------ files
def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    os.replace(tmp, path)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """Training loss and validation Dice against the optimiser step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ train
def train(config: TrainConfig, progress: Callable | bool | None = None, cancel: Callable[[], bool] | None = None,
          log: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) a run described by ``config``; see the module doc.

    ``progress(done, total, message)`` is called after every optimiser step; ``cancel()`` is
    polled after every step.  Returns a summary dict (also written to ``summary.json``)."""
    cfg = config
    rank, world, local_rank = _dist_info()
    own_group = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if (cfg.device in ("auto", "cuda") and torch.cuda.is_available()) else "gloo"
        dist.init_process_group(backend)
        own_group = True
    try:
        return _train(cfg, rank, world, local_rank, progress, cancel, log)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


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


def _say(log, rank, msg):
    if rank == 0:
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)


def _check_config(cfg: TrainConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise InputError(f"--optimizer {cfg.optimizer}: use one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise InputError(f"--schedule {cfg.schedule}: use one of {', '.join(SCHEDULES)}")
    if cfg.batch_size < 1 or cfg.accumulate < 1:
        raise InputError("--batch-size and --accumulate must be at least 1")
    if cfg.lr <= 0:
        raise InputError(f"--lr {cfg.lr}: the learning rate must be positive")
    if cfg.steps is not None and cfg.steps < 1:
        raise InputError(f"--steps {cfg.steps}: give at least 1")
    if cfg.epochs < 1:
        raise InputError(f"--epochs {cfg.epochs}: give at least 1")
    try:
        LossWeights.parse(cfg.loss_weights)
    except ValueError as e:
        raise InputError(f"--loss-weights: {e}") from None


def _train(cfg: TrainConfig, rank: int, world: int, local_rank: int, progress, cancel, log) -> dict:
    from uniultra.data.datasets import PromptSegDataset, UniformDataset, combine
    from uniultra.models import build_model
    from uniultra.models.checkpoint import atomic_torch_save, save_checkpoint
    from uniultra.training.data import AugmentedSource, CachedSource, EpochSampler, SaltedConcat, val_set

    _check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cpu":
        # Adam's second moments and the Sobel magnitudes reach denormal floats, which are up to
        # ~10x slower on x86 CPUs; flushing them to zero changes nothing measurable.  The flag is
        # per thread: intra-op threads that already exist keep the slow mode (measured: 20x
        # slower steps), so a host process that ran torch ops in parallel before should call
        # torch.set_flush_denormal(True) at start-up (or train with threads=1).
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = amp_dtype(cfg.amp, device)
    out = Path(cfg.out).expanduser()
    last_path = out / "last.pt"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if last_path.exists() and not cfg.resume and not cfg.overwrite:
            raise InputError(f"--out {out} already holds a run (last.pt): pass --resume to continue it, "
                             "or choose another --out")

    # ---------------- data
    roots = expand_data_dirs(cfg.data)
    splits = []
    for r in roots:
        ds = UniformDataset(r, "train", min_area_frac=cfg.min_area_frac, max_images=cfg.max_images)
        if len(ds) == 0:
            raise InputError(f"--data {r}: no images in the train split (split.csv); check the dataset")
        splits.append(ds)
    sources = [CachedSource(ds) if cfg.preload else ds for ds in splits]
    S = int(cfg.image_size)
    if cfg.augment:
        sources = [AugmentedSource(src, cfg.seed, size=S, **cfg.aug_options) for src in sources]
    pds = [PromptSegDataset(src, S, mask_div=1, max_instances=cfg.max_instances, prompt=cfg.prompt,
                            jitter=cfg.jitter, shift_px=cfg.shift_px, n_pos=cfg.n_pos, n_neg=cfg.n_neg,
                            augment=False, min_area_frac=cfg.min_area_frac, seed=cfg.seed)
           for src in sources]
    concat = SaltedConcat(pds)
    weights = None
    if cfg.data_weights is not None:
        if len(cfg.data_weights) != len(pds):
            raise InputError(f"--data-weights: give one weight per dataset ({len(pds)}: "
                             f"{', '.join(r.name for r in roots)})")
        weights = combine(pds, cfg.data_weights).sample_weights
    global_batch = cfg.batch_size * world
    per_step = global_batch * cfg.accumulate
    epoch_size = cfg.epoch_size or len(concat)
    steps_per_epoch = max(1, epoch_size // per_step)
    epoch_size = steps_per_epoch * per_step
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    val_every = cfg.val_every or steps_per_epoch
    sampler = EpochSampler(len(concat), epoch_size, cfg.seed, weights, rank, world)

    vals = val_set(roots, cfg.val_split, cfg.val_jitter, cfg.val_seed, cfg.val_limit, cfg.min_area_frac)
    if not vals:
        _say(log, rank, "warning: no validation images (val split empty): the last model is kept")

    # ---------------- model
    _seed_all(cfg.seed)
    try:
        model = build_model(cfg.model, image_size=S, peft=cfg.peft, peft_options=cfg.peft_options,
                            scope=cfg.scope, device="cpu", random_init=cfg.random_init)
    except InputError:
        raise
    except ValueError as e:  # unknown method/option/size from the model builder
        raise InputError(f"--model {cfg.model} --peft {cfg.peft}: {e}") from None
    if model.image_size != S:
        raise InputError(f"--image-size {S} does not match the model ({model.image_size})")
    from uniultra.models.peft import updated_parameter_names

    used = set(updated_parameter_names(model.sam))
    for n, p in model.sam.named_parameters():
        if p.requires_grad and n not in used:
            p.requires_grad_(False)  # unused in single-image training (memory modules)
    model.to(device)
    if cfg.embed_cache:
        from uniultra.models.embed_cache import attach

        if cfg.augment:
            raise InputError("--embed-cache needs --no-augment: cached embeddings belong to fixed images")
        attach(model, cfg.embed_cache)
    trainable = [(n, p) for n, p in model.sam.named_parameters() if p.requires_grad]
    if not trainable:
        raise InputError(f"--peft {cfg.peft}: nothing to train")
    params = [p for _, p in trainable]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, Schedule(cfg.schedule, total_steps, steps_per_epoch, cfg.warmup_steps, cfg.gamma, cfg.poly_power,
                      cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == torch.float16))
    lw = LossWeights.parse(cfg.loss_weights)
    lm = _LossModule(model, lw, cfg.two_pass)
    net = lm
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            lm, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    base, base_sha = _base_identity(cfg, model)
    adapter_only = bool(cfg.adapter_only and base is not None)

    # ---------------- state
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best": -1.0, "best_step": 0, "bad": 0,
             "history": [], "elapsed": 0.0, "run_loss": 0.0, "run_n": 0, "best_val": {}, "stopped": ""}
    resumed = False
    if cfg.resume and last_path.is_file():
        ck = torch.load(last_path, map_location="cpu", weights_only=False)
        keys = ("model", "image_size", "peft", "seed", "batch_size", "accumulate", "lr", "optimizer", "schedule")
        saved = ck.get("config", {})
        diff = [k for k in keys if saved.get(k) != asdict(cfg).get(k)]
        if diff:
            raise InputError(f"--resume: {last_path} was made with different settings ({', '.join(diff)}); "
                             "use the same settings or another --out")
        names = {n for n, _ in trainable}
        missing = names - set(ck["trainable"])
        if missing:
            raise InputError(f"--resume: {last_path} lacks trained parameters (e.g. {sorted(missing)[:2]})")
        sd = dict(model.sam.named_parameters())
        with torch.no_grad():
            for n in names:
                sd[n].copy_(ck["trainable"][n].to(device))
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        state.update(ck["state"])
        _set_rng_state(ck["rng"])
        resumed = True
        _say(log, rank, f"resumed {last_path} at step {state['step']}/{total_steps}")
    elif cfg.resume:
        _say(log, rank, f"--resume: no {last_path} yet, starting a new run")

    names_val = sorted({v.dataset for v in vals})
    csv_fields = ["step", "epoch", "lr", "train_loss", "val_dice"] + [f"val_{n}" for n in names_val] + \
        ["img_per_s", "elapsed_s"]
    meta_common = {
        "base": base, "base_sha256": base_sha, "method": (model.peft or {}).get("method"),
        "datasets": [r.name for r in roots], "train_images": len(concat), "image_size": S,
        "seed": cfg.seed, "val_jitter": cfg.val_jitter,
    }
    if rank == 0:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))

    def save_resume():
        if rank != 0:
            return
        atomic_torch_save({
            "trainable": {n: p.detach().cpu().clone() for n, p in trainable},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "rng": _rng_state(), "state": state, "config": asdict(cfg),
        }, last_path)

    def save_model(path: Path, full: bool = False, half: bool = False, val: dict | None = None):
        meta = dict(meta_common)
        meta.update({"val_dice": (val or {}).get("mean"), "val_dice_per_dataset": val or {},
                     "step": state["step"], "date": _dt.datetime.now().isoformat(timespec="seconds")})
        if cfg.name or cfg.register:
            meta["name"] = cfg.name or cfg.register
        save_checkpoint(model, path, meta, half=half, trained_only=(adapter_only and not full))

    # ---------------- SIGINT
    stop, restore_sigint = sigint_stop(lambda: _say(log, rank, "\nstopping after the current step "
                                                                 "(Ctrl-C again to abort)..."))

    # ---------------- loop
    bar = None
    if rank == 0 and (progress is True or (progress is None and cfg.progress_bar)):
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    prog_fn = progress if callable(progress) else None
    dl_gen = torch.Generator().manual_seed(cfg.seed)  # keeps DataLoader from drawing on the global RNG
    t_start = time.perf_counter() - state["elapsed"]
    t_win, n_win = time.perf_counter(), 0
    status = "finished"
    run_loss_t = None
    last_loss = float("nan")
    net.train()
    # Persistent workers are safe: every sample is seeded by the (index, salt) the sampler hands
    # out in this process, so workers hold no per-epoch state.
    loader = torch.utils.data.DataLoader(
        concat, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        drop_last=True, generator=dl_gen, pin_memory=(device.type == "cuda"),
        persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers else None,
        worker_init_fn=_worker_init if cfg.num_workers else None)
    try:
        while state["step"] < total_steps:
            epoch = state["epoch"]
            skip = state["step_in_epoch"] * cfg.accumulate * cfg.batch_size
            sampler.set_epoch(epoch, skip)
            it = iter(loader)
            while state["step_in_epoch"] < steps_per_epoch and state["step"] < total_steps:
                opt.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=device)
                for micro in range(cfg.accumulate):
                    batch = next(it)
                    layout = batch_layout(batch)
                    batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                             for k, v in batch.items()}
                    sync = contextlib.nullcontext()
                    if world > 1 and micro < cfg.accumulate - 1:
                        sync = net.no_sync()
                    ac = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
                    with sync:
                        with ac:
                            loss, parts = net(batch, layout)
                        scaler.scale(loss / cfg.accumulate).backward()
                    step_loss += parts["loss"].float() / cfg.accumulate
                    n_win += batch["image"].shape[0] * world
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                state["step"] += 1
                state["step_in_epoch"] += 1
                run_loss_t = step_loss if run_loss_t is None else run_loss_t + step_loss
                state["run_n"] += 1
                step = state["step"]
                lr_now = opt.param_groups[0]["lr"]
                row = None
                want_stop = stop["flag"] or bool(cancel is not None and cancel())
                log_now = step % cfg.log_every == 0 or step % val_every == 0 or step == total_steps or want_stop \
                    or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or prog_fn is not None
                if log_now:  # the only GPU synchronisation of a step
                    state["run_loss"] += float(run_loss_t)
                    last_loss = float(step_loss)
                    run_loss_t = None
                if step % cfg.log_every == 0 or step % val_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    row = {"step": step, "epoch": epoch + state["step_in_epoch"] / steps_per_epoch,
                           "lr": lr_now, "train_loss": state["run_loss"] / max(1, state["run_n"]),
                           "img_per_s": n_win / max(1e-9, now - t_win), "elapsed_s": now - t_start}
                    state["run_loss"], state["run_n"] = 0.0, 0
                    t_win, n_win = now, 0
                validated = False
                if vals and (step % val_every == 0 or step == total_steps):
                    v = validate(model, vals, device, amp, cfg.val_batch, rank, world)
                    validated = True
                    row = row or {"step": step, "epoch": epoch + state["step_in_epoch"] / steps_per_epoch,
                                  "lr": lr_now, "elapsed_s": time.perf_counter() - t_start}
                    row["val_dice"] = v["mean"]
                    row.update({f"val_{n}": v[n] for n in names_val})
                    if v["mean"] > state["best"]:
                        state.update(best=v["mean"], best_step=step, bad=0, best_val=v)
                        if rank == 0:
                            save_model(out / "best.pt", val=v)
                    else:
                        state["bad"] += 1
                    _say(log, rank, f"step {step}: val Dice {v['mean']:.4f} "
                         + " ".join(f"{n}={v[n]:.4f}" for n in names_val)
                         + f" (best {state['best']:.4f} @ {state['best_step']})")
                if row is not None:
                    state["history"].append(row)
                    if rank == 0:
                        _write_csv(out / "metrics.csv", state["history"], csv_fields)
                if bar is not None:
                    bar.update(1)
                    if row is not None and row.get("train_loss") is not None:
                        bar.set_postfix(loss=f"{row['train_loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                if prog_fn is not None and rank == 0:
                    prog_fn(step, total_steps, f"step {step}/{total_steps} loss {last_loss:.4f}")
                early = bool(cfg.patience and state["bad"] >= cfg.patience)
                over_time = bool(cfg.time_limit_s and time.perf_counter() - t_start > cfg.time_limit_s)
                if world > 1 and cfg.time_limit_s:
                    t = torch.tensor([float(over_time)], device=device if device.type == "cuda" else "cpu")
                    dist.all_reduce(t)
                    over_time = bool(t.item() > 0)
                if over_time and not early and vals and not validated:
                    v = validate(model, vals, device, amp, cfg.val_batch, rank, world)
                    if v["mean"] > state["best"]:
                        state.update(best=v["mean"], best_step=step, bad=0, best_val=v)
                        if rank == 0:
                            save_model(out / "best.pt", val=v)
                    validated = True
                    _say(log, rank, f"time limit: step {step}: val Dice {v['mean']:.4f}")
                if over_time and not early:
                    early = True
                    state["stopped"] = f"time limit {cfg.time_limit_s:.0f} s reached at step {step}"
                if world > 1:
                    t = torch.tensor([float(want_stop)], device=device if device.type == "cuda" else "cpu")
                    dist.all_reduce(t)
                    want_stop = bool(t.item() > 0)
                epoch_done = state["step_in_epoch"] >= steps_per_epoch
                if epoch_done:
                    state["epoch"] += 1
                    state["step_in_epoch"] = 0
                state["elapsed"] = time.perf_counter() - t_start
                if validated or want_stop or early or step == total_steps or \
                        (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    save_resume()
                if want_stop:
                    status = "cancelled"
                    break
                if early:
                    status = "early-stopped"
                    state["stopped"] = state["stopped"] or f"no val improvement in {cfg.patience} validations"
                    break
                if epoch_done:
                    break
            del it
            if status != "finished":
                break
    finally:
        del loader
        if bar is not None:
            bar.close()
        restore_sigint()

    import hashlib

    digest = hashlib.sha256()
    for n, p in trainable:  # of the last weights (identical on every rank under DDP)
        digest.update(n.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    result = {"status": status, "stopped": state["stopped"], "weights_digest": digest.hexdigest(),
              "step": state["step"], "total_steps": total_steps, "epochs": n_epochs,
              "steps_per_epoch": steps_per_epoch, "best_val_dice": state["best"] if vals else None,
              "best_step": state["best_step"], "best_val": state["best_val"], "out": str(out),
              "resumed": resumed, "world_size": world, "device": str(device),
              "elapsed_s": state["elapsed"], "adapter_only": adapter_only,
              "params": model.param_report()}
    if status == "cancelled":
        result["last"] = str(last_path)
        _say(log, rank, f"stopped at step {state['step']}: resume with --resume (state in {last_path})")
        if rank == 0:
            (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
        return result

    # ---------------- final model: the best by validation (or the last when there is no val split)
    if rank == 0:
        best_path = out / "best.pt"
        if vals and best_path.is_file():
            ck = torch.load(best_path, map_location="cpu", weights_only=True)
            sd = ck.get("trained") or ck.get("model")
            if "trained" in ck:
                model.sam.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=False)
            else:
                model.sam.load_state_dict(sd)
        else:
            save_model(best_path, val=None)
        model_path = out / "model.pt"
        save_model(model_path, val=state["best_val"])
        result["model"] = str(model_path)
        if cfg.final_full:
            full_path = out / "model_full.pt"
            save_model(full_path, full=True, half=cfg.final_half, val=state["best_val"])
            result["model_full"] = str(full_path)
        if state["history"]:
            with contextlib.suppress(Exception):
                plot_curves(state["history"], out / "curves.png", title=f"{model.arch.name} @ {S}px")
                result["curves"] = str(out / "curves.png")
        result["metrics"] = str(out / "metrics.csv")
        if cfg.register:
            from uniultra.models.registry import register_user_model

            reg_path = Path(result.get("model_full") or model_path)
            entry = register_user_model(
                cfg.register, reg_path, model.arch.name, S, (model.peft or {}).get("method"),
                description=cfg.description or f"trained from {cfg.model} on {', '.join(r.name for r in roots)}",
                extra={"base": cfg.model, "method": (model.peft or {}).get("method"),
                       "data": {r.name: len(ds) for r, ds in zip(roots, splits)},
                       "date": _dt.datetime.now().isoformat(timespec="seconds"),
                       "val_dice": state["best"] if vals else None, "val_dice_per_dataset": state["best_val"],
                       "steps": state["step"], "seed": cfg.seed})
            result["registered"] = entry.name
        (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    if world > 1:
        dist.barrier()
    return result
