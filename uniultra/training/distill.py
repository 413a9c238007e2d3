"""DSKD: deep-supervised knowledge distillation of a UniUltra teacher into a tiny student.

``distill(DistillConfig(teacher=..., data=[...], out=...))`` runs
:class:`~uniultra.training.tasks.DistillTask` in the one :class:`~uniultra.training.engine.Trainer`
(the loop, checkpoints, resume, events), then optionally fine-tunes the student end to end with
:class:`~uniultra.training.tasks.SegmentationTask` in the same trainer.  This module holds what
is particular to distillation: the student, the features and the loss.

* Teacher: any :class:`~uniultra.models.UniUltraModel` (registry name or checkpoint), frozen, eval.
* Student: ``uniultra-student-e{D}`` (``-lm`` for a LiteMedSAM teacher) at the teacher's image
  size.  It **copies the teacher's prompt encoder, mask decoder (including the high-resolution
  projections) and no_mem_embed, frozen**, so only its image encoder trains and, at inference,
  its features are decoded by the teacher's decoder.
* Loss (per image, summed over terms):
  - ``fpn``: MSE between the teacher's and the student's FPN outputs that the decoder reads
    (``encode(x)["fpn"]``);
  - ``level_terms=True`` (the paper's figure): at the last block of each of the first three Hiera
    stages, the block feature (its MLP branch), the CH-Adapter feature (0.5 x adapter output) and
    their sum, captured with forward hooks.  Teacher and student widths differ, so the student's
    features go through a learned linear projection (one per level and term, discarded after
    training) before the MSE.  A teacher without CH-Adapters gives only the block term.  A
    LiteMedSAM teacher gives the same terms at the last attention block of each TinyViT attention
    stage (:class:`TinyViTTap`), average-pooled to the student's grid.
* ``cache_dir``: the teacher's targets are computed once per training image (no augmentation) and
  stored as fp16 ``.pt`` files, so later epochs and runs need no teacher forward (~2.7 MB per
  image at S=256).  ``embed_cache``: the teacher's embeddings from a shared embedding cache.
* Files in ``out``: as for training (``model.pt`` = the student, best by val Dice), and
  ``finetune/`` for the fine-tuning run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from uniultra.errors import InputError
from uniultra.events import Progress
from uniultra.training.config import DistillConfig, TrainConfig


# ------------------------------------------------------------------------------------ features
def stage_end_blocks(trunk) -> list[int]:
    """Index of the last block of each of the first three stages (the FPN levels' sources)."""
    return list(trunk.stage_ends[:3])


def stage_dims(trunk, blocks) -> list[int]:
    return [trunk.blocks[b].dim_out for b in blocks]


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
        out = {f"{kind}{level}": v for (level, kind), v in self.feats.items()}
        for level in range(3):
            if (level, "block") in self.feats and (level, "adapter") in self.feats:
                out[f"sum{level}"] = self.feats[(level, "block")] + self.feats[(level, "adapter")]
        return out

    def clear(self):
        self.feats = {}

    def remove(self):
        for h in self.handles:
            h.remove()


def tinyvit_level_blocks(trunk) -> list[nn.Module]:
    """The last attention block of each of TinyViT's three attention stages (``layers[1:]``; the
    first stage is convolutional and has no MLP or adapter), LiteMedSAM's counterpart of the
    first three Hiera stage ends."""
    from uniultra.models.litemedsam import tinyvit_blocks

    ends = []
    for layer in list(trunk.layers)[1:]:
        mine = [b for b in tinyvit_blocks(trunk) if any(b is c for c in getattr(layer, "blocks", []))]
        if mine:
            ends.append(mine[-1])
    return ends[:3]


class TinyViTTap:
    """The level terms of a LiteMedSAM (TinyViT) teacher, as :class:`FeatureTap` gives them for
    Hiera: at the last attention block of each attention stage, the MLP-branch output ("block",
    recorded before the CH-Adapter's hook adds to it) and the scaled CH-Adapter output ("adapter",
    when the teacher has adapters), channels-last ``[B, H, W, C]``.

    TinyViT in LiteMedSAM runs at 2 to 4 times the student's resolution at each level (128, 64, 64
    against 64, 32, 16 at 256 px), so each map is average-pooled to the student's level size
    ``sizes[level]``: the student learns the teacher's feature at its own grid."""

    def __init__(self, trunk, sizes: list[tuple[int, int]]):
        from uniultra.models.ch_adapter import ADAPTER_SCALE

        self.feats: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []
        self.blocks = tinyvit_level_blocks(trunk)
        if len(self.blocks) != 3 or len(sizes) != 3:
            raise ValueError(f"expected three TinyViT attention stages and three student levels, got "
                             f"{len(self.blocks)} and {len(sizes)}")
        self.sizes = [tuple(int(v) for v in hw) for hw in sizes]
        self.has_adapter = all(hasattr(b.mlp, "ch_adapter") for b in self.blocks)
        for level, blk in enumerate(self.blocks):
            # prepend: before the CH-Adapter's own forward hook adds its output to the MLP's
            self.handles.append(blk.mlp.register_forward_hook(self._hook(level, "block", 1.0, blk), prepend=True))
            if self.has_adapter:
                self.handles.append(blk.mlp.ch_adapter.register_forward_hook(
                    self._hook(level, "adapter", ADAPTER_SCALE, blk)))

    def _hook(self, level, kind, scale, blk):
        def fn(_mod, _inp, out):
            h, w = blk.input_resolution
            t = out.reshape(out.shape[0], h, w, out.shape[-1]) if out.dim() == 3 else out
            t = t * scale if scale != 1.0 else t
            self.feats[(level, kind)] = self._pool(t, self.sizes[level])
        return fn

    @staticmethod
    def _pool(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if tuple(t.shape[1:3]) == hw:
            return t
        return F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2), hw).permute(0, 2, 3, 1)

    @property
    def dims(self) -> list[int]:
        return [int(b.dim) for b in self.blocks]

    terms = FeatureTap.terms
    clear = FeatureTap.clear
    remove = FeatureTap.remove


def student_level_sizes(student, s_tap: FeatureTap, image_size: int) -> list[tuple[int, int]]:
    """The grid of the student's three level features at ``image_size`` (one small forward)."""
    p = next(student.parameters())
    s_tap.clear()
    with torch.no_grad():
        student.encode(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    sizes = [tuple(s_tap.feats[(level, "block")].shape[1:3]) for level in range(3)]
    s_tap.clear()
    return sizes


def teacher_targets(teacher, tap: FeatureTap | TinyViTTap | None, x: torch.Tensor, level_terms: bool) -> dict:
    """Teacher FPN maps (and hooked level terms) for a batch, detached.  With level terms the
    teacher's encoder really runs (an attached embedding cache would skip it and its hooks)."""
    with torch.no_grad():
        if tap is not None:
            tap.clear()
        encode = teacher.encode
        if tap is not None and level_terms and getattr(teacher, "_embed_cache", None) is not None:
            encode = type(teacher).encode.__get__(teacher)
        emb = encode(x)
        out = {f"fpn{i}": f.detach() for i, f in enumerate(emb["fpn"])}
        if tap is not None and level_terms:
            out.update({k: v.detach() for k, v in tap.terms().items()})
    return out


def make_projections(student_tap: FeatureTap, teacher_tap: FeatureTap, s_dims: list[int],
                     t_dims: list[int]) -> nn.ModuleDict:
    """One linear map per level and term from the student's width to the teacher's."""
    kinds = ["block"] + (["adapter", "sum"] if student_tap.has_adapter and teacher_tap.has_adapter else [])
    return nn.ModuleDict({f"{kind}{level}": nn.Linear(s_dims[level], t_dims[level])
                          for level in range(3) for kind in kinds})


# ------------------------------------------------------------------------------------ loss
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


# ------------------------------------------------------------------------------------ cache
class TeacherTargets(torch.utils.data.Dataset):
    """Images (``PromptSegDataset`` items) plus, with a cache, the teacher's stored targets (``t_*``)."""

    def __init__(self, concat, cache: Path | None, keys: list[str]):
        self.concat, self.cache, self.keys = concat, cache, keys

    def __len__(self):
        return len(self.concat)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        out = {"image": self.concat[key]["image"], "index": int(i)}
        if self.cache is not None:
            t = torch.load(self.cache / f"{self.keys[i]}.pt", map_location="cpu", weights_only=True)
            out.update({f"t_{k}": v for k, v in t.items()})
        return out


def build_cache(teacher, tap, concat, keys: list[str], cache: Path, device, level_terms: bool, batch: int = 8,
                progress: Progress | None = None) -> None:
    """Write the teacher's fp16 targets for every item that has no file yet."""
    from uniultra.models.checkpoint import atomic_torch_save

    cache.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(concat)) if not (cache / f"{keys[i]}.pt").is_file()]
    for k in range(0, len(todo), batch):
        idx = todo[k: k + batch]
        x = torch.stack([concat[(i, 0)]["image"] for i in idx]).to(device)
        tg = teacher_targets(teacher, tap, x, level_terms)
        for j, i in enumerate(idx):
            atomic_torch_save({n: v[j].half().cpu().clone() for n, v in tg.items()}, cache / f"{keys[i]}.pt")
        if progress:
            progress(min(k + batch, len(todo)), len(todo), "caching teacher features")


# ------------------------------------------------------------------------------------ student
def build_student(teacher, arch: str, image_size: int, device="cpu", init: str | None = None):
    """The student with the teacher's prompt encoder, mask decoder and no_mem_embed (frozen); its
    image encoder is random, or copied from model ``init`` (which must have the same encoder)."""
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
    if (t_family == "sam2") != (canonical_arch(arch).family == "sam2"):
        want = "uniultra-student-e{8,16,24,32,48}-lm (uniultra-mini-lm)" if t_family != "sam2" \
            else "uniultra-student-e{8,16,24,32,48}"
        raise InputError(f"--student {arch} cannot reuse the decoder of teacher {teacher.name} ({teacher.arch.name}): "
                         f"use {want}")
    student = build_model(arch, image_size=image_size, device="cpu", random_init=True)
    st, tt = student.sam, teacher.sam
    if init:
        init_student_encoder(st, init, image_size)
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


def init_student_encoder(net, init: str, image_size: int) -> None:
    """Copy every image-encoder tensor of model ``init`` into ``net`` (all names and shapes must match)."""
    from uniultra.models import build_model

    src = build_model(init, image_size=image_size, device="cpu").sam.image_encoder.state_dict()
    dst = net.image_encoder.state_dict()
    missing = [k for k in dst if k not in src]
    wrong = [k for k in dst if k in src and src[k].shape != dst[k].shape]
    if missing or wrong:
        k = (missing or wrong)[0]
        raise InputError(f"--student-init {init}: its image encoder does not match the student's "
                         f"({len(missing)} tensors missing, {len(wrong)} of another shape, e.g. {k}); "
                         "give a model with the same student architecture")
    net.image_encoder.load_state_dict({k: src[k] for k in dst})


# ------------------------------------------------------------------------------------ entry
def finetune_config(cfg: DistillConfig, student_path: Path) -> TrainConfig:
    """The end-to-end fine-tuning run of a distilled student (``<out>/finetune``)."""
    return TrainConfig(data=list(cfg.data), out=str(Path(cfg.out) / "finetune"), model=str(student_path), peft=None,
                       image_size=cfg.image_size, steps=cfg.finetune_steps, batch_size=cfg.batch_size,
                       lr=cfg.finetune_lr, optimizer="adamw", schedule="cosine", device=cfg.device, seed=cfg.seed,
                       adapter_only=False, overwrite=True, resume=cfg.resume, val_limit=cfg.val_limit,
                       val_every=cfg.val_every,
                       num_workers=cfg.num_workers, loss_weights=cfg.finetune_loss_weights,
                       augment=cfg.finetune_augment, max_images=cfg.max_images, threads=cfg.threads,
                       progress_bar=cfg.progress_bar, log_every=cfg.log_every, events=cfg.events,
                       box_prior=cfg.box_prior)


def distill(config: DistillConfig, progress: Progress | bool | None = None, cancel=None, log=None) -> dict:
    """Run DSKD (see the module doc), then the optional fine-tuning; returns the summary dict."""
    from uniultra.training.engine import Trainer
    from uniultra.training.tasks import DistillTask, SegmentationTask

    cfg = config
    trainer = Trainer(cfg, DistillTask(), progress, cancel, log, register=cfg.finetune_steps <= 0)
    result = trainer.fit()
    if result["status"] == "cancelled" or cfg.finetune_steps <= 0:
        return result
    ft = Trainer(finetune_config(cfg, Path(result["model"])), SegmentationTask(), progress, cancel, log).fit()
    result["finetune"] = ft
    if ft.get("model"):
        result["student"] = result["model"] = ft["model"]
    if ft["status"] == "cancelled":
        result["status"] = "cancelled"
    elif cfg.register and trainer.rank == 0:
        result["registered"] = trainer.register_model(Path(result["student"]), {"val_dice": ft.get("best_val_dice")})
    if trainer.rank == 0:
        import json

        (Path(cfg.out) / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


__all__ = ["DistillConfig", "distill", "build_student", "FeatureTap", "TinyViTTap", "distill_loss",
           "teacher_targets", "build_cache", "TeacherTargets"]
