"""``uniultra train``, ``uniultra distill``, ``uniultra cache-embeddings`` and ``uniultra recipe``.

``train`` and ``distill`` read a recipe file (``--config RECIPE.yaml``), then the options given on
the command line, then ``key=value`` overrides (later ones win); defaults and checks live in
:mod:`uniultra.training.config` only (an option that is not given is not passed on, so the
file's value or the dataclass default applies).  Option names are the configuration's field
names (``--warmup-steps`` = ``warmup_steps``), with a few short aliases kept for old command lines.
Handlers return an exit code (0 done, 1 cancelled / not finished); bad input raises
:class:`uniultra.errors.InputError`.  The last line printed on stdout is the run summary as JSON
(also in ``<out>/summary.json``); machine-readable progress is in ``<out>/events.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from uniultra.checks import arg_number
from uniultra.errors import InputError

BOOL = argparse.BooleanOptionalAction
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _parser(subparsers, name: str, **kw) -> argparse.ArgumentParser:
    """A subcommand parser whose options are absent from the namespace unless given."""
    return subparsers.add_parser(name, argument_default=argparse.SUPPRESS, **kw)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="RECIPE.yaml", help="recipe file (YAML); options and key=value override it")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],
                   help="override any recipe key, e.g. lr=2e-4 'data=[a,b]' aug_options.rot_deg=5")
    p.add_argument("--data", nargs="+", action="extend", metavar="DIR",
                   help="dataset folder(s) in the uniform layout (images/, masks/, split.csv), or folders of them")
    p.add_argument("--out", metavar="DIR", help="run folder (checkpoints, events.jsonl, metrics.csv, curves.png)")
    p.add_argument("--image-size", dest="image_size", type=int, help="input size S (multiple of 32; default: the model's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=int, help="optimiser steps in all (overrides --epochs)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("adam", "adamw"))
    p.add_argument("--schedule", choices=("constant", "exp", "poly", "cosine"),
                   help="exp = ExponentialLR(--gamma) per epoch (paper); poly = warm-up + poly decay (finetune-SAM)")
    p.add_argument("--gamma", type=float)
    p.add_argument("--val-every", dest="val_every", type=int, help="validate every N steps (0: every epoch)")
    p.add_argument("--val-limit", dest="val_limit", type=int, help="validation images per dataset (default all)")
    p.add_argument("--resume", action=BOOL, help="continue the run in --out")
    p.add_argument("--overwrite", action=BOOL, help="start afresh even if --out holds a run")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", dest="num_workers", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--register", metavar="NAME", help="register the result in the user model registry")
    p.add_argument("--description")
    p.add_argument("--progress", dest="progress_bar", action=BOOL, help="progress bar on stderr")
    p.add_argument("--max-images", dest="max_images", type=int, metavar="N",
                   help="at most N train images per dataset, evenly spread (default all)")
    p.add_argument("--embed-cache", dest="embed_cache", metavar="DIR",
                   help="reuse a frozen encoder's embeddings from DIR (see `uniultra cache-embeddings`); "
                        "needs --no-augment")
    p.add_argument("--events", metavar="FILE", help="also append the JSON-lines events to FILE")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = _parser(subparsers, "train", help="fine-tune a model on datasets (PEFT, resumable, multi-GPU with torchrun)",
                description="Train a promptable segmenter from a recipe file and/or options; "
                            "see docs/RECIPES.md and uniultra/training/config.py.")
    p.add_argument("--model", help="base: registry name, architecture name (random weights) or checkpoint path")
    p.add_argument("--weights", dest="model", metavar="PT", help="base checkpoint file (same as --model)")
    p.add_argument("--random-init", dest="random_init", action=BOOL, help="ignore the registry model's weights")
    p.add_argument("--peft", help="ch-adapter, lora, adapter, cnn-branch, full, decoder or none (keep a checkpoint's own)")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--adapter-blocks", type=int, nargs="+", help="Hiera blocks for --peft adapter")
    p.add_argument("--cnn-depth", type=int, choices=(18, 34, 50))
    p.add_argument("--peft-options", help="JSON object of extra adaptation options")
    p.add_argument("--scope", choices=("encoder+decoder", "decoder"))
    _common(p)
    p.add_argument("--data-weights", dest="data_weights", type=float, nargs="+", help="sampling weight per dataset")
    p.add_argument("--epoch-size", dest="epoch_size", type=int, help="samples per epoch (default: all train images)")
    p.add_argument("--accumulate", type=int, help="gradient accumulation steps")
    p.add_argument("--weight-decay", dest="weight_decay", type=float)
    p.add_argument("--warmup", "--warmup-steps", dest="warmup_steps", type=int, help="linear warm-up steps")
    p.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=float, help="cosine/poly floor (fraction of --lr)")
    p.add_argument("--grad-clip", dest="grad_clip", type=float)
    p.add_argument("--loss-weights", dest="loss_weights",
                   help="'dice=1,focal=20,iou=1' or a preset: ultrasam (focal 20 : dice 1), sam-unet (dice 20 : focal 1)")
    p.add_argument("--two-pass", dest="two_pass", action=BOOL, help="UltraSam refinement training (mask prompt pass)")
    p.add_argument("--prompt", choices=("box", "point", "box+points", "mixed"))
    p.add_argument("--jitter", type=float, help="box edge jitter, fraction of the box size")
    p.add_argument("--n-pos", dest="n_pos", type=int)
    p.add_argument("--n-neg", dest="n_neg", type=int)
    p.add_argument("--augment", action=BOOL)
    p.add_argument("--max-instances", dest="max_instances", type=int, help="instances per image per step")
    p.add_argument("--val-jitter", dest="val_jitter", type=float)
    p.add_argument("--patience", type=int, help="early stop after N validations without improvement")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help="extra resume checkpoints every N steps")
    p.add_argument("--time-limit", dest="time_limit_s", type=float, metavar="SECONDS",
                   help="stop after this much training time, keeping the best model")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="mixed precision (CUDA only; auto = bf16)")
    p.add_argument("--adapter-only", dest="adapter_only", action=BOOL,
                   help="save only the trained parameters + the base's identity when the base has weights")
    p.add_argument("--full", dest="final_full", action=BOOL, help="also write model_full.pt (whole state dict)")
    p.add_argument("--half", dest="final_half", action=BOOL, help="store model_full.pt in fp16")
    p.add_argument("--name", help="model name stored in the checkpoints")
    p.add_argument("--teacher", metavar="MODEL",
                   help="frozen teacher (registry name or checkpoint, e.g. litemedsam) whose image embedding the "
                        "model's features learn through 1x1 projections, next to the mask loss")
    p.add_argument("--teacher-cache", dest="teacher_cache", metavar="DIR",
                   help="the teacher's embedding cache (`uniultra cache-embeddings`); with --no-augment every "
                        "step reads it instead of running the teacher's encoder")
    p.add_argument("--hint-weight", dest="hint_weight", type=float, help="weight of the teacher-hint loss (default 1)")
    p.add_argument("--box-prior", dest="box_prior", metavar="W[,R]",
                   help="add W x the ellipse inscribed in each box to the logits, in training and in every use "
                        "of the trained model (0: none; R: the weight of boxes up to 2:1, ramping to W at 3:1; "
                        "default: the starting model's own)")
    p.set_defaults(func=run_train)
    return p


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    p = _parser(subparsers, "distill", help="DSKD: distil a trained model into a tiny UniUltra student",
                description="Deep-supervised knowledge distillation from a recipe file and/or options; "
                            "see docs/RECIPES.md and uniultra/training/distill.py.")
    p.add_argument("--teacher", help="teacher: registry name or checkpoint path")
    p.add_argument("--student", help="uniultra-student-e{8,16,24,32,48} (-lm for a LiteMedSAM teacher)")
    p.add_argument("--student-init", dest="student_init", metavar="MODEL",
                   help="start the student's image encoder from MODEL (registry name or checkpoint with the "
                        "same encoder, e.g. uniultra-mini-us) instead of random weights")
    _common(p)
    p.add_argument("--level-terms", dest="level_terms", action=BOOL,
                   help="also match block/adapter/sum features at the three stage ends (paper's figure)")
    p.add_argument("--level-weight", dest="level_weight", type=float, metavar="W",
                   help="weight of each level term (default 1; the embedding term has --fpn-weight). A LiteMedSAM "
                        "teacher's level features are about 10x its embedding in size: 0.1 balances them")
    p.add_argument("--fpn-weight", dest="fpn_weight", type=float, metavar="W",
                   help="weight of the embedding (FPN) term (default 1)")
    p.add_argument("--cache-features", dest="cache_dir", metavar="DIR",
                   help="cache the teacher's features (fp16, once per image) in DIR; needs --no-augment")
    p.add_argument("--augment", action=BOOL)
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="mixed precision (CUDA only)")
    p.add_argument("--finetune-steps", dest="finetune_steps", type=int, help="end-to-end fine-tuning steps afterwards")
    p.add_argument("--finetune-lr", dest="finetune_lr", type=float)
    p.add_argument("--finetune-loss-weights", dest="finetune_loss_weights", help="loss of the fine-tuning stage")
    p.add_argument("--finetune-augment", dest="finetune_augment", action=BOOL, help="augment during fine-tuning")
    p.add_argument("--box-prior", dest="box_prior", metavar="W[,R]",
                   help="fine-tune the student with W x the box's inscribed ellipse added to its logits (as train)")
    p.add_argument("--half", action=BOOL, help="store the student in fp16")
    p.set_defaults(func=run_distill)
    return p


_NOT_FIELDS = {"func", "command", "config", "overrides", "lora_rank", "adapter_blocks", "cnn_depth", "peft_options"}


def _peft_options(args) -> dict | None:
    opts = {}
    if getattr(args, "lora_rank", None) is not None:
        opts["rank"] = int(args.lora_rank)
    if getattr(args, "adapter_blocks", None):
        opts["blocks"] = [int(b) for b in args.adapter_blocks]
    if getattr(args, "cnn_depth", None) is not None:
        opts["depth"] = int(args.cnn_depth)
    if getattr(args, "peft_options", None):
        try:
            extra = json.loads(args.peft_options)
        except ValueError as e:
            raise InputError(f"--peft-options {args.peft_options!r}: not JSON ({e}); e.g. '{{\"rank\": 8}}'") from None
        if not isinstance(extra, dict):
            raise InputError(f"--peft-options {args.peft_options!r}: give a JSON object")
        opts.update(extra)
    return opts or None


def config_from_args(cls, args):
    """The run configuration: recipe file < options given < key=value overrides."""
    from uniultra.training.config import load_config

    given = {k: v for k, v in vars(args).items() if k not in _NOT_FIELDS}
    overrides = list(getattr(args, "overrides", []) or [])
    if "data" in given:  # `--data a b lr=1`: argparse gives the override to --data
        overrides += [d for d in given["data"] if _OVERRIDE.match(d)]
        given["data"] = [d for d in given["data"] if not _OVERRIDE.match(d)]
    peft_options = _peft_options(args)
    if peft_options is not None:
        given["peft_options"] = peft_options
    return load_config(cls, getattr(args, "config", None), given, overrides)


def setup_logging() -> None:
    """Human-readable event lines on stderr (once per process)."""
    log = logging.getLogger("uniultra")
    if not log.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _emit(res: dict) -> int:
    print(json.dumps(res, default=str), flush=True)
    return 0 if res.get("status") in ("finished", "early-stopped") else 1


def run_train(args) -> int:
    from uniultra.training.config import TrainConfig
    from uniultra.training.trainer import train

    cfg = config_from_args(TrainConfig, args)
    setup_logging()
    return _emit(train(cfg))


def run_distill(args) -> int:
    from uniultra.training.config import DistillConfig
    from uniultra.training.distill import distill

    cfg = config_from_args(DistillConfig, args)
    setup_logging()
    return _emit(distill(cfg))


# ------------------------------------------------------------------------------------ embeddings
def add_cache_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cache-embeddings", help="compute a frozen encoder's image embeddings once (resumable)",
        description="Fill the embedding cache that `train --embed-cache`, `distill` and `evaluate "
                    "--embed-cache` read (see uniultra/models/embed_cache.py). Rerun to continue.")
    p.add_argument("--model", default="litemedsam", help="registry name or checkpoint (frozen encoder)")
    p.add_argument("--data", nargs="+", required=True, help="dataset folders (uniform layout)")
    p.add_argument("--split", nargs="+", default=["train", "val", "test"], help="splits to cache")
    p.add_argument("--max-images", nargs="+", type=arg_number(1, integer=True), default=None, metavar="N",
                   help="per dataset and split at most N images, evenly spread (one N per --split, or one for all)")
    p.add_argument("--cache", required=True, metavar="DIR", help="cache folder")
    p.add_argument("--onnx", action=BOOL, default=True, help="run the encoder through ONNX Runtime (faster on CPU)")
    p.add_argument("--threads", type=arg_number(1, integer=True), default=None)
    p.set_defaults(func=run_cache)
    return p


def run_cache(args) -> int:
    import torch

    from uniultra.data.datasets import UniformDataset
    from uniultra.events import console_progress
    from uniultra.models import build_model
    from uniultra.models.embed_cache import fill

    if args.threads:
        torch.set_num_threads(int(args.threads))
    from uniultra.checks import check_output_dir

    check_output_dir(args.cache, "--cache", inputs=args.data)  # a file, under a file, not writable: before any work
    caps = args.max_images or [None]
    if len(caps) not in (1, len(args.split)):
        raise InputError(f"--max-images: give one number or one per --split ({len(args.split)})")
    caps = caps * len(args.split) if len(caps) == 1 else caps
    sets = [UniformDataset(root, split, max_images=cap) for split, cap in zip(args.split, caps) for root in args.data]
    total = sum(len(d) for d in sets)
    if not total:  # nothing to cache is a mistake (a misspelt --split), not a finished run
        known = sorted({s for d in sets for s in d.split_names if s})
        raise InputError(f"--split {' '.join(args.split)}: no images in {'that split' if len(args.split) == 1 else 'those splits'} "
                         f"of --data (splits there: {', '.join(known) or 'none'}); check --split")
    model = build_model(args.model, device="cpu")

    def images():
        for d in sets:
            for i, r in enumerate(d.records):
                yield f"{d.name}/{r.id}", d.load(i)[0]

    if sys.stderr.isatty():
        progress = console_progress("cache", unit="img")
    else:
        def progress(done, n, msg):
            if done == n or done % 25 == 0:
                print(f"cached {done}/{n} ({100 * done // max(n, 1)}%) {msg}", file=sys.stderr, flush=True)

    out = fill(model, args.cache, images(), total, use_onnx=args.onnx, progress=progress if total else None)
    print(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------ recipes
def add_recipe_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("recipe", help="run a multi-stage recipe (cache-embeddings, train, distill, evaluate)",
                              description="Run or show a pipeline recipe (docs/RECIPES.md). Every stage writes "
                                          "its own folder; a finished stage is skipped and an interrupted one "
                                          "resumed, so rerunning the same command continues.")
    sub = p.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    for name, help_ in (("run", "run the stages in order (skipping finished ones)"),
                        ("show", "print the resolved recipe and each stage's state")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("recipe", metavar="RECIPE.yaml")
        q.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="override recipe keys, e.g. out=runs/x stages.train.options.steps=10")
        q.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
        q.set_defaults(func=run_recipe)
    return p


def run_recipe(args) -> int:
    from uniultra.training import recipe

    setup_logging()
    if args.recipe_command == "show":
        print(recipe.show(args.recipe, args.overrides))
        return 0
    res = recipe.run(args.recipe, args.overrides, only=args.only)
    print(json.dumps(res, default=str), flush=True)
    return 0 if res["status"] == "finished" else 1
