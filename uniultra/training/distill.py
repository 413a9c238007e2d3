"""DSKD: deep-supervised knowledge distillation of a UniUltra teacher into a tiny student.

``distill(DistillConfig(teacher=..., data=[...], out=...))``

* Teacher: any :class:`~uniultra.models.UniUltraModel` (registry name or checkpoint), frozen, eval.
* Student: ``uniultra-student-e{D}`` built with :func:`uniultra.models.build_model` (Hiera-T layout
  with embed_dim D, CH-Adapters, its own FPN neck) at the teacher's image size.  It **copies the
  teacher's prompt encoder, mask decoder (including the high-resolution projections conv_s0 /
  conv_s1) and no_mem_embed, frozen**, so only its image encoder trains and, at inference, its
  FPN features are decoded by the teacher's decoder.
* Loss (per image, summed over terms):
  - ``fpn``: MSE between the teacher's and the student's three FPN outputs used by the decoder
    (256 x S/4, 256 x S/8, 256 x S/16: ``encode(x)["fpn"]``);
  - ``level_terms=True`` (the paper's figure): at the last block of each of the first three Hiera
    stages (the stages that feed those FPN levels), the block feature (its MLP branch), the
    CH-Adapter feature (0.5 x adapter output) and their sum, captured with forward hooks on
    ``block.mlp`` and ``block.ch_adapter``.  Teacher and student widths differ, so the student's
    features go through a learned linear projection (one per level and term, discarded after
    training) before the MSE.  A term is skipped when the teacher has no CH-Adapters (then only
    the block feature is matched).
* Optional end-to-end fine-tuning of the student afterwards (``finetune_steps``) with the
  segmentation loss via :func:`uniultra.training.trainer.train` (encoder and decoder train).
* ``cache_dir``: the teacher's targets are computed once per training image (no augmentation)
  and stored as fp16 ``.pt`` files, so later epochs (and later runs) need no teacher forward --
  the student then trains fast on a CPU.  At S=256 this is ~2.7 MB per image for the FPN maps.
* Files in ``out``: ``model.pt`` (the student, a full checkpoint, best by val Dice when a val split exists,
  else the last), ``last.pt`` (resume state), ``metrics.csv``, ``curves.png``, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from uniultra.errors import InputError


@dataclass
class DistillConfig:
    teacher: str
    data: list[str]
    out: str
    student: str = "uniultra-student-e16"
    image_size: int | None = None        # default: the teacher's
    epochs: int = 100
    steps: int | None = None
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "exp"                # exp (paper: 0.98 per epoch) | constant | cosine
    gamma: float = 0.98
    level_terms: bool = True
    level_weight: float = 1.0
    fpn_weight: float = 1.0
    cache_dir: str | None = None
    augment: bool = False                # only without a feature cache
    val_every: int = 0                   # steps; 0 = every epoch
    val_limit: int | None = None
    val_jitter: float = 0.1
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    resume: bool = False
    overwrite: bool = False
    register: str | None = None
    half: bool = False
    log_every: int = 10
    progress_bar: bool = True
    threads: int | None = None
    extra: dict = field(default_factory=dict)
    max_images: int | None = None        # per dataset, evenly spread over the train split
    embed_cache: str | None = None       # the teacher's embeddings from a shared embedding cache
    finetune_loss_weights: str = "dice=1,bce=1,iou=1"
    finetune_augment: bool = True


# ------------------------------------------------------------------------------------ features
def stage_end_blocks(trunk) -> list[int]:
    """Index of the last block of each of the first three stages (the FPN levels' sources)."""
    return list(trunk.stage_ends[:3])


class FeatureTap:
    """Forward hooks that record, at chosen Hiera blocks, the MLP-branch output ("block") and the
    scaled CH-Adapter output ("adapter"), channels-last ``[B, H, W, C]``."""

    def __init__(self, trunk, blocks: list[int]):
        from uniultra.models.ch_adapter import ADAPTER_SCALE

        self.feats: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []
        self.has_adapter = True
        for level, bi in enumerate(blocks):
            blk = trunk.blocks[bi]
            self.handles.append(blk.mlp.register_forward_hook(self._hook(level, "block", 1.0)))
            if hasattr(blk, "ch_adapter"):
                self.handles.append(blk.ch_adapter.register_forward_hook(self._hook(level, "adapter", ADAPTER_SCALE)))
            else:
                self.has_adapter = False

    def _hook(self, level, kind, scale):
        def fn(_mod, _inp, out):
            self.feats[(level, kind)] = out * scale if scale != 1.0 else out
        return fn

    def terms(self) -> dict[str, torch.Tensor]:
        out = {}
        for (level, kind), v in self.feats.items():
            out[f"{kind}{level}"] = v
        for level in range(3):
            if (level, "block") in self.feats and (level, "adapter") in self.feats:
                out[f"sum{level}"] = self.feats[(level, "block")] + self.feats[(level, "adapter")]
        return out

    def clear(self):
        self.feats = {}

    def remove(self):
        for h in self.handles:
            h.remove()


def teacher_targets(teacher, tap: FeatureTap | None, x: torch.Tensor, level_terms: bool) -> dict:
    """Teacher FPN maps (and hooked level terms) for a batch, detached."""
    with torch.no_grad():
        if tap is not None:
            tap.clear()
        emb = teacher.encode(x)
        out = {f"fpn{i}": f.detach() for i, f in enumerate(emb["fpn"])}
        if tap is not None and level_terms:
            out.update({k: v.detach() for k, v in tap.terms().items()})
    return out


def distill_loss(student_out: dict, target: dict, proj: nn.ModuleDict, fpn_weight: float = 1.0,
                 level_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Sum of MSE terms; student level terms are projected to the teacher's width first."""
    total = None
    parts = {}
    for k, t in target.items():
        if k not in student_out:
            continue
        s = student_out[k]
        if k.startswith("fpn"):
            w = fpn_weight
        else:
            w = level_weight
            s = proj[k](s)
        term = F.mse_loss(s.float(), t.float())
        parts[k] = term.detach()
        total = w * term if total is None else total + w * term
    return total, parts


def make_projections(student_tap: FeatureTap, teacher_tap: FeatureTap, s_dims: list[int], t_dims: list[int],
                     level_terms: bool) -> nn.ModuleDict:
    proj = nn.ModuleDict()
    if not level_terms:
        return proj
    kinds = ["block"] + (["adapter", "sum"] if student_tap.has_adapter and teacher_tap.has_adapter else [])
    for level in range(3):
        for kind in kinds:
            proj[f"{kind}{level}"] = nn.Linear(s_dims[level], t_dims[level])
    return proj


def _stage_dims(trunk, blocks):
    return [trunk.blocks[b].dim_out for b in blocks]


# ------------------------------------------------------------------------------------ cache
class _ImageItems(torch.utils.data.Dataset):
    """Images (``PromptSegDataset`` items) plus, with a cache, the teacher's stored targets."""

    def __init__(self, concat, cache: Path | None, keys: list[str]):
        self.concat, self.cache, self.keys = concat, cache, keys

    def __len__(self):
        return len(self.concat)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        item = self.concat[key]
        out = {"image": item["image"], "index": int(i)}
        if self.cache is not None:
            t = torch.load(self.cache / f"{self.keys[i]}.pt", map_location="cpu", weights_only=True)
            out.update({f"t_{k}": v for k, v in t.items()})
        return out


def build_cache(teacher, tap, concat, keys: list[str], cache: Path, device, level_terms: bool, batch: int = 8,
                progress=None) -> None:
    """Write the teacher's fp16 targets for every item that has no file yet."""
    cache.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(concat)) if not (cache / f"{keys[i]}.pt").is_file()]
    from uniultra.models.checkpoint import atomic_torch_save

    for k in range(0, len(todo), batch):
        idx = todo[k: k + batch]
        x = torch.stack([concat[(i, 0)]["image"] for i in idx]).to(device)
        tg = teacher_targets(teacher, tap, x, level_terms)
        for j, i in enumerate(idx):
            atomic_torch_save({n: v[j].half().cpu().clone() for n, v in tg.items()}, cache / f"{keys[i]}.pt")
        if progress:
            progress(min(k + batch, len(todo)), len(todo), "caching teacher features")


# ------------------------------------------------------------------------------------ main
def build_student(teacher, arch: str, image_size: int, device="cpu"):
    """The student with the teacher's prompt encoder, mask decoder and no_mem_embed (frozen)."""
    from uniultra.models import build_model
    from uniultra.models.architectures import canonical_arch

    try:
        is_student = canonical_arch(arch).is_student
    except ValueError:
        is_student = False
    if not is_student:
        raise InputError(f"--student {arch}: not a student architecture; use uniultra-student-e8/16/24/32/48 "
                         "(or uniultra-student-e16-lm for a LiteMedSAM teacher)")
    t_family = getattr(teacher.arch, "family", "sam2")
    s_family = canonical_arch(arch).family
    if (t_family == "sam2") != (s_family == "sam2"):
        want = "uniultra-student-e{8,16,24,32,48}-lm (uniultra-mini-lm)" if t_family != "sam2" \
            else "uniultra-student-e{8,16,24,32,48}"
        raise InputError(f"--student {arch} cannot reuse the decoder of teacher {teacher.name} ({teacher.arch.name}): "
                         f"use {want}")
    student = build_model(arch, image_size=image_size, device="cpu", random_init=True)
    st, tt = student.sam, teacher.sam
    st.sam_prompt_encoder.load_state_dict(tt.sam_prompt_encoder.state_dict())
    st.sam_mask_decoder.load_state_dict(tt.sam_mask_decoder.state_dict())
    if hasattr(st, "no_mem_embed"):
        with torch.no_grad():
            st.no_mem_embed.copy_(tt.no_mem_embed)
    for n, p in st.named_parameters():
        p.requires_grad_(n.startswith("image_encoder."))
    student.peft = {"method": "ch-adapter", "scope": "encoder+decoder", "options": {},
                    "distilled_from": getattr(teacher, "name", None)}
    return student.to(device)


def distill(config: DistillConfig, progress: Callable | bool | None = None, cancel: Callable[[], bool] | None = None,
            log: Callable[[str], None] | None = None) -> dict:
    """Run DSKD (see the module doc); returns a summary dict."""
    from uniultra.data.datasets import PromptSegDataset, UniformDataset
    from uniultra.models import build_model
    from uniultra.models.checkpoint import atomic_torch_save, save_checkpoint
    from uniultra.training.data import AugmentedSource, CachedSource, EpochSampler, SaltedConcat, val_set
    from uniultra.training.trainer import (
        Schedule,
        _rng_state,
        _seed_all,
        _set_rng_state,
        _write_csv,
        expand_data_dirs,
        plot_curves,
        resolve_device,
        sigint_stop,
        validate,
    )

    cfg = config
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # see trainer.py: denormals make CPU training far slower
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    last_path = out / "last.pt"
    if last_path.exists() and not cfg.resume and not cfg.overwrite:
        raise InputError(f"--out {out} already holds a run (last.pt): pass --resume or choose another --out")
    if cfg.cache_dir and cfg.augment:
        raise InputError("--cache-features needs --no-augment (cached teacher features are per fixed image)")

    teacher = build_model(cfg.teacher, device="cpu")
    S = int(cfg.image_size or teacher.image_size)
    if S != teacher.image_size:
        raise InputError(f"--image-size {S}: the teacher {cfg.teacher} works at {teacher.image_size} px; "
                         "teacher and student must use the same size")
    teacher.eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.embed_cache:
        from uniultra.models.embed_cache import attach

        if cfg.augment:
            raise InputError("--embed-cache needs --no-augment: cached embeddings belong to fixed images")
        attach(teacher, cfg.embed_cache)
    if cfg.level_terms and not hasattr(teacher.sam.image_encoder, "trunk"):
        say(f"note: {teacher.arch.name} has no Hiera trunk, so the block/adapter/sum level terms do not apply: "
            "distilling the image embedding its decoder reads")
        cfg.level_terms = False
    _seed_all(cfg.seed)
    student = build_student(teacher, cfg.student, S, device)
    t_blocks = stage_end_blocks(teacher.sam.image_encoder.trunk)
    s_blocks = stage_end_blocks(student.sam.image_encoder.trunk)
    t_tap = FeatureTap(teacher.sam.image_encoder.trunk, t_blocks) if cfg.level_terms else None
    s_tap = FeatureTap(student.sam.image_encoder.trunk, s_blocks) if cfg.level_terms else None
    proj = make_projections(s_tap, t_tap, _stage_dims(student.sam.image_encoder.trunk, s_blocks),
                            _stage_dims(teacher.sam.image_encoder.trunk, t_blocks), cfg.level_terms) \
        if cfg.level_terms else nn.ModuleDict()
    proj.to(device)

    roots = expand_data_dirs(cfg.data)
    splits = [UniformDataset(r, "train", max_images=cfg.max_images) for r in roots]
    sources = [CachedSource(ds) for ds in splits]
    if cfg.augment:
        sources = [AugmentedSource(src, cfg.seed, size=S) for src in sources]
    pds = [PromptSegDataset(src, S, mask_div=4, prompt="box", seed=cfg.seed) for src in sources]
    concat = SaltedConcat(pds)
    keys = [f"{ds.name}__{r.id}" for ds in splits for r in ds.records]
    cache = None
    if cfg.cache_dir:
        cache = Path(cfg.cache_dir).expanduser() / f"{Path(str(cfg.teacher)).stem}_{S}_{int(cfg.level_terms)}"
        build_cache(teacher, t_tap, concat, keys, cache, device, cfg.level_terms,
                    progress=progress if callable(progress) else None)
    items = _ImageItems(concat, cache, keys)

    steps_per_epoch = max(1, len(items) // cfg.batch_size)
    total = cfg.steps or cfg.epochs * steps_per_epoch
    val_every = cfg.val_every or steps_per_epoch
    sampler = EpochSampler(len(items), steps_per_epoch * cfg.batch_size, cfg.seed)
    vals = val_set(roots, "val", cfg.val_jitter, 0, cfg.val_limit)

    params = [p for p in student.parameters() if p.requires_grad] + list(proj.parameters())
    opt = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(cfg.schedule, total, steps_per_epoch, 0, cfg.gamma))
    trainable = [(n, p) for n, p in student.sam.named_parameters() if p.requires_grad]
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best": -1.0, "best_step": 0, "history": [],
             "best_val": {}, "first_loss": None}
    if cfg.resume and last_path.is_file():
        ck = torch.load(last_path, map_location="cpu", weights_only=False)
        sd = dict(student.sam.named_parameters())
        with torch.no_grad():
            for n, _ in trainable:
                sd[n].copy_(ck["trainable"][n])
        proj.load_state_dict(ck["proj"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state.update(ck["state"])
        _set_rng_state(ck["rng"])
        say(f"resumed {last_path} at step {state['step']}/{total}")

    meta = {"distilled_from": str(cfg.teacher), "method": "dskd", "datasets": [r.name for r in roots],
            "level_terms": cfg.level_terms}

    def save_resume():
        atomic_torch_save({"trainable": {n: p.detach().cpu().clone() for n, p in trainable},
                           "proj": proj.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "rng": _rng_state(), "state": state,
                           "config": asdict(cfg)}, last_path)

    stop, restore_sigint = sigint_stop()
    bar = None
    if progress is True or (progress is None and cfg.progress_bar):
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state["step"], desc="distill", unit="step", dynamic_ncols=True)
    loader = torch.utils.data.DataLoader(items, batch_size=cfg.batch_size, sampler=sampler,
                                         num_workers=cfg.num_workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg.seed),
                                         persistent_workers=cfg.num_workers > 0)
    status = "finished"
    t0 = time.perf_counter()
    run_loss, run_n = 0.0, 0
    student.train()
    try:
        while state["step"] < total:
            sampler.set_epoch(state["epoch"], state["step_in_epoch"] * cfg.batch_size)
            it = iter(loader)
            while state["step_in_epoch"] < steps_per_epoch and state["step"] < total:
                batch = next(it)
                x = batch["image"].to(device)
                if cache is not None:
                    target = {k[2:]: v.to(device).float() for k, v in batch.items() if k.startswith("t_")}
                else:
                    target = teacher_targets(teacher, t_tap, x, cfg.level_terms)
                if s_tap is not None:
                    s_tap.clear()
                emb = student.encode(x)
                s_out = {f"fpn{i}": f for i, f in enumerate(emb["fpn"])}
                if s_tap is not None:
                    s_out.update(s_tap.terms())
                loss, parts = distill_loss(s_out, target, proj, cfg.fpn_weight, cfg.level_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                lv = float(loss.detach())
                if state["first_loss"] is None:
                    state["first_loss"] = lv
                run_loss += lv
                run_n += 1
                state["step"] += 1
                state["step_in_epoch"] += 1
                step = state["step"]
                row = None
                if step % cfg.log_every == 0 or step % val_every == 0 or step == total:
                    row = {"step": step, "epoch": state["epoch"] + state["step_in_epoch"] / steps_per_epoch,
                           "lr": opt.param_groups[0]["lr"], "train_loss": run_loss / max(1, run_n),
                           "elapsed_s": time.perf_counter() - t0}
                    run_loss, run_n = 0.0, 0
                if vals and (step % val_every == 0 or step == total):
                    v = validate(student, vals, device, None)
                    row["val_dice"] = v["mean"]
                    if v["mean"] > state["best"]:
                        state.update(best=v["mean"], best_step=step, best_val=v)
                        save_checkpoint(student, out / "model.pt", {**meta, "val_dice": v["mean"], "step": step},
                                        half=cfg.half)
                    say(f"step {step}: distill loss {row['train_loss']:.5f}, student val Dice {v['mean']:.4f}")
                if row is not None:
                    state["history"].append(row)
                    _write_csv(out / "metrics.csv", state["history"],
                               ["step", "epoch", "lr", "train_loss", "val_dice", "elapsed_s"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{lv:.4f}")
                if callable(progress):
                    progress(step, total, f"distill step {step}/{total} loss {lv:.5f}")
                if state["step_in_epoch"] >= steps_per_epoch:
                    state["epoch"] += 1
                    state["step_in_epoch"] = 0
                    ended = True
                else:
                    ended = False
                want_stop = stop["flag"] or bool(cancel is not None and cancel())
                if want_stop or step == total or (row is not None and "val_dice" in row):
                    save_resume()
                if want_stop:
                    status = "cancelled"
                    break
                if ended:
                    break
            del it
            if status != "finished":
                break
    finally:
        if bar is not None:
            bar.close()
        restore_sigint()
        for tap in (t_tap, s_tap):
            if tap is not None:
                tap.remove()

    result = {"status": status, "step": state["step"], "total_steps": total, "first_loss": state["first_loss"],
              "last_loss": state["history"][-1]["train_loss"] if state["history"] else None,
              "best_val_dice": state["best"] if vals else None, "best_step": state["best_step"],
              "params": student.param_report(), "out": str(out)}
    if status == "cancelled":
        (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
        return result
    student_path = out / "model.pt"
    if not vals or not student_path.is_file():
        save_checkpoint(student, student_path, meta, half=cfg.half)
    result["student"] = result["model"] = str(student_path)
    if state["history"]:
        with contextlib.suppress(Exception):
            plot_curves(state["history"], out / "curves.png", title=f"DSKD {cfg.student} <- {cfg.teacher}")
    if cfg.finetune_steps > 0:
        from uniultra.training.trainer import TrainConfig, train

        ft = train(TrainConfig(data=list(cfg.data), out=str(out / "finetune"), model=str(student_path), peft=None,
                               image_size=S, steps=cfg.finetune_steps, batch_size=cfg.batch_size,
                               lr=cfg.finetune_lr, optimizer="adamw", schedule="cosine", device=cfg.device,
                               seed=cfg.seed, adapter_only=False, overwrite=True, resume=cfg.resume,
                               val_limit=cfg.val_limit, num_workers=cfg.num_workers,
                               loss_weights=cfg.finetune_loss_weights, augment=cfg.finetune_augment,
                               max_images=cfg.max_images, threads=cfg.threads,
                               progress_bar=cfg.progress_bar), progress=progress, cancel=cancel, log=log)
        result["finetune"] = ft
        if ft.get("model"):
            result["student"] = result["model"] = ft["model"]
    if cfg.register:
        from uniultra.models.registry import register_user_model

        entry = register_user_model(cfg.register, Path(result["student"]), student.arch.name, S, "ch-adapter",
                                    description=f"DSKD student of {cfg.teacher}",
                                    extra={"base": str(cfg.teacher), "method": "dskd",
                                           "data": {r.name: len(d) for r, d in zip(roots, splits)},
                                           "date": _dt.datetime.now().isoformat(timespec="seconds"),
                                           "val_dice": result["best_val_dice"]})
        result["registered"] = entry.name
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


__all__ = ["DistillConfig", "distill", "build_student", "FeatureTap", "distill_loss", "teacher_targets"]
