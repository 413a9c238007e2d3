"""Run configurations: the one place where a training option, its default and its check live.

:class:`TrainConfig` (``uniultra train``) and :class:`DistillConfig` (``uniultra distill``) share
:class:`RunConfig` (data, schedule, validation, checkpoints, devices).  A run is described by
a recipe file (YAML, read with OmegaConf), overridden by command-line options and ``key=value``
arguments (:func:`load_config`); every value is checked once, in ``__post_init__``, whether it
came from Python, a file or the command line.  See ``docs/RECIPES.md``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from uniultra.errors import InputError

SCHEDULES = ("constant", "exp", "poly", "cosine")
OPTIMIZERS = ("adam", "adamw")
AMP_MODES = ("auto", "bf16", "fp16", "off")
PROMPTS = ("box", "point", "box+points", "mixed")
SCOPES = ("encoder+decoder", "decoder")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# configuration fields whose command-line option has another name
_OPTION = {"time_limit_s": "time-limit", "warmup_steps": "warmup", "cache_dir": "cache-features",
           "progress_bar": "progress", "final_full": "full", "final_half": "half"}


def _bad(key: str, value, what: str) -> InputError:
    return InputError(f"--{_OPTION.get(key, key.replace('_', '-'))} {value}: {what}")


def check_finite(cfg) -> None:
    """Every number of ``cfg`` (lists of numbers included) is finite: NaN or infinity would only
    fail inside torch, after the run folder was written."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, float) and not math.isfinite(x):
                raise _bad(f.name, x, "give a finite number (not NaN or infinity)")


def check_register_name(name: str) -> None:
    """A name ``--register`` can use: a plain file name that no shipped registry model has
    (checked before the run, not after it)."""
    if not _NAME.fullmatch(name) or len(name) > 100:
        raise _bad("register", name, "use letters, digits, '.', '_' or '-' (no spaces, at most 100 characters)")
    from uniultra.registry import load_registry

    entry = load_registry().get(name)
    if entry is not None and entry.source != "user":
        raise _bad("register", name, "is the name of a shipped registry model; choose another name")


@dataclass(kw_only=True)
class RunConfig:
    """Options every training run has (the loop, the schedule, validation, files, devices)."""

    data: list[str]                       # dataset folders (uniform layout) or folders of them
    out: str                              # run folder
    image_size: int | None = None         # input size S; default: the base model's (teacher's)
    epochs: int = 50
    steps: int | None = None              # optimiser steps in all (overrides epochs)
    epoch_size: int | None = None         # samples per epoch (default: all training images)
    batch_size: int = 4                   # per process
    accumulate: int = 1                   # gradient accumulation (micro-batches per step)
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"               # adam | adamw
    schedule: str = "exp"                 # constant | exp (gamma per epoch) | poly | cosine
    gamma: float = 0.98
    warmup_steps: int = 0
    poly_power: float = 0.9
    min_lr_ratio: float = 0.0             # cosine / poly floor
    grad_clip: float = 0.0
    augment: bool = True
    aug_options: dict = field(default_factory=dict)
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
    amp: str = "auto"                     # CUDA only: auto = bf16
    num_workers: int = 0
    register: str | None = None           # register the result in the user model registry
    name: str | None = None               # model name stored in the checkpoints (default: register)
    description: str = ""
    log_every: int = 10
    progress_bar: bool = True
    threads: int | None = None
    max_images: int | None = None         # per dataset, evenly spread over the train split
    embed_cache: str | None = None        # reuse a frozen encoder's embeddings (models/embed_cache.py)
    events: str | None = None             # a second JSON-lines event file (besides <out>/events.jsonl)

    # keys whose change makes a run folder's resume state unusable
    RESUME_KEYS = ("image_size", "seed", "batch_size", "accumulate", "lr", "optimizer", "schedule")

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.data = [str(d) for d in self.data]
        if not self.data:
            raise InputError("--data: give at least one dataset folder (images/, masks/, split.csv)")
        if not str(self.out or "").strip():
            raise InputError("--out: give the run folder")
        for key in ("epochs", "batch_size", "accumulate", "log_every", "val_batch"):
            if getattr(self, key) < 1:
                raise _bad(key, getattr(self, key), "give at least 1")
        for key in ("steps", "epoch_size", "threads", "max_images", "val_limit"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise _bad(key, v, "give at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise _bad("lr", self.lr, "the learning rate must be positive (e.g. 1e-4)")
        if self.image_size is not None and (self.image_size < 64 or self.image_size % 32 or self.image_size > 4096):
            raise _bad("image_size", self.image_size, "give a multiple of 32 from 64 to 4096 (e.g. 1024)")
        for key, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("amp", AMP_MODES)):
            if getattr(self, key) not in allowed:
                raise _bad(key, getattr(self, key), f"use one of {', '.join(allowed)}")
        for key in ("num_workers", "warmup_steps", "val_every", "patience", "checkpoint_every", "seed", "val_seed"):
            if getattr(self, key) < 0:
                raise _bad(key, getattr(self, key), "give 0 or more")
        check_finite(self)
        for key in ("weight_decay", "grad_clip", "val_jitter"):
            if getattr(self, key) < 0:
                raise _bad(key, getattr(self, key), "give 0 or more")
        if not self.gamma > 0:
            raise _bad("gamma", self.gamma, "give a positive decay factor (e.g. 0.98)")
        if not self.poly_power > 0:
            raise _bad("poly_power", self.poly_power, "give a positive power (e.g. 0.9)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise _bad("min_lr_ratio", self.min_lr_ratio, "give a fraction of --lr between 0 and 1")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise _bad("time_limit_s", self.time_limit_s, "give a positive number of seconds")
        if self.register is not None:
            check_register_name(self.register)
        if self.embed_cache and self.augment:
            raise InputError("--embed-cache needs --no-augment: cached embeddings belong to fixed images")

    def settings(self) -> dict:
        """The values that must match for ``resume`` (see ``RESUME_KEYS``)."""
        return {k: getattr(self, k) for k in self.RESUME_KEYS}


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """``uniultra train``: promptable segmentation (see uniultra/training/tasks.py)."""

    model: str = "sam2.1-hiera-tiny"      # registry name, architecture name or checkpoint path
    random_init: bool = False             # registry name: ignore its weights
    peft: str | None = "ch-adapter"       # None / "none": keep a checkpoint's own adaptation
    peft_options: dict = field(default_factory=dict)
    scope: str = "encoder+decoder"
    data_weights: list[float] | None = None
    loss_weights: str = "ultrasam"        # "dice=1,focal=20,iou=1" or ultrasam / sam-unet
    two_pass: bool = False                # UltraSam refinement training
    prompt: str = "box"                   # box | point | box+points | mixed
    jitter: float = 0.1                   # per-edge box jitter, fraction of the box size
    shift_px: float = 0.0
    n_pos: int = 1
    n_neg: int = 0
    max_instances: int = 1
    min_area_frac: float = 0.0
    preload: bool = True
    adapter_only: bool = True             # best/model checkpoints: trained params only when possible
    final_full: bool = False              # also write model_full.pt (whole state dict)
    final_half: bool = False              # store model_full.pt in fp16
    # feature hints from a frozen teacher (tasks.TeacherHint): the model's image features learn,
    # through 1x1 projections discarded afterwards, the teacher's image embedding, next to the masks
    teacher: str | None = None            # registry name or checkpoint (any family, e.g. litemedsam)
    teacher_cache: str | None = None      # the teacher's embedding cache (`uniultra cache-embeddings`)
    hint_weight: float = 1.0
    # weight of the ellipse prior added to box rows' logits (uniultra.models.prior); None keeps
    # the starting model's own (0 for every model not trained with one)
    box_prior: float | str | None = None  # W, or "W,R" (R: round boxes' weight)

    RESUME_KEYS = RunConfig.RESUME_KEYS + ("model", "peft", "teacher", "box_prior")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft in ("", "none", "keep"):
            self.peft = None
        for key in ("jitter", "shift_px", "n_pos", "n_neg"):
            if getattr(self, key) < 0:
                raise _bad(key, getattr(self, key), "give 0 or more")
        if self.max_instances < 1:
            raise _bad("max_instances", self.max_instances, "give at least 1")
        if not 0 <= self.min_area_frac < 1:
            raise _bad("min_area_frac", self.min_area_frac, "give a fraction of the image between 0 and 1")
        if self.data_weights is not None and (any(w < 0 for w in self.data_weights) or not sum(self.data_weights) > 0):
            raise _bad("data_weights", " ".join(f"{w:g}" for w in self.data_weights),
                       "give weights of 0 or more, at least one positive")
        if self.hint_weight < 0:
            raise _bad("hint_weight", self.hint_weight, "give 0 or more")
        if self.box_prior is not None:
            from uniultra.models.prior import parse_prior

            self.box_prior = _prior_value(parse_prior(self.box_prior))
        if self.teacher is not None and not str(self.teacher).strip():
            self.teacher = None
        if self.teacher_cache and not self.teacher:
            raise InputError("--teacher-cache needs --teacher (the model whose embeddings it holds)")
        if self.prompt not in PROMPTS:
            raise _bad("prompt", self.prompt, f"use one of {', '.join(PROMPTS)}")
        if self.scope not in SCOPES:
            raise _bad("scope", self.scope, f"use one of {', '.join(SCOPES)}")
        try:
            LossWeights.parse(self.loss_weights)
        except ValueError as e:
            raise InputError(f"--loss-weights: {e}") from None


@dataclass(kw_only=True)
class DistillConfig(RunConfig):
    """``uniultra distill``: DSKD of a teacher into a student (see uniultra/training/distill.py)."""

    teacher: str                          # registry name or checkpoint
    student: str = "uniultra-student-e16"
    student_init: str | None = None      # copy the student's image encoder from this model
    epochs: int = 100
    lr: float = 1e-3
    augment: bool = False                 # only without a feature cache
    amp: str = "off"
    level_terms: bool = True
    level_weight: float = 1.0
    fpn_weight: float = 1.0
    cache_dir: str | None = None          # the teacher's targets, once per image (fp16)
    finetune_steps: int = 0               # end-to-end fine-tuning afterwards (segmentation task)
    finetune_lr: float = 1e-4
    finetune_loss_weights: str = "dice=1,bce=1,iou=1"
    finetune_augment: bool = True
    half: bool = False                    # store the student in fp16
    box_prior: float | str | None = None  # the fine-tuned student's box-shape prior (TrainConfig)
    extra: dict = field(default_factory=dict)

    RESUME_KEYS = RunConfig.RESUME_KEYS + ("teacher", "student", "student_init", "level_terms")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not str(self.teacher or "").strip():
            raise InputError("--teacher: give the teacher model (registry name or checkpoint)")
        if self.cache_dir and self.augment:
            raise InputError("--cache-features needs --no-augment (cached teacher features are per fixed image)")
        if self.finetune_steps < 0:
            raise _bad("finetune_steps", self.finetune_steps, "give 0 or more")
        if not self.finetune_lr > 0:
            raise _bad("finetune_lr", self.finetune_lr, "the learning rate must be positive (e.g. 1e-4)")
        for key in ("level_weight", "fpn_weight"):
            if getattr(self, key) < 0:
                raise _bad(key, getattr(self, key), "give 0 or more")
        if self.box_prior is not None:
            from uniultra.models.prior import parse_prior

            wr = parse_prior(self.box_prior)
            self.box_prior = _prior_value(wr)
            if any(wr) and not self.finetune_steps:
                raise InputError("--box-prior is trained in the fine-tuning stage: give --finetune-steps too")


@dataclass
class LossWeights:
    dice: float = 1.0
    focal: float = 20.0
    bce: float = 0.0
    iou: float = 1.0

    @classmethod
    def parse(cls, text: str | None) -> LossWeights:
        """``"dice=1,focal=20,bce=0,iou=1"`` or the presets ``ultrasam`` / ``sam-unet``."""
        if text is None or text == "" or text == "ultrasam":
            return cls()
        if text == "sam-unet":
            return cls(dice=20.0, focal=1.0, bce=0.0, iou=0.0)
        w = cls(dice=0.0, focal=0.0, bce=0.0, iou=0.0)
        for part in text.split(","):
            key, sep, val = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("dice", "focal", "bce", "iou"):
                raise ValueError(f"loss weights {text!r}: expected e.g. 'dice=1,focal=20,iou=1'")
            v = float(val)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"loss weights {text!r}: {key} must be a finite number of 0 or more")
            setattr(w, key, v)
        if w.dice + w.focal + w.bce <= 0:
            raise ValueError(f"loss weights {text!r}: dice, focal or bce must be positive")
        return w


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def load_config(cls, recipe: str | Path | None = None, options: dict | None = None,
                overrides: list[str] | tuple = ()):
    """``cls`` (TrainConfig/DistillConfig) from a recipe file, then ``options`` (command-line
    options that were given), then ``key=value`` overrides; later ones win.  Raises InputError
    naming the file or key for unknown keys, wrong types and missing values."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = [OmegaConf.structured(cls)]
    required: list[str] = []  # keys a recipe marks `???`: the command line must give them
    try:
        if recipe:
            p = Path(recipe).expanduser()
            if not p.is_file():
                raise InputError(f"--config {recipe}: file not found")
            file_cfg = OmegaConf.load(p)
            if not isinstance(file_cfg, dict) and not OmegaConf.is_dict(file_cfg):
                raise InputError(f"--config {recipe}: not a mapping of options")
            layers.append(file_cfg)
            required = [k for k in file_cfg if OmegaConf.is_missing(file_cfg, k)]
        if options:
            layers.append(OmegaConf.create(options))
        for o in overrides:
            if "=" not in o:
                raise InputError(f"{o!r}: overrides are key=value (e.g. lr=1e-4 data=[a,b])")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        given = set(options or {}) | {o.split("=", 1)[0].split(".")[0] for o in overrides}
        missing = sorted({k for k in merged if OmegaConf.is_missing(merged, k)} | (set(required) - given))
        if missing:
            raise InputError(f"--{missing[0].replace('_', '-')}: required (give it on the command line "
                             f"or as '{missing[0]}:' in the recipe)")
        values = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        where = f"{recipe}: " if recipe else ""
        first = str(e).splitlines()[0]
        unknown = re.match(r"Key '([^']+)' not in '\w+'", first)
        if unknown:  # omegaconf's own words named the dataclass, not what to do
            first = (f"unknown key '{unknown.group(1)}' (in the recipe or a key=value override); "
                     "see docs/RECIPES.md for the keys")
        raise InputError(f"{where}{first}") from None
    except yaml.YAMLError as e:
        from uniultra.training.recipe import _yaml_where

        raise InputError(f"--config {recipe}: not valid YAML ({_yaml_where(e)})") from None
    except UnicodeDecodeError:
        raise InputError(f"--config {recipe}: not UTF-8 text; save it as UTF-8") from None
    return cls(**values)


def to_yaml(cfg) -> str:
    """The whole configuration as YAML (what ``<out>/config.yaml`` holds)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(asdict(cfg)))


def _prior_value(wr: tuple[float, float | None]) -> float | str:
    """A parsed ``--box-prior`` as the config stores it: W (a number, as before), or "W,R"."""
    from uniultra.models.prior import format_prior

    w, r = wr
    return w if r is None else format_prior(w, r)
