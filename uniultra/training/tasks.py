"""The training tasks the :class:`~uniultra.training.engine.Trainer` runs: what differs only.

* :class:`SegmentationTask` (``uniultra train``): a promptable segmenter, built by
  :func:`uniultra.models.build_model` (registry name, architecture or checkpoint, plus an
  adaptation method); only the parameters that receive gradients in single-image training
  train (memory attention/encoder are frozen: unused).  Data: the ``train`` split of each
  dataset, one instance per sample with a simulated prompt (jittered box by default), decoded
  into RAM once, resized to S x S; the decoder's S/4 logits are upsampled to S for the
  promptable loss (:func:`uniultra.training.losses.promptable_loss`).  Several datasets are
  mixed with optional sampling weights.  Checkpoints are adapter-only when the base has weights.
* :class:`DistillTask` (``uniultra distill``): DSKD of a frozen teacher into a student that
  reuses the teacher's prompt encoder and mask decoder (see :mod:`uniultra.training.distill`);
  the teacher's targets come from the teacher, a feature cache, or an embedding cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from uniultra.errors import InputError
from uniultra.training.engine import Task, Trainer, expand_data_dirs, seed_all


def _has_object(source, min_area: float) -> bool:
    """Whether any label map of ``source`` holds an object (stops at the first)."""
    from uniultra.data.datasets import mask_instances

    for i in range(len(source)):
        lab = source.load(i)[1]
        if lab.any() and (min_area <= 0 or mask_instances(lab, min_area)):
            return True
    return False


def _train_data(cfg, roots, S: int, mask_div: int, prompt_kw: dict, need_masks: bool = True):
    """(splits, per-dataset PromptSegDatasets) of the train split, cached in RAM, augmented.
    ``need_masks``: refuse a dataset whose train masks are all empty (nothing to learn from)."""
    from uniultra.data.datasets import PromptSegDataset, UniformDataset
    from uniultra.training.data import AugmentedSource, CachedSource

    min_area = getattr(cfg, "min_area_frac", 0.0)
    splits = []
    for r in roots:
        ds = UniformDataset(r, "train", min_area_frac=min_area, max_images=cfg.max_images)
        if len(ds) == 0:
            raise InputError(f"--data {r}: no images in the train split (split.csv); check the dataset")
        splits.append(ds)
    sources = [CachedSource(ds) if getattr(cfg, "preload", True) else ds for ds in splits]
    if need_masks:
        for r, ds, src in zip(roots, splits, sources):
            if not _has_object(src, min_area):
                raise InputError(f"--data {r}: every mask of the {len(ds)} train images is empty"
                                 f"{' (or smaller than min_area_frac)' if min_area > 0 else ''}; "
                                 "segmentation training needs masks with objects (check masks/)")
    if cfg.augment:
        sources = [AugmentedSource(src, cfg.seed, size=S, **cfg.aug_options) for src in sources]
    pds = [PromptSegDataset(src, S, mask_div=mask_div, augment=False, min_area_frac=min_area, seed=cfg.seed,
                            **prompt_kw) for src in sources]
    return splits, pds


def _vals(cfg, roots):
    from uniultra.training.data import val_set

    return val_set(roots, cfg.val_split, cfg.val_jitter, cfg.val_seed, cfg.val_limit,
                   getattr(cfg, "min_area_frac", 0.0))


# ------------------------------------------------------------------------------------ segmentation
class TeacherHint(nn.Module):
    """Feature hints from a frozen teacher of any family (FitNets-style, as DSKD's feature terms).

    The teacher's image embedding ``[B, C, T, T]`` (LiteMedSAM: 256 x 64 x 64) is the target of
    every feature map the model's decoder reads (its image embedding and high-resolution maps):
    each goes through its own 1x1 convolution to the teacher's width (trained here, discarded
    afterwards) and is compared, after average pooling of the teacher to the map's size, by MSE
    with the teacher's features scaled to unit RMS.  The student keeps its own decoder, so its
    speed is unchanged."""

    def __init__(self, teacher, student_channels: list[int], teacher_channels: int):
        super().__init__()
        self._teacher = (teacher,)  # outside the module tree: frozen, not saved, not synced by DDP
        self.proj = nn.ModuleList([nn.Conv2d(c, teacher_channels, 1) for c in student_channels])

    @staticmethod
    def student_maps(emb: dict) -> list[torch.Tensor]:
        return [emb["image_embed"]] + list(emb.get("high_res_feats") or [])

    def forward(self, images: torch.Tensor, emb: dict) -> tuple[torch.Tensor, dict]:
        import torch.nn.functional as F

        with torch.no_grad():
            t = self._teacher[0].encode(images)["image_embed"].float()
            t = t / t.pow(2).mean().clamp_min(1e-12).sqrt()
        total, parts = None, {}
        for conv, s in zip(self.proj, self.student_maps(emb)):
            size = tuple(s.shape[-2:])
            tt = t if tuple(t.shape[-2:]) == size else F.adaptive_avg_pool2d(t, size)
            term = F.mse_loss(conv(s.float()), tt)
            parts[f"hint{size[0]}"] = term.detach()
            total = term if total is None else total + term
        return total, parts


def frozen_teacher(name: str, device, cache: str | None):
    """A teacher (registry name or checkpoint) in eval mode on ``device``, every parameter frozen,
    reading (and filling) the embedding cache ``cache`` when given: for DSKD and for hints."""
    from uniultra.models import build_model

    teacher = build_model(name, device="cpu")
    teacher.eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cache:
        from uniultra.models.embed_cache import attach

        attach(teacher, cache)
    return teacher


def build_hint(cfg, model, device) -> TeacherHint:
    """The frozen teacher (its embedding cache attached) and the projections for ``model``."""
    try:
        teacher = frozen_teacher(cfg.teacher, device, cfg.teacher_cache)
    except ValueError as e:
        raise InputError(f"--teacher {cfg.teacher}: {e}") from None
    if teacher.image_size != model.image_size:
        raise InputError(f"--teacher {cfg.teacher} works at {teacher.image_size} px and the model at "
                         f"{model.image_size} px: the hints need the same input size")
    S = model.image_size
    x = torch.zeros(1, 3, S, S, device=device)
    with torch.no_grad():
        s_maps = TeacherHint.student_maps(model.encode(x))
        t_ch = int(teacher.sam.sam_mask_decoder.transformer_dim) if hasattr(teacher.sam, "sam_mask_decoder") \
            else int(teacher.encode(x)["image_embed"].shape[1])
    return TeacherHint(teacher, [int(m.shape[1]) for m in s_maps], t_ch).to(device)


class _LossModule(nn.Module):
    """Wraps the model so that DDP sees one forward that returns the loss (plus, with a teacher,
    the weighted feature hints)."""

    def __init__(self, model, weights, two_pass: bool, hint: TeacherHint | None = None, hint_weight: float = 1.0):
        super().__init__()
        self.model, self.weights, self.two_pass = model, weights, two_pass
        self.hint, self.hint_weight = hint, hint_weight

    def forward(self, batch: dict, layout: dict):
        """``layout`` is computed on the CPU copy of the batch (no GPU synchronisation)."""
        if self.hint is None:
            return self._masks(batch, layout, None)
        emb = self.model.encode(batch["image"])
        h_loss, h_parts = self.hint(batch["image"], emb)
        loss, parts = self._masks(batch, layout, emb)
        loss = loss + self.hint_weight * h_loss
        parts.update(h_parts)
        parts["loss"] = loss.detach()
        return loss, parts

    def _masks(self, batch: dict, layout: dict, emb: dict | None):
        from uniultra.training.losses import promptable_loss

        b, n = layout["shape"]
        if layout["rows"].numel() == 0:  # no sample of this batch holds an object (empty masks)
            zero = sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad)
            return zero, {"loss": zero.detach()}
        rows = layout["rows"].to(batch["image"].device, non_blocking=True)
        image_index = torch.div(rows, n, rounding_mode="floor")
        masks = batch["masks"].reshape(b * n, 1, *batch["masks"].shape[-2:])[rows]
        boxes = batch["boxes"].reshape(b * n, 4)[rows]
        pc = batch["point_coords"].reshape(b * n, *batch["point_coords"].shape[2:])[rows]
        pl = batch["point_labels"].reshape(b * n, -1)[rows]
        return promptable_loss(self.model, batch["image"], masks, self.weights, boxes=boxes, point_coords=pc,
                               point_labels=pl, two_pass=self.two_pass, has_box=layout["has_box"],
                               image_index=image_index, has_points=layout["has_points"], sync=False, emb=emb)


def batch_layout(batch: dict) -> dict:
    """Which prompt rows are real, which have boxes or points (from the CPU batch)."""
    valid = batch["valid"]
    b, n = valid.shape
    rows = torch.nonzero(valid.reshape(-1)).flatten()
    pl = batch["point_labels"].reshape(b * n, -1)[rows]
    return {"shape": (b, n), "rows": rows, "has_box": batch["has_box"].reshape(-1)[rows].clone(),
            "has_points": bool((pl >= 0).any())}


def base_identity(cfg, model) -> tuple[str | None, str | None]:
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


class SegmentationTask(Task):
    """Promptable segmentation of a (possibly adapted) model: ``uniultra train``."""

    name = "train"

    def setup(self, trainer: Trainer) -> None:
        from uniultra.data.datasets import combine
        from uniultra.models import build_model
        from uniultra.models.peft import updated_parameter_names
        from uniultra.training.data import SaltedConcat
        from uniultra.training.losses import LossWeights

        cfg, device = trainer.cfg, trainer.device
        self.cfg = cfg
        self.roots = expand_data_dirs(cfg.data)
        seed_all(cfg.seed)
        try:
            model = build_model(cfg.model, image_size=cfg.image_size, peft=cfg.peft, peft_options=cfg.peft_options,
                                scope=cfg.scope, device="cpu", random_init=cfg.random_init)
        except InputError:
            raise
        except ValueError as e:  # unknown method/option/size from the model builder
            raise InputError(f"--model {cfg.model} --peft {cfg.peft}: {e}") from None
        if cfg.image_size is not None and model.image_size != cfg.image_size:
            raise InputError(f"--image-size {cfg.image_size} does not match the model ({model.image_size})")
        cfg.image_size = S = model.image_size
        if cfg.box_prior is not None:
            from uniultra.models.prior import set_prior

            set_prior(model, cfg.box_prior)
        splits, pds = _train_data(cfg, self.roots, S, 1, dict(
            max_instances=cfg.max_instances, prompt=cfg.prompt, jitter=cfg.jitter, shift_px=cfg.shift_px,
            n_pos=cfg.n_pos, n_neg=cfg.n_neg))
        self.dataset = SaltedConcat(pds)
        self.data_counts = {r.name: len(ds) for r, ds in zip(self.roots, splits)}
        if cfg.data_weights is not None:
            if len(cfg.data_weights) != len(pds):
                raise InputError(f"--data-weights: give one weight per dataset ({len(pds)}: "
                                 f"{', '.join(r.name for r in self.roots)})")
            self.weights = combine(pds, cfg.data_weights).sample_weights
        self.vals = _vals(cfg, self.roots)
        used = set(updated_parameter_names(model.sam))
        for n, p in model.sam.named_parameters():
            if p.requires_grad and n not in used:
                p.requires_grad_(False)  # unused in single-image training (memory modules)
        model.to(device)
        if cfg.embed_cache:
            from uniultra.models.embed_cache import attach

            attach(model, cfg.embed_cache)
        self.model = model
        if not self.trainable():
            raise InputError(f"--peft {cfg.peft}: nothing to train")
        self.hint = None
        if cfg.teacher:
            self.hint = build_hint(cfg, model, device)
            if cfg.augment and cfg.teacher_cache:
                trainer.events.emit("note", message="note: with augmentation every image is new, so the teacher "
                                    "cache cannot serve it: the teacher's encoder runs at every step")
        self.module = _LossModule(model, LossWeights.parse(cfg.loss_weights), cfg.two_pass, self.hint,
                                  cfg.hint_weight)
        self.base, self.base_sha = base_identity(cfg, model)
        self.adapter_only = bool(cfg.adapter_only and self.base is not None)

    def inputs(self, batch: dict, device: torch.device) -> tuple:
        layout = batch_layout(batch)
        return super().inputs(batch, device)[0], layout

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"hint": self.hint.proj} if self.hint is not None else {}

    def checkpoint_meta(self) -> dict:
        meta = {"base": self.base, "base_sha256": self.base_sha, "method": (self.model.peft or {}).get("method"),
                "datasets": [r.name for r in self.roots], "train_images": len(self.dataset),
                "image_size": self.model.image_size, "seed": self.cfg.seed, "val_jitter": self.cfg.val_jitter}
        if self.cfg.teacher:
            meta.update(hints_from=str(self.cfg.teacher), hint_weight=self.cfg.hint_weight)
        return meta

    def registration(self, cfg) -> tuple[str | None, str, dict]:
        method = (self.model.peft or {}).get("method")
        desc = cfg.description or f"trained from {cfg.model} on {', '.join(r.name for r in self.roots)}"
        return method, desc, {"base": cfg.model, "method": method}


# ------------------------------------------------------------------------------------ distillation
class _DistillModule(nn.Module):
    """Student forward + DSKD loss; the frozen teacher is held outside the module tree (DDP
    neither broadcasts nor syncs it, ``train()`` leaves it in eval mode)."""

    def __init__(self, student, teacher, t_tap, s_tap, proj: nn.ModuleDict, cfg):
        super().__init__()
        self.student, self.proj = student, proj
        self._teacher = (teacher, t_tap)
        self.s_tap, self.level_terms = s_tap, cfg.level_terms
        self.fpn_weight, self.level_weight = cfg.fpn_weight, cfg.level_weight

    def forward(self, x: torch.Tensor, target: dict | None):
        from uniultra.training.distill import distill_loss, teacher_targets

        if target is None:
            target = teacher_targets(*self._teacher, x, self.level_terms)
        if self.s_tap is not None:
            self.s_tap.clear()
        emb = self.student.encode(x)
        s_out = {f"fpn{i}": f for i, f in enumerate(emb["fpn"])}
        if self.s_tap is not None:
            s_out.update(self.s_tap.terms())
        return distill_loss(s_out, target, self.proj, self.fpn_weight, self.level_weight)


class DistillTask(Task):
    """DSKD: the student's image encoder learns the teacher's features: ``uniultra distill``."""

    name = "distill"

    def setup(self, trainer: Trainer) -> None:
        from uniultra.training import distill as D
        from uniultra.training.data import SaltedConcat

        cfg, device = trainer.cfg, trainer.device
        self.cfg, self.half = cfg, cfg.half
        self.taps = []
        teacher = frozen_teacher(cfg.teacher, device, cfg.embed_cache)
        S = int(cfg.image_size or teacher.image_size)
        if S != teacher.image_size:
            raise InputError(f"--image-size {S}: the teacher {cfg.teacher} works at {teacher.image_size} px; "
                             "teacher and student must use the same size")
        cfg.image_size = S
        t_enc = teacher.sam.image_encoder
        tinyvit = not hasattr(t_enc, "trunk") and hasattr(t_enc, "layers")  # LiteMedSAM's TinyViT
        if cfg.level_terms and not (hasattr(t_enc, "trunk") or tinyvit):
            trainer.events.emit("note", message=f"note: {teacher.arch.name} has neither a Hiera nor a TinyViT trunk, "
                                "so the block/adapter/sum level terms do not apply: distilling the image embedding "
                                "its decoder reads")
            cfg.level_terms = False
        seed_all(cfg.seed)
        student = D.build_student(teacher, cfg.student, S, device, init=cfg.student_init)
        t_tap = s_tap = None
        proj = nn.ModuleDict()
        if cfg.level_terms:
            s_trunk = student.sam.image_encoder.trunk
            s_blocks = D.stage_end_blocks(s_trunk)
            s_tap = D.FeatureTap(s_trunk, s_blocks)
            if tinyvit:
                t_tap = D.TinyViTTap(t_enc, D.student_level_sizes(student, s_tap, S))
                t_dims = t_tap.dims
            else:
                t_blocks = D.stage_end_blocks(t_enc.trunk)
                t_tap, t_dims = D.FeatureTap(t_enc.trunk, t_blocks), D.stage_dims(t_enc.trunk, t_blocks)
            self.taps = [t_tap, s_tap]
            proj = D.make_projections(s_tap, t_tap, D.stage_dims(s_trunk, s_blocks), t_dims)
        proj.to(device)
        self.model, self.proj = student, proj

        self.roots = expand_data_dirs(cfg.data)
        # the masks matter only to the fine-tuning stage: refuse empty ones before distilling, not after
        splits, pds = _train_data(cfg, self.roots, S, 4, {"prompt": "box"}, need_masks=cfg.finetune_steps > 0)
        concat = SaltedConcat(pds)
        self.data_counts = {r.name: len(ds) for r, ds in zip(self.roots, splits)}
        keys = [f"{ds.name}__{r.id}" for ds in splits for r in ds.records]
        cache = None
        if cfg.cache_dir:
            from uniultra.models.embed_cache import encoder_fingerprint

            # keyed by the teacher's encoder weights: two teachers both saved as model.pt never share
            # targets, while teachers with one frozen encoder (decoder-only fine-tunes) do
            cache = Path(cfg.cache_dir).expanduser() / (f"{Path(str(cfg.teacher)).stem}_{S}_{int(cfg.level_terms)}_"
                                                       f"{encoder_fingerprint(teacher)[:12]}")
            D.build_cache(teacher, t_tap, concat, keys, cache, device, cfg.level_terms, progress=trainer.progress)
        self.dataset = D.TeacherTargets(concat, cache, keys)
        self.vals = _vals(cfg, self.roots)
        self.module = _DistillModule(student, teacher, t_tap, s_tap, proj, cfg)

    def inputs(self, batch: dict, device: torch.device) -> tuple:
        target = {k[2:]: v.to(device).float() for k, v in batch.items() if k.startswith("t_")}
        return batch["image"].to(device), (target or None)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"proj": self.proj}

    def checkpoint_meta(self) -> dict:
        return {"distilled_from": str(self.cfg.teacher), "method": "dskd",
                "datasets": [r.name for r in self.roots], "level_terms": self.cfg.level_terms}

    def title(self) -> str:
        return f"DSKD {self.cfg.student} <- {self.cfg.teacher}"

    def registration(self, cfg) -> tuple[str | None, str, dict]:
        return "ch-adapter", cfg.description or f"DSKD student of {cfg.teacher}", \
            {"base": str(cfg.teacher), "method": "dskd"}

    def summary(self, result: dict) -> None:
        if result.get("model"):
            result["student"] = result["model"]

    def close(self) -> None:
        for tap in getattr(self, "taps", []):  # none when the run was refused before setup
            tap.remove()
        self.taps = []


__all__ = ["SegmentationTask", "DistillTask", "batch_layout", "base_identity"]
