"""Motion of a tracked object between two frames, by normalized cross-correlation (NCC).

Box-chaining propagation prompts each frame with the box of the previous frame's mask.  That
works while the object moves less than its own size between frames; in a cine loop stored with
gaps (dropped or thinned frames), or when the probe slides, the structure can move by more than
that and the chained box lands beside it, where the model outlines whatever is there and the
chain follows the wrong structure.  :func:`estimate_shift` finds where the patch around the
previous mask went in the next frame (the image itself, so it works for every model), and
propagation moves the chained box by that shift before prompting.

The patch is the previous mask's box plus ``context`` of its size on each side (a little
surrounding tissue tells a dark vessel from the next dark vessel); it is searched within
``search`` times the box's size around its old place; where the patch touches the image's edge
the search also goes past it, so that a structure at the edge of the field of view is followed
as it leaves it (compared on the part still inside: masked NCC).  Images are downsampled so that the
patch is at most ``MAX_TEMPLATE`` pixels across (the shift places a prompt box, which the next
mask re-derives anyway, so a pixel or two of precision is enough), and the correlations run by
FFT: about 8 ms per object and frame on a 2-core CPU (``benchmarks/speed.py``: cine propagation at
0.88x the frame rate of boxes chained in place).
"""

from __future__ import annotations

import math

import numpy as np

MAX_TEMPLATE = 48  # longest patch side after downsampling, pixels


def to_gray(frame: np.ndarray) -> np.ndarray:
    """A float32 grey image from a grey (H, W) or colour (H, W, C) frame of any numeric type."""
    a = np.asarray(frame, dtype=np.float32)
    return a.mean(-1) if a.ndim == 3 else a


def _window_sums(a: np.ndarray, th: int, tw: int) -> np.ndarray:
    """Sum of ``a`` over every (th, tw) window that fits (an integral image)."""
    c = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return c[th:, tw:] - c[:-th, tw:] - c[th:, :-tw] + c[:-th, :-tw]


def _masked_ncc(search: np.ndarray, valid: np.ndarray, template: np.ndarray,
                min_overlap: float) -> np.ndarray:
    """NCC of ``template`` at every position in ``search``, over the part of the template that
    falls on ``valid`` search pixels (a window partly outside the image is compared on what is
    inside); -1 where less than ``min_overlap`` of the template is valid or a side is flat.
    Correlations by numpy's FFT (scipy.signal would add about 50 MB to the process)."""
    th, tw = template.shape
    H, W = search.shape
    shape = (H, W)
    s = search * valid
    f_valid, f_s = np.fft.rfft2(valid, shape), np.fft.rfft2(s, shape)
    f_t, f_tt = np.conj(np.fft.rfft2(template, shape)), np.conj(np.fft.rfft2(template * template, shape))

    def corr(fa, ft):  # "valid" cross-correlation: the template inside the window, no wrap-around
        return np.fft.irfft2(fa * ft, shape)[:H - th + 1, :W - tw + 1]

    n = _window_sums(valid, th, tw)
    s_i = _window_sums(s, th, tw)
    s_ii = _window_sums(s * s, th, tw)
    s_t, s_tt, s_it = corr(f_valid, f_t), corr(f_valid, f_tt), corr(f_s, f_t)
    nn = np.maximum(n, 1.0)
    var_i = np.clip(s_ii - s_i * s_i / nn, 0.0, None)
    var_t = np.clip(s_tt - s_t * s_t / nn, 0.0, None)
    den = np.sqrt(var_i * var_t)
    ok = (n >= min_overlap * th * tw - 1e-6) & (den > 1e-6 * nn)
    return np.where(ok, (s_it - s_i * s_t / nn) / np.where(ok, den, 1.0), -1.0)


def estimate_shift(prev: np.ndarray, cur: np.ndarray, box, context: float = 0.1,
                   search: float = 2.0, min_overlap: float = 0.5) -> tuple[int, int, float]:
    """``(dx, dy, ncc)``: how far the patch around ``box`` (x0, y0, x1, y1, inclusive pixels) in
    grey image ``prev`` moved in grey image ``cur`` (same size), and the NCC there (-1..1).

    A patch that touches an image edge may move partly out past that edge (a structure leaving
    the field of view): positions where at least ``min_overlap`` of it is still inside are
    compared on that part.  Returns ``(0, 0, 0.0)`` when the patch has no texture to match."""
    if prev.shape != cur.shape:
        raise ValueError(f"frames differ in size: {prev.shape} and {cur.shape}")
    h, w = prev.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    tx0, ty0 = max(0, int(math.floor(x0 - context * bw))), max(0, int(math.floor(y0 - context * bh)))
    tx1, ty1 = min(w, int(math.ceil(x1 + 1 + context * bw))), min(h, int(math.ceil(y1 + 1 + context * bh)))
    f = max(1, int(math.ceil(max(tx1 - tx0, ty1 - ty0) / MAX_TEMPLATE)))
    tw, th = (tx1 - tx0) // f, (ty1 - ty0) // f  # the patch in cells of f x f pixels
    if tw < 2 or th < 2:
        return 0, 0, 0.0
    template = np.asarray(prev[ty0:ty0 + th * f, tx0:tx0 + tw * f], np.float64).reshape(th, f, tw, f).mean((1, 3))
    if float(template.std()) < 1e-3:
        return 0, 0, 0.0
    # The search window, in cells on the patch's grid.  Beyond an image edge that the patch
    # touches it reaches outside the image (zeros there, not valid): a structure at the edge may
    # leave the field of view.  Elsewhere it stops at the image, so that partial overlaps, whose
    # NCC over fewer pixels is noisier, never compete with whole ones inside.
    sxc, syc = int(math.ceil(search * bw / f)), int(math.ceil(search * bh / f))
    left = sxc if tx0 == 0 else min(sxc, tx0 // f)
    up = syc if ty0 == 0 else min(syc, ty0 // f)
    right = sxc if tx1 == w else min(sxc, (w - tx0 - tw * f) // f)
    down = syc if ty1 == h else min(syc, (h - ty0 - th * f) // f)
    ox0, oy0 = tx0 - left * f, ty0 - up * f
    sw, sh = tw + left + right, th + up + down
    img = np.zeros((sh * f, sw * f))
    inside = np.zeros((sh * f, sw * f))
    ya, yb, xa, xb = max(0, oy0), min(h, oy0 + sh * f), max(0, ox0), min(w, ox0 + sw * f)
    img[ya - oy0:yb - oy0, xa - ox0:xb - ox0] = cur[ya:yb, xa:xb]
    inside[ya - oy0:yb - oy0, xa - ox0:xb - ox0] = 1.0
    frac = inside.reshape(sh, f, sw, f).mean((1, 3))
    valid = (frac > 0.5).astype(np.float64)
    cells = img.reshape(sh, f, sw, f).sum((1, 3)) / np.maximum(frac * f * f, 1.0)
    ncc = _masked_ncc(cells, valid, template, min_overlap)
    i = int(np.argmax(ncc))
    py, px = divmod(i, ncc.shape[1])
    if ncc[py, px] <= -1.0:  # nothing comparable anywhere
        return 0, 0, 0.0
    return int((px - left) * f), int((py - up) * f), float(ncc[py, px])


def shift_box(box, dx: int, dy: int, hw: tuple[int, int]):
    """``box`` moved by (dx, dy), the move cut short so that the box stays inside the image."""
    h, w = hw
    x0, y0, x1, y1 = box
    dx = max(-x0, min(w - 1 - x1, int(dx)))
    dy = max(-y0, min(h - 1 - y1, int(dy)))
    return (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
