"""``uniultra train`` and ``uniultra distill`` subcommands (argparse).

``add_train_parser(subparsers)`` / ``add_distill_parser(subparsers)`` register the subcommands;
each sets ``func`` to a handler that returns an exit code (0 done, 1 cancelled / not finished).
Bad input raises :class:`uniultra.errors.InputError` with a one-line message naming the input.
Booleans are ``--flag/--no-flag``.  The last line printed on stdout is the run summary as JSON
(also in ``<out>/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import sys

from uniultra.errors import InputError

BOOL = argparse.BooleanOptionalAction


def _peft_options(args) -> dict:
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
    return opts


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", action="extend", required=True, metavar="DIR",
                   help="dataset folder(s) in the uniform layout (images/, masks/, split.csv), or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoints, metrics.csv, curves.png)")
    p.add_argument("--image-size", type=int, default=None, help="input size S (multiple of 32)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps in all (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", choices=("adam", "adamw"), default=None)
    p.add_argument("--schedule", choices=("constant", "exp", "poly", "cosine"), default=None,
                   help="exp = ExponentialLR(--gamma) per epoch (paper); poly = warm-up + poly decay (finetune-SAM)")
    p.add_argument("--gamma", type=float, default=0.98)
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: every epoch)")
    p.add_argument("--val-limit", type=int, default=None, help="validation images per dataset (default all)")
    p.add_argument("--resume", action=BOOL, default=False, help="continue the run in --out")
    p.add_argument("--overwrite", action=BOOL, default=False, help="start afresh even if --out holds a run")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--register", default=None, metavar="NAME", help="register the result in the user model registry")
    p.add_argument("--description", default="")
    p.add_argument("--progress", action=BOOL, default=True, help="progress bar on stderr")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="at most N train images per dataset, evenly spread (default all)")
    p.add_argument("--embed-cache", default=None, metavar="DIR",
                   help="reuse a frozen encoder's embeddings from DIR (see `uniultra cache-embeddings`); "
                        "needs --no-augment")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="fine-tune a model on datasets (PEFT, resumable, multi-GPU with torchrun)",
                              description="Train a promptable segmenter; see uniultra/training/trainer.py.")
    p.add_argument("--model", default="sam2.1-hiera-tiny",
                   help="base: registry name, architecture name (random weights) or checkpoint path")
    p.add_argument("--weights", default=None, metavar="PT", help="base checkpoint file (overrides --model)")
    p.add_argument("--random-init", action=BOOL, default=False, help="ignore the registry model's weights")
    p.add_argument("--peft", default="ch-adapter",
                   help="ch-adapter, lora, adapter, cnn-branch, full, decoder or none (keep a checkpoint's own)")
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--adapter-blocks", type=int, nargs="+", default=None, help="Hiera blocks for --peft adapter")
    p.add_argument("--cnn-depth", type=int, choices=(18, 34, 50), default=None)
    p.add_argument("--peft-options", default=None, help="JSON object of extra adaptation options")
    p.add_argument("--scope", choices=("encoder+decoder", "decoder"), default="encoder+decoder")
    _common(p)
    p.add_argument("--data-weights", type=float, nargs="+", default=None, help="sampling weight per dataset")
    p.add_argument("--epoch-size", type=int, default=None, help="samples per epoch (default: all train images)")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--loss-weights", default="ultrasam",
                   help="'dice=1,focal=20,iou=1' or a preset: ultrasam (focal 20 : dice 1), sam-unet (dice 20 : focal 1)")
    p.add_argument("--two-pass", action=BOOL, default=False, help="UltraSam refinement training (mask prompt pass)")
    p.add_argument("--prompt", choices=("box", "point", "box+points", "mixed"), default="box")
    p.add_argument("--jitter", type=float, default=0.1, help="box edge jitter, fraction of the box size")
    p.add_argument("--n-pos", type=int, default=1)
    p.add_argument("--n-neg", type=int, default=0)
    p.add_argument("--augment", action=BOOL, default=True)
    p.add_argument("--max-instances", type=int, default=1, help="instances per image per step")
    p.add_argument("--val-jitter", type=float, default=0.1)
    p.add_argument("--patience", type=int, default=0, help="early stop after N validations without improvement")
    p.add_argument("--checkpoint-every", type=int, default=0, help="extra resume checkpoints every N steps")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after this much training time, keeping the best model")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision (CUDA only; auto = bf16)")
    p.add_argument("--adapter-only", action=BOOL, default=True,
                   help="save only the trained parameters + the base's identity when the base has weights")
    p.add_argument("--full", action=BOOL, default=False, help="also write model_full.pt (whole state dict)")
    p.add_argument("--half", action=BOOL, default=False, help="store model_full.pt in fp16")
    p.add_argument("--name", default=None, help="model name stored in the checkpoints")
    p.set_defaults(func=run_train)
    return p


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("distill", help="DSKD: distil a trained model into a tiny UniUltra student",
                              description="Deep-supervised knowledge distillation; see uniultra/training/distill.py.")
    p.add_argument("--teacher", required=True, help="teacher: registry name or checkpoint path")
    p.add_argument("--student", default="uniultra-student-e16", help="uniultra-student-e{8,16,24,32,48}")
    _common(p)
    p.add_argument("--level-terms", action=BOOL, default=True,
                   help="also match block/adapter/sum features at the three stage ends (paper's figure)")
    p.add_argument("--cache-features", default=None, metavar="DIR",
                   help="cache the teacher's features (fp16, once per image) in DIR; needs --no-augment")
    p.add_argument("--augment", action=BOOL, default=False)
    p.add_argument("--finetune-steps", type=int, default=0, help="end-to-end fine-tuning steps afterwards")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-loss-weights", default="dice=1,bce=1,iou=1", help="loss of the fine-tuning stage")
    p.add_argument("--finetune-augment", action=BOOL, default=True, help="augment during fine-tuning")
    p.add_argument("--half", action=BOOL, default=False, help="store the student in fp16")
    p.set_defaults(func=run_distill)
    return p


def _checked(args) -> None:
    for name in ("epochs", "steps", "batch_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise InputError(f"--{name.replace('_', '-')} {v}: give at least 1")
    if args.lr is not None and args.lr <= 0:
        raise InputError(f"--lr {args.lr}: the learning rate must be positive")
    if args.image_size is not None and (args.image_size < 64 or args.image_size % 32):
        raise InputError(f"--image-size {args.image_size}: give a multiple of 32, at least 64 (e.g. 1024)")
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, int(args.threads)))


def _emit(res: dict) -> int:
    print(json.dumps(res, default=str), flush=True)
    return 0 if res.get("status") in ("finished", "early-stopped") else 1


def run_train(args) -> int:
    from uniultra.training.trainer import TrainConfig, train

    _checked(args)
    peft = None if args.peft in (None, "", "keep") else args.peft
    cfg = TrainConfig(
        data=list(args.data), out=args.out, model=args.weights or args.model, random_init=args.random_init,
        peft=peft, peft_options=_peft_options(args), scope=args.scope, image_size=args.image_size or 1024,
        data_weights=args.data_weights, epochs=args.epochs or 50, steps=args.steps, epoch_size=args.epoch_size,
        batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr or 1e-4,
        weight_decay=args.weight_decay, optimizer=args.optimizer or "adam", schedule=args.schedule or "exp",
        gamma=args.gamma, warmup_steps=args.warmup, grad_clip=args.grad_clip, loss_weights=args.loss_weights,
        two_pass=args.two_pass, prompt=args.prompt, jitter=args.jitter, n_pos=args.n_pos, n_neg=args.n_neg,
        augment=args.augment, max_instances=args.max_instances, val_every=args.val_every,
        val_jitter=args.val_jitter, val_limit=args.val_limit, patience=args.patience,
        checkpoint_every=args.checkpoint_every, time_limit_s=args.time_limit, resume=args.resume,
        overwrite=args.overwrite, device=args.device, seed=args.seed, amp=args.amp, num_workers=args.num_workers,
        adapter_only=args.adapter_only, final_full=args.full, final_half=args.half, register=args.register,
        name=args.name, description=args.description, progress_bar=args.progress, threads=args.threads,
        max_images=args.max_images, embed_cache=args.embed_cache,
    )
    if args.image_size is None:
        cfg.image_size = _default_size(cfg.model)
    return _emit(train(cfg, progress=True if args.progress else False))


def _default_size(model: str) -> int:
    """The size a checkpoint was trained at, else 1024 (SAM2's)."""
    from pathlib import Path

    p = Path(model).expanduser()
    if p.is_file():
        from uniultra.models.checkpoint import read_checkpoint

        info = read_checkpoint(p).get("uniultra") or {}
        return int(info.get("image_size", 1024))
    try:
        from uniultra.models.registry import get_entry

        return int(get_entry(model).image_size)
    except (KeyError, OSError, ValueError):
        return 1024


def run_distill(args) -> int:
    from uniultra.training.distill import DistillConfig, distill

    _checked(args)
    cfg = DistillConfig(
        teacher=args.teacher, data=list(args.data), out=args.out, student=args.student, image_size=args.image_size,
        epochs=args.epochs or 100, steps=args.steps, batch_size=args.batch_size, lr=args.lr or 1e-3,
        optimizer=args.optimizer or "adam", schedule=args.schedule or "exp", gamma=args.gamma,
        level_terms=args.level_terms, cache_dir=args.cache_features, augment=args.augment,
        val_every=args.val_every, val_limit=args.val_limit, finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr, device=args.device, seed=args.seed, num_workers=args.num_workers,
        resume=args.resume, overwrite=args.overwrite, register=args.register, half=args.half,
        progress_bar=args.progress, threads=args.threads, max_images=args.max_images,
        embed_cache=args.embed_cache, finetune_loss_weights=args.finetune_loss_weights,
        finetune_augment=args.finetune_augment,
    )
    return _emit(distill(cfg, progress=True if args.progress else False))


def add_cache_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cache-embeddings", help="compute a frozen encoder's image embeddings once (resumable)",
        description="Fill the embedding cache that `train --embed-cache`, `distill` and `evaluate "
                    "--embed-cache` read (see uniultra/models/embed_cache.py). Rerun to continue.")
    p.add_argument("--model", default="litemedsam", help="registry name or checkpoint (frozen encoder)")
    p.add_argument("--data", nargs="+", required=True, help="dataset folders (uniform layout)")
    p.add_argument("--split", nargs="+", default=["train", "val", "test"], help="splits to cache")
    p.add_argument("--max-images", nargs="+", type=int, default=None, metavar="N",
                   help="per dataset and split at most N images, evenly spread (one N per --split, or one for all)")
    p.add_argument("--cache", required=True, metavar="DIR", help="cache folder")
    p.add_argument("--onnx", action=BOOL, default=True, help="run the encoder through ONNX Runtime (faster on CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run_cache)
    return p


def run_cache(args) -> int:
    import math

    import torch
    from tqdm import tqdm

    from uniultra.data.datasets import UniformDataset
    from uniultra.models import build_model
    from uniultra.models.embed_cache import fill

    if args.threads:
        torch.set_num_threads(int(args.threads))
    caps = args.max_images or [None]
    if len(caps) not in (1, len(args.split)):
        raise InputError(f"--max-images: give one number or one per --split ({len(args.split)})")
    caps = caps * len(args.split) if len(caps) == 1 else caps
    sets = []
    for split, cap in zip(args.split, caps):
        for root in args.data:
            sets.append(UniformDataset(root, split, max_images=cap))
    total = sum(len(d) for d in sets)
    model = build_model(args.model, device="cpu")

    def images():
        for d in sets:
            for i, r in enumerate(d.records):
                yield f"{d.name}/{r.id}", d.load(i)[0]

    bar = tqdm(total=total, unit="img", disable=not sys.stderr.isatty() or total == 0)
    last = [0]

    def progress(done, n, msg):
        bar.update(done - last[0])
        last[0] = done
        if not bar.disable:
            return
        if done == n or done % 25 == 0:
            print(f"cached {done}/{n} ({math.floor(100 * done / max(n, 1))}%) {msg}", file=sys.stderr, flush=True)

    out = fill(model, args.cache, images(), total, use_onnx=args.onnx, progress=progress)
    bar.close()
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m uniultra.training.cli_commands train ...``)."""
    ap = argparse.ArgumentParser(prog="uniultra")
    sub = ap.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_distill_parser(sub)
    add_cache_parser(sub)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
