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

The blocks are adapted *in place* by swapping their class, so the base model's state-dict keys
stay exactly Meta's and official checkpoints load strictly before or after adaptation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import Hiera, MultiScaleBlock, do_pool
from sam2.modeling.backbones.utils import window_partition, window_unpartition
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
    """Context bottleneck on the tokens plus the Sobel-edge branch projected to D channels."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        self.sobel = SobelMagnitude()
        self.edge_proj = nn.Conv2d(EDGE_CHANNELS, dim, kernel_size=1)

    def forward(self, xn: torch.Tensor, edge: torch.Tensor | None) -> torch.Tensor:
        out = self.up(self.act(self.down(xn)))  # (B, H, W, D)
        if edge is not None:
            e = self.edge_proj(self.sobel(edge))  # (B, D, H, W)
            out = out + e.permute(0, 2, 3, 1)
        return out


class CHAdaptedBlock(MultiScaleBlock):
    """A Hiera block with a CH-Adapter parallel to its MLP (installed by class swap)."""

    ch_adapter: CHAdapter

    def forward(self, x: torch.Tensor, edge: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = do_pool(self.proj(x), self.pool)
        window_size = self.window_size
        if window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, window_size)
        x = self.attn(x)
        if self.q_stride:
            window_size = self.window_size // self.q_stride[0]
            H, W = shortcut.shape[1:3]
            pad_h = (window_size - H % window_size) % window_size
            pad_w = (window_size - W % window_size) % window_size
            pad_hw = (H + pad_h, W + pad_w)
        if self.window_size > 0:
            x = window_unpartition(x, window_size, pad_hw, (H, W))
        x = shortcut + self.drop_path(x)
        xn = self.norm2(x)
        return x + self.drop_path(self.mlp(xn)) + ADAPTER_SCALE * self.ch_adapter(xn, edge)


class CHAdaptedHiera(Hiera):
    """Hiera trunk that computes the edge map once and hands it to every adapted block."""

    edge_stem: nn.Conv2d

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        x = self.patch_embed(x)
        x = x + self._get_pos_embed(x.shape[1:3])
        edge = F.gelu(self.edge_stem(x.permute(0, 3, 1, 2)))  # (B, 4, H/4, W/4)
        outputs = []
        for i, blk in enumerate(self.blocks):
            if i in self.q_pool_blocks:
                edge = F.max_pool2d(edge, kernel_size=2, stride=2)
            x = blk(x, edge) if isinstance(blk, CHAdaptedBlock) else blk(x)
            if (i == self.stage_ends[-1]) or (i in self.stage_ends and self.return_interm_layers):
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


def add_ch_adapters(trunk: Hiera, reduction: int = 4) -> list[nn.Module]:
    """Insert CH-Adapters into every block of ``trunk`` in place; return the new modules."""
    if isinstance(trunk, CHAdaptedHiera):
        raise ValueError("this Hiera trunk already has CH-Adapters")
    device = trunk.pos_embed.device
    embed_dim = trunk.pos_embed.shape[1]
    trunk.__class__ = CHAdaptedHiera
    trunk.edge_stem = nn.Conv2d(embed_dim, EDGE_CHANNELS, kernel_size=3, padding=1).to(device)
    new = [trunk.edge_stem]
    for blk in trunk.blocks:
        blk.__class__ = CHAdaptedBlock
        blk.ch_adapter = CHAdapter(blk.dim_out, reduction).to(device)
        new.append(blk.ch_adapter)
    return new
