"""SAM2 architectures by name, built from the `sam2` package's own Hydra configs.

Names: ``sam2-hiera-{tiny,small,base-plus,large}`` and ``sam2.1-hiera-...`` (Meta's models) and
``uniultra-student-e{8,16,24,32,48}`` (the DSKD students: the Hiera-T layout with a narrow
embedding, CH-Adapters and an FPN neck feeding the SAM2 mask decoder; ``uniultra-mini`` is e16).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

SIZES = {"tiny": "t", "small": "s", "base-plus": "b+", "large": "l"}
STUDENT_DIMS = (8, 16, 24, 32, 48)
DEFAULT_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class Arch:
    """What is needed to rebuild a model: a sam2 config plus overrides."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    student_dim: int | None = None
    family: str = "sam2"   # sam2 | litemedsam | litemedsam-student (see litemedsam.py)

    @property
    def is_student(self) -> bool:
        return self.student_dim is not None


def canonical_arch(name: str) -> Arch:
    """Resolve an architecture name (a few spellings accepted) or raise a clear error."""
    key = name.strip().lower().replace("_", "-")
    key = {"uniultra-mini": "uniultra-student-e16", "uniultra-mini-lm": "uniultra-student-e16-lm",
           "lite-medsam": "litemedsam", "litemedsam-base": "litemedsam"}.get(key, key)
    if key == "litemedsam":
        return Arch("litemedsam", "litemedsam", family="litemedsam")
    m = re.fullmatch(r"uniultra-student-e(\d+)-lm", key)
    if m and int(m.group(1)) > 0 and int(m.group(1)) % 8 == 0:
        return Arch(f"uniultra-student-e{int(m.group(1))}-lm", "litemedsam", student_dim=int(m.group(1)),
                    family="litemedsam-student")
    m = re.fullmatch(r"(sam2|sam2\.1)-hiera-(tiny|small|base-plus|b\+|large|t|s|l)", key)
    if m:
        version, size = m.groups()
        short = {"tiny": "t", "small": "s", "base-plus": "b+", "large": "l"}.get(size, size)
        long = {v: k for k, v in SIZES.items()}[short]
        folder = "sam2" if version == "sam2" else "sam2.1"
        return Arch(f"{version}-hiera-{long}", f"configs/{folder}/{folder}_hiera_{short}.yaml")
    m = re.fullmatch(r"uniultra-student-e(\d+)", key)
    if m and int(m.group(1)) > 0 and int(m.group(1)) % 8 == 0:
        d = int(m.group(1))
        overrides = (
            f"++model.image_encoder.trunk.embed_dim={d}",
            "++model.image_encoder.trunk.num_heads=1",
            "++model.image_encoder.trunk.stages=[1,2,7,2]",
            "++model.image_encoder.trunk.global_att_blocks=[5,7,9]",
            "++model.image_encoder.trunk.window_spec=[8,4,14,7]",
            f"++model.image_encoder.neck.backbone_channel_list=[{8 * d},{4 * d},{2 * d},{d}]",
        )
        return Arch(f"uniultra-student-e{d}", "configs/sam2.1/sam2.1_hiera_t.yaml", overrides, d)
    raise ValueError(
        f"unknown architecture {name!r}: use sam2-hiera-{{tiny,small,base-plus,large}}, "
        "sam2.1-hiera-{...}, uniultra-mini, uniultra-student-e{8,16,24,32,48}, litemedsam or "
        "uniultra-mini-lm (uniultra-student-e{d}-lm: a student on LiteMedSAM's decoder)"
    )


MAX_IMAGE_SIZE = 4096  # 4x SAM2's 1024; far larger sizes only exhaust memory (100000 was OOM-killed)


def check_image_size(image_size: int) -> int:
    if (int(image_size) != image_size or image_size < 64 or image_size % 32
            or image_size > MAX_IMAGE_SIZE):
        raise ValueError(f"image size {image_size} is not usable: give a multiple of 32 from 64 to "
                         f"{MAX_IMAGE_SIZE}, e.g. 1024")
    return int(image_size)


def build_sam2_base(arch: Arch, image_size: int = DEFAULT_IMAGE_SIZE) -> torch.nn.Module:
    """Instantiate a randomly initialised SAM2 model for ``arch`` at ``image_size``: a ``SAM2Base``
    built as sam2's video predictor (:class:`uniultra.models.video.VideoPredictor`, through the
    config's ``_target_``, as ``build_sam2_video_predictor`` does), so memory propagation needs no
    class swap."""
    import sam2  # noqa: F401  (initialises sam2's Hydra config module)

    from uniultra.models.video import TARGET

    image_size = check_image_size(image_size)
    feat = image_size // 16
    overrides = [f"++model._target_={TARGET}"] + list(arch.overrides) + [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
    ]
    cfg = compose(config_name=arch.config, overrides=overrides)
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)


def infer_arch_from_state_dict(sd: dict) -> Arch:
    """Recognise which Meta SAM2 model a bare ``{"model": state_dict}`` checkpoint holds."""
    try:
        dim = sd["image_encoder.trunk.pos_embed"].shape[1]
    except KeyError as e:
        raise ValueError("this file is not a SAM2 checkpoint: it has no image_encoder.trunk.pos_embed") from e
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("image_encoder.trunk.blocks."))
    version = "sam2.1" if "no_obj_embed_spatial" in sd else "sam2"
    size = {(96, 12): "tiny", (96, 16): "small", (112, 24): "base-plus", (144, 48): "large"}.get((dim, depth))
    if size is None:
        if depth == 12 and dim in STUDENT_DIMS:
            return canonical_arch(f"uniultra-student-e{dim}")
        raise ValueError(f"unrecognised SAM2 trunk (embed_dim {dim}, {depth} blocks)")
    return canonical_arch(f"{version}-hiera-{size}")
