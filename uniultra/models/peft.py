"""Parameter-efficient adaptation methods, selectable by name, and their freezing rules.

Every method modifies a built SAM2 model in place and leaves the base model's state-dict keys
untouched (new modules get new keys; wrapped layers keep theirs by class swap or hooks), so a
Meta checkpoint loads strictly into the base before or after adaptation.

Methods (``apply_peft(sam, method, scope, **options)``):
- ``ch-adapter``  UniUltra's CH-Adapter in every Hiera block (see ch_adapter.py).
- ``lora``        LoRA (rank r, on q and v) in the encoder attention and/or the decoder attention.
- ``adapter``     finetune-SAM's Adapter: after attention (residual) and parallel to the MLP
                  (scale 0.5) in chosen Hiera blocks, and parallel to the MLP of the first
                  two-way block of the mask decoder.
- ``cnn-branch``  SAM-UNet's ResNet branch, added to the token map before each global block;
                  ``decoder="med-token"`` adds SAM-UNet's single-token multi-scale decoder.
- ``full``        everything trainable.
- ``decoder``     only the prompt encoder and mask decoder train.
- ``none``        everything frozen (inference).

``scope`` is ``"encoder+decoder"`` (default) or ``"decoder"``: with ``"decoder"`` nothing in the
image encoder is adapted or updated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.sam.mask_decoder import MaskDecoder
from torch import nn

from uniultra.models.ch_adapter import add_ch_adapters, has_ch_adapters

METHODS = ("ch-adapter", "lora", "adapter", "cnn-branch", "full", "decoder", "none")
SCOPES = ("encoder+decoder", "decoder")
DECODER_PARTS = ("sam_prompt_encoder", "sam_mask_decoder")


# ----------------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Linear):
    """nn.Linear plus low-rank updates on chosen slices of its output (installed by class swap).

    ``lora_A[i] @ lora_B[i]`` adds to output rows ``slices[i]``; B starts at zero so the adapted
    layer is initially identical to the base layer.
    """

    lora_A: nn.ParameterList
    lora_B: nn.ParameterList
    lora_slices: list[tuple[int, int]]
    lora_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.linear(x, self.weight, self.bias)
        if not self.lora_slices:
            return out
        parts = []
        cursor = 0
        for (start, end), a, b in zip(self.lora_slices, self.lora_A, self.lora_B):
            if start > cursor:
                parts.append(out.new_zeros(*out.shape[:-1], start - cursor))
            parts.append(F.linear(F.linear(x, a), b) * self.lora_scale)
            cursor = end
        if cursor < out.shape[-1]:
            parts.append(out.new_zeros(*out.shape[:-1], out.shape[-1] - cursor))
        return out + torch.cat(parts, dim=-1)


def add_lora(linear: nn.Linear, slices: list[tuple[int, int]], rank: int, alpha: float) -> list[nn.Parameter]:
    """Turn ``linear`` into a LoRALinear with one rank-``rank`` update per output slice."""
    linear.__class__ = LoRALinear
    dev, dt = linear.weight.device, linear.weight.dtype
    linear.lora_A = nn.ParameterList()
    linear.lora_B = nn.ParameterList()
    for start, end in slices:
        a = torch.empty(rank, linear.in_features, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        linear.lora_A.append(nn.Parameter(a))
        linear.lora_B.append(nn.Parameter(torch.zeros(end - start, rank, device=dev, dtype=dt)))
    linear.lora_slices = list(slices)
    linear.lora_scale = alpha / rank
    return [*linear.lora_A, *linear.lora_B]


def _lora_encoder(trunk: Hiera, rank: int, alpha: float) -> list[nn.Parameter]:
    params = []
    for blk in trunk.blocks:
        d = blk.attn.dim_out
        params += add_lora(blk.attn.qkv, [(0, d), (2 * d, 3 * d)], rank, alpha)  # q and v
    return params


def _lora_decoder(sam: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """LoRA on q and v of every attention of the decoder's two-way transformer (SAM2's and
    SAM's, as in LiteMedSAM: both have q_proj/k_proj/v_proj linears)."""
    params = []
    for mod in sam.sam_mask_decoder.transformer.modules():
        if isinstance(getattr(mod, "q_proj", None), nn.Linear) and isinstance(getattr(mod, "v_proj", None), nn.Linear):
            for lin in (mod.q_proj, mod.v_proj):
                params += add_lora(lin, [(0, lin.out_features)], rank, alpha)
    return params


# -------------------------------------------------------------------- finetune-SAM Adapter
class BottleneckAdapter(nn.Module):
    """Linear(d -> d/4) -> GELU -> Linear(d/4 -> d); the up-projection starts at zero."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        self.down = nn.Linear(dim, max(1, dim // reduction))
        self.act = nn.GELU()
        self.up = nn.Linear(max(1, dim // reduction), dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.up(self.act(self.down(x)))


def _residual_adapter_hook(mod: nn.Module, _inp, out: torch.Tensor) -> torch.Tensor:
    return out + mod.adapter(out)


def _parallel_adapter_hook(mod: nn.Module, inp, out: torch.Tensor) -> torch.Tensor:
    return out + 0.5 * mod.adapter(inp[0])


def _attach_adapter_hooks(attn: nn.Module | None, mlp: nn.Module, dim: int, reduction: int) -> list[nn.Parameter]:
    """Adapters as children of the hooked layers (so they are saved, copied and moved with
    the model), wired in with module-level forward hooks (no closures: deepcopy-safe)."""
    device = next(mlp.parameters()).device
    params = []
    if attn is not None:
        attn.adapter = BottleneckAdapter(dim, reduction).to(device)
        attn.register_forward_hook(_residual_adapter_hook)
        params += list(attn.adapter.parameters())
    mlp.adapter = BottleneckAdapter(dim, reduction).to(device)
    mlp.register_forward_hook(_parallel_adapter_hook)
    params += list(mlp.adapter.parameters())
    return params


def _adapter_encoder(trunk: Hiera, blocks: Iterable[int] | None, reduction: int) -> list[nn.Parameter]:
    n = len(trunk.blocks)
    if blocks is not None:
        bad = [b for b in blocks if int(b) != b or not -n <= b < n]
        if bad:  # b % n used to wrap 999 silently onto some block
            raise ValueError(f"adapter blocks {bad}: the image encoder has {n} blocks; give indices "
                             f"0..{n - 1} (or -{n}..-1 from the end)")
    chosen = sorted({int(b) % n for b in blocks}) if blocks is not None else sorted({0, 1, n - 2, n - 1})
    params = []
    for i in chosen:
        blk = trunk.blocks[i]
        params += _attach_adapter_hooks(blk.attn, blk.mlp, blk.dim_out, reduction)
    return params


def _adapter_decoder(sam: nn.Module, n_blocks: int, reduction: int) -> list[nn.Parameter]:
    params = []
    for layer in list(sam.sam_mask_decoder.transformer.layers)[:n_blocks]:
        out_dim = [m for m in layer.mlp.modules() if isinstance(m, nn.Linear)][-1].out_features
        params += _attach_adapter_hooks(None, layer.mlp, out_dim, reduction)
    return params


# ------------------------------------------------------------------ SAM-UNet CNN branch
class CNNBranch(nn.Module):
    """A ResNet run beside the frozen trunk; its stage maps are projected to the token grid.

    Stage s of the Hiera trunk (stride 4 * 2**s) receives ResNet layer s+1 (same stride),
    projected by a zero-initialised 1x1 conv, added just before each global-attention block.
    """

    def __init__(self, trunk: Hiera, depth: int = 34):
        super().__init__()
        import torchvision  # only this method needs it; it costs a second at start-up

        ctor = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
                50: torchvision.models.resnet50}
        if depth not in ctor:
            raise ValueError(f"cnn-branch depth {depth} is not supported: use 18, 34 or 50")
        net = ctor[depth](weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        mult = 4 if depth == 50 else 1
        cnn_channels = [64 * mult, 128 * mult, 256 * mult, 512 * mult]
        self.inject_blocks = [int(b) for b in trunk.global_att_blocks]
        stage_of = []
        for i in range(len(trunk.blocks)):
            stage_of.append(sum(1 for e in trunk.stage_ends if e < i))
        self.block_stage = {b: stage_of[b] for b in self.inject_blocks}
        self.proj = nn.ModuleDict()
        for b in self.inject_blocks:
            s = self.block_stage[b]
            conv = nn.Conv2d(cnn_channels[s], trunk.blocks[b].dim, kernel_size=1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.proj[str(b)] = conv

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        x = self.stem(image)
        maps = []
        for layer in self.layers:
            x = layer(x)
            maps.append(x)
        return maps


class _CNNMaps:
    """The branch's stage maps for the forward pass in progress (a plain object shared by one
    trunk's hooks; it owns no weights)."""

    def __init__(self):
        self.maps: list[torch.Tensor] | None = None


class _CNNBranchRun:
    """Forward pre-hook on the trunk: run the branch on the trunk's input image."""

    def __init__(self, branch: CNNBranch, state: _CNNMaps):
        self.branch, self.state = branch, state

    def __call__(self, _trunk, args):
        self.state.maps = self.branch(args[0])


class _CNNBranchAdd:
    """Forward pre-hook on block ``index``: add the branch's projected map of that block's stage
    to the tokens that enter it (resized to the token grid where they differ)."""

    def __init__(self, branch: CNNBranch, state: _CNNMaps, index: int):
        self.branch, self.state, self.index = branch, state, index

    def __call__(self, _blk, args):
        x = args[0]
        if self.state.maps is None:  # the block run outside the trunk's forward
            return None
        feat = self.branch.proj[str(self.index)](self.state.maps[self.branch.block_stage[self.index]])
        if feat.shape[-2:] != x.shape[1:3]:
            feat = F.interpolate(feat, size=x.shape[1:3], mode="bilinear", align_corners=False)
        return (x + feat.permute(0, 2, 3, 1), *args[1:])


class _CNNBranchClear:
    """Forward hook on the trunk: the pass is over, drop the branch's maps."""

    def __init__(self, state: _CNNMaps):
        self.state = state

    def __call__(self, _trunk, _args, _out):
        self.state.maps = None


def _cnn_branch(trunk: Hiera, depth: int) -> list[nn.Parameter]:
    """SAM-UNet's branch beside ``trunk`` (``trunk.cnn_branch``), wired in with hooks on sam2's own
    modules (its ``Hiera.forward`` runs unchanged): the branch runs on the image as the trunk
    starts, and its projected stage map is added to the tokens entering each global block."""
    if hasattr(trunk, "cnn_branch"):
        raise ValueError("this Hiera trunk already has a CNN branch")
    branch = CNNBranch(trunk, depth).to(trunk.pos_embed.device)
    trunk.cnn_branch = branch
    state = _CNNMaps()
    trunk.register_forward_pre_hook(_CNNBranchRun(branch, state))
    for b in branch.inject_blocks:
        trunk.blocks[b].register_forward_pre_hook(_CNNBranchAdd(branch, state, b))
    trunk.register_forward_hook(_CNNBranchClear(state))
    return list(branch.parameters())


class MedTokenMaskDecoder(MaskDecoder):
    """SAM-UNet's decoder on SAM2 (installed by class swap): one learned "Med-Output" token
    replaces the IoU, object-score and multimask tokens; the upscaled mask features are fused
    with the encoder's earlier stages (SAM2's stride-4 and stride-8 features, 32 and 64 ch, the
    multi-scale path) and a 3-layer MLP on the token gives the per-channel mask weights.
    There is no quality head: the returned score is 1."""

    med_token: nn.Embedding
    med_mlp: nn.Module

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output, repeat_image, high_res_features=None):  # noqa: D102
        tokens = torch.cat([self.med_token.weight.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1),
                            sparse_prompt_embeddings], dim=1)
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0) if repeat_image else image_embeddings
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        med = hs[:, 0, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        up = act1(ln1(dc1(src) + feat_s1))
        up = act2(dc2(up) + feat_s0)
        weights = self.med_mlp(med)  # (B, C/8)
        bu, cu, hu, wu = up.shape
        masks = (weights.unsqueeze(1) @ up.view(bu, cu, hu * wu)).view(bu, 1, hu, wu)
        ones = masks.new_ones(bu, 1)
        return masks, ones, med.unsqueeze(1), 10.0 * ones


def _med_token_decoder(sam: nn.Module) -> list[nn.Parameter]:
    from sam2.modeling.sam2_utils import MLP

    dec = sam.sam_mask_decoder
    if not dec.use_high_res_features:
        raise ValueError("the med-token decoder needs SAM2's high-resolution features")
    dim = dec.transformer_dim
    device = dec.iou_token.weight.device
    dec.__class__ = MedTokenMaskDecoder
    dec.med_token = nn.Embedding(1, dim).to(device)
    dec.med_mlp = MLP(dim, dim, dim // 8, 3).to(device)
    return [dec.med_token.weight, *dec.med_mlp.parameters()]


# ----------------------------------------------------------------------------- apply
OPTIONS = {"lora": {"rank", "alpha", "decoder"}, "adapter": {"blocks", "reduction", "decoder_blocks"},
           "ch-adapter": {"reduction"}, "cnn-branch": {"depth", "decoder"}}
"""The options each method takes (the others take none)."""

Builder = Callable[[bool, dict], list]
"""``(encoder, options) -> new or unfrozen parameters``; ``encoder`` is ``scope == "encoder+decoder"``."""


def parameters_of(net: nn.Module, *names: str) -> list[nn.Parameter]:
    """Parameters of the named submodules of ``net``."""
    return [p for name in names for p in getattr(net, name).parameters()]


def lora_builder(net: nn.Module, encoder_lora: Callable[[int, float], list]) -> Builder:
    """LoRA for any family: ``encoder_lora(rank, alpha)`` adds the trunk's low-rank pairs; the
    decoder's (SAM's mask decoder, the same in every family) follow the ``decoder`` option."""

    def build(encoder: bool, opts: dict) -> list:
        rank, alpha = int(opts.get("rank", 4)), float(opts.get("alpha", opts.get("rank", 4)))
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        new = encoder_lora(rank, alpha) if encoder else []
        if opts.get("decoder", True) or not encoder:
            new += _lora_decoder(net, rank, alpha)
        return new

    return build


def adapt(net: nn.Module, method: str | None, scope: str, options: dict, builders: dict[str, Builder],
          family: str) -> dict:
    """The one driver of every model family's adaptation: check method, scope and options, freeze
    ``net``, let the family's builder for ``method`` add (or pick) the trainable parameters, unfreeze
    them.  ``full``, ``decoder`` and ``none`` are the same for every family that keeps SAM's
    ``sam_prompt_encoder``/``sam_mask_decoder``; a family passes builders for the others."""
    method = (method or "none").lower()
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r}: choose one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown update scope {scope!r}: choose one of {', '.join(SCOPES)}")
    table: dict[str, Builder] = {
        "full": lambda enc, _: list(net.parameters()) if enc else parameters_of(net, *DECODER_PARTS),
        "decoder": lambda enc, _: parameters_of(net, *DECODER_PARTS),
        "none": lambda enc, _: [],
        **builders,
    }
    if method not in table:
        raise ValueError(f"{method} is built for SAM2's Hiera trunk; {family} takes "
                         f"{', '.join(m for m in METHODS if m in table and m != 'none')}")
    known = OPTIONS.get(method, set())
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"option(s) {sorted(unknown)} do not apply to method {method!r}; "
                         f"it takes {sorted(known) or 'no options'}")
    for p in net.parameters():
        p.requires_grad_(False)
    for p in table[method](scope == "encoder+decoder", options):
        p.requires_grad_(True)
    return {"method": method, "scope": scope, "options": dict(options)}


def apply_peft(sam: nn.Module, method: str | None, scope: str = "encoder+decoder", **options) -> dict:
    """Adapt ``sam`` in place and set ``requires_grad`` by the method's freezing rules.

    Returns a description (method, scope, options) that is stored in checkpoints so that the
    same model can be rebuilt.
    """
    trunk = sam.image_encoder.trunk

    def ch_adapter(encoder: bool, opts: dict) -> list:
        new = []
        if encoder and has_ch_adapters(trunk):  # already adapted (a trained model)
            new += [p for n, p in trunk.named_parameters() if "ch_adapter" in n or n.startswith("edge_stem")]
        elif encoder:
            for mod in add_ch_adapters(trunk, int(opts.get("reduction", 4))):
                new += list(mod.parameters())
        return new + [p for n, p in sam.named_parameters() if not n.startswith("image_encoder.")]

    def adapter(encoder: bool, opts: dict) -> list:
        reduction = int(opts.get("reduction", 4))
        new = _adapter_encoder(trunk, opts.get("blocks"), reduction) if encoder else []
        return new + _adapter_decoder(sam, int(opts.get("decoder_blocks", 1)), reduction)

    def cnn_branch(encoder: bool, opts: dict) -> list:
        decoder = opts.get("decoder", "sam2")
        if decoder not in ("sam2", "med-token"):
            raise ValueError(f"cnn-branch decoder {decoder!r} is not known: use sam2 or med-token")
        new = _cnn_branch(trunk, int(opts.get("depth", 34))) if encoder else []
        if decoder == "med-token":
            new += _med_token_decoder(sam)
        return new + parameters_of(sam, *DECODER_PARTS)

    return adapt(sam, method, scope, options,
                 {"ch-adapter": ch_adapter, "lora": lora_builder(sam, lambda r, a: _lora_encoder(trunk, r, a)),
                  "adapter": adapter, "cnn-branch": cnn_branch}, "SAM2")


def updated_parameter_names(sam: nn.Module) -> list[str]:
    """Trainable parameters that receive gradients in single-image (non-video) training.

    Memory attention, memory encoder and the object-pointer heads are only used on video; in
    single-image training SAM2 runs the image encoder, adds ``no_mem_embed`` and decodes.
    """
    used = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
    return [n for n, p in sam.named_parameters() if p.requires_grad and n.startswith(used)]
