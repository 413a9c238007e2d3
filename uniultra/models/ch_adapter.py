"""CH-Adapter (context-edge hybrid adapter) for SAM2's Hiera trunk.

One adapter sits in every Hiera block, parallel to the block's MLP:

    xn = norm2(x);  x = x + drop_path(mlp(xn)) + 0.5 * adapter(xn, edge)

The adapter adds a context branch (a D -> D/4 -> D bottleneck on the tokens) and an edge branch
(four fixed Sobel directions applied depthwise to a 4-channel edge map, their magnitude, then a
1x1 conv to D).  The edge map is computed once per forward, right after patch embedding plus
positional embedding, by a trainable 3x3 conv + GELU, and is max-pooled 2x at every stage
boundary so that it always matches the current token grid.

Differences from the published code: the edge map is laid out with a real
permute (the published ``view`` scrambles it), the edge conv is trained (not detached), and
the Sobel kernels are applied per channel.

One mechanism wires the adapter into both trunks it is used with (sam2's Hiera here, TinyViT in
litemedsam.py), with forward hooks on the trunk's own modules, so sam2's and TinyViT's block code
runs unchanged (nothing of it is copied):

- an :class:`EdgeMap` (a plain object, no weights) holds the edge map of the forward pass in
  progress; a hook where the tokens enter the blocks fills it from ``edge_stem``, and a forward
  hook on the trunk empties it when the pass ends;
- a :class:`ParallelToMLP` hook pair records the MLP's input and adds
  ``ADAPTER_SCALE * adapter(mlp_input, edge at the block's grid)`` to the output of a chosen
  module: the whole block for Hiera (``x + drop_path(mlp(xn)) + 0.5 * adapter``, the sum in that
  order, and the MLP's own output stays the pure MLP branch that distillation taps) and the MLP
  for TinyViT (where the adapter was trained inside the block's drop path).

Hooks are objects of module-level classes (no closures), so ``copy.deepcopy`` of a model gives
a copy whose hooks point at the copied adapters.  The adapters are children of the modules they
always were (``blocks.N.ch_adapter`` and ``edge_stem`` on the Hiera trunk), so state-dict keys are
unchanged and official base checkpoints load strictly before or after adaptation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import Hiera
from torch import nn

SOBEL_KERNELS = torch.tensor(
    [
        [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],  # h
        [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],  # v
        [[0, 1, 2], [-1, 0, 1], [-2, -1, 0]],  # h2 (diagonal)
        [[2, 1, 0], [1, 0, -1], [0, -1, -2]],  # v2 (anti-diagonal)
    ],
    dtype=torch.float32,
)
EDGE_CHANNELS = 4
ADAPTER_SCALE = 0.5


class SobelMagnitude(nn.Module):
    """Depthwise Sobel in four directions; returns the per-channel gradient magnitude."""

    def __init__(self, channels: int = EDGE_CHANNELS):
        super().__init__()
        self.channels = channels
        weight = SOBEL_KERNELS.unsqueeze(1).repeat(channels, 1, 1, 1)  # (4*C, 1, 3, 3)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, edge: torch.Tensor) -> torch.Tensor:
        b, c, h, w = edge.shape
        g = F.conv2d(edge, self.weight.to(edge.dtype), padding=1, groups=c)  # (B, 4C, H, W)
        g = g.view(b, c, 4, h, w)
        return torch.sqrt(g.pow(2).sum(dim=2) + 1e-12)


class CHAdapter(nn.Module):
    """Context bottleneck on the tokens plus the Sobel-edge branch projected to D channels.

    Tokens are channels-last on a grid, ``(B, H, W, D)`` (Hiera), or a sequence ``(B, H*W, D)``
    whose grid is ``hw`` (TinyViT)."""

    def __init__(self, dim: int, reduction: int = 4, hw: tuple[int, int] | None = None):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        self.sobel = SobelMagnitude()
        self.edge_proj = nn.Conv2d(EDGE_CHANNELS, dim, kernel_size=1)
        self.hw = tuple(hw) if hw is not None else None

    def grid(self, tokens: torch.Tensor) -> tuple[int, int]:
        """The token grid (H, W) of ``tokens``."""
        return tuple(tokens.shape[1:3]) if tokens.dim() == 4 else self.hw

    def forward(self, tokens: torch.Tensor, edge: torch.Tensor | None) -> torch.Tensor:
        """``edge``: the edge map at the token grid, ``(B, 4, H, W)``, or None."""
        out = self.up(self.act(self.down(tokens)))
        if edge is not None:
            e = self.edge_proj(self.sobel(edge))  # (B, D, H, W)
            out = out + (e.permute(0, 2, 3, 1) if tokens.dim() == 4 else e.flatten(2).transpose(1, 2))
        return out


class EdgeMap:
    """The edge map of the forward pass in progress, shared by one trunk's hooks.

    ``at(hw)`` max-pools it to a block's token grid: 2x2 steps while the grid is at least half
    the map's (the trunks' stages halve it), an adaptive max-pool for any rest; the pooled map is
    kept, since later blocks are on the same or a coarser grid."""

    def __init__(self):
        self.level: torch.Tensor | None = None

    def at(self, hw: tuple[int, int]) -> torch.Tensor | None:
        e = self.level
        if e is None:
            return None
        while tuple(e.shape[-2:]) != hw and e.shape[-2] >= 2 * hw[0] and e.shape[-1] >= 2 * hw[1]:
            e = F.max_pool2d(e, kernel_size=2, stride=2)
        if tuple(e.shape[-2:]) != hw:
            e = F.adaptive_max_pool2d(e, hw)
        self.level = e
        return e


class EdgeStem:
    """Hook that fills an :class:`EdgeMap` with ``gelu(stem(tokens))``: as a forward pre-hook
    the tokens are the module's input (channels-last), as a forward hook its output
    (channels-first)."""

    def __init__(self, stem: nn.Conv2d, edges: EdgeMap):
        self.stem, self.edges = stem, edges

    def __call__(self, _mod, args, out=None):
        if out is None:
            self.edges.level = F.gelu(self.stem(args[0].permute(0, 3, 1, 2)))
        else:
            self.edges.level = F.gelu(self.stem(out))


class EdgeClear:
    """Forward hook on the trunk: the pass is over, drop its edge maps."""

    def __init__(self, edges: EdgeMap):
        self.edges = edges

    def __call__(self, _mod, _args, _out):
        self.edges.level = None


class ParallelToMLP:
    """A CH-Adapter beside an MLP: a pre-hook records the MLP's input and a forward hook on
    ``add_to`` (the MLP itself, or the block that contains it) adds
    ``ADAPTER_SCALE * adapter(mlp_input, edge)`` to that module's output."""

    def __init__(self, adapter: CHAdapter, edges: EdgeMap):
        self.adapter, self.edges = adapter, edges
        self.tokens: torch.Tensor | None = None

    def record(self, _mod, args):
        self.tokens = args[0]

    def __call__(self, _mod, _args, out):
        tokens, self.tokens = self.tokens, None
        return out + ADAPTER_SCALE * self.adapter(tokens, self.edges.at(self.adapter.grid(tokens)))


def attach_ch_adapter(mlp: nn.Module, add_to: nn.Module, adapter: CHAdapter, edges: EdgeMap) -> None:
    """Run ``adapter`` parallel to ``mlp``, its scaled output added to ``add_to``'s output."""
    hook = ParallelToMLP(adapter, edges)
    mlp.register_forward_pre_hook(hook.record)
    add_to.register_forward_hook(hook)


def attach_edge_map(trunk: nn.Module, source: nn.Module, stem: nn.Conv2d, pre: bool) -> EdgeMap:
    """An :class:`EdgeMap` for ``trunk``, filled from ``source``'s input (``pre``) or output."""
    edges = EdgeMap()
    hook = EdgeStem(stem, edges)
    (source.register_forward_pre_hook if pre else source.register_forward_hook)(hook)
    trunk.register_forward_hook(EdgeClear(edges))
    return edges


def has_ch_adapters(trunk: Hiera) -> bool:
    """Whether :func:`add_ch_adapters` has run on this Hiera trunk."""
    return hasattr(trunk, "edge_stem")


def add_ch_adapters(trunk: Hiera, reduction: int = 4) -> list[nn.Module]:
    """Insert CH-Adapters into every block of ``trunk`` in place; return the new modules.

    The edge map is made from the tokens that enter the first block (patch embedding plus
    positional embedding, as sam2's ``Hiera.forward`` passes them)."""
    if has_ch_adapters(trunk):
        raise ValueError("this Hiera trunk already has CH-Adapters")
    device = trunk.pos_embed.device
    embed_dim = trunk.pos_embed.shape[1]
    trunk.edge_stem = nn.Conv2d(embed_dim, EDGE_CHANNELS, kernel_size=3, padding=1).to(device)
    edges = attach_edge_map(trunk, trunk.blocks[0], trunk.edge_stem, pre=True)
    new = [trunk.edge_stem]
    for blk in trunk.blocks:
        blk.ch_adapter = CHAdapter(blk.dim_out, reduction).to(device)
        attach_ch_adapter(blk.mlp, blk, blk.ch_adapter, edges)
        new.append(blk.ch_adapter)
    return new
