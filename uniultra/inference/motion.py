"""Motion of a tracked object between two frames, by normalized cross-correlation (NCC).

Box-chaining propagation prompts each frame with the box of the previous frame's mask.  That
works while the object moves less than its own size between frames; in a cine loop stored with
gaps (dropped or thinned frames), or when the probe slides, the structure can move by more than
that and the chained box lands beside it, where the model outlines whatever is there and the
chain follows the wrong structure.  :func:`estimate_shift` finds where the patch around the
previous mask went in the next frame (the image itself, so it works for every model), and
propagation moves the chained box by that shift before prompting.

The patch is the previous mask's box plus ``context`` of its size on each side (the surrounding
tissue is what makes a dark vessel distinguishable from the next dark vessel); it is searched
within ``search`` times the box's size around its old place.  Images are downsampled so that the
patch is at most ``MAX_TEMPLATE`` pixels across (the shift places a prompt box, which the next
mask re-derives anyway, so a pixel or two of precision is enough), and the correlation runs by
FFT: about a millisecond per object and frame.
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


def _ncc_map(search: np.ndarray, template: np.ndarray) -> np.ndarray:
    """NCC of ``template`` at every valid position in ``search`` (both 2-D float64 arrays)."""
    from scipy.signal import correlate

    th, tw = template.shape
    n = float(th * tw)
    t = template - template.mean()
    t = t / max(float(np.sqrt((t * t).sum())), 1e-6)
    num = correlate(search, t, mode="valid", method="fft")
    mu = _window_sums(search, th, tw) / n
    mu2 = _window_sums(search * search, th, tw) / n
    sd = np.sqrt(np.clip(mu2 - mu * mu, 0.0, None) * n)
    # a flat search window has no defined NCC: score it 0 rather than divide by ~0
    return np.where(sd > 1e-3, num / np.maximum(sd, 1e-3), 0.0)


def estimate_shift(prev: np.ndarray, cur: np.ndarray, box, context: float = 0.1,
                   search: float = 1.0) -> tuple[int, int, float]:
    """``(dx, dy, ncc)``: how far the patch around ``box`` (x0, y0, x1, y1, inclusive pixels) in
    grey image ``prev`` moved in grey image ``cur`` (same size), and the NCC there (-1..1).
    Returns ``(0, 0, 0.0)`` when the patch has no texture to match."""
    if prev.shape != cur.shape:
        raise ValueError(f"frames differ in size: {prev.shape} and {cur.shape}")
    h, w = prev.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    tx0, ty0 = max(0, int(math.floor(x0 - context * bw))), max(0, int(math.floor(y0 - context * bh)))
    tx1, ty1 = min(w, int(math.ceil(x1 + 1 + context * bw))), min(h, int(math.ceil(y1 + 1 + context * bh)))
    sx, sy = int(math.ceil(search * bw)), int(math.ceil(search * bh))
    ox0, oy0 = max(0, tx0 - sx), max(0, ty0 - sy)
    ox1, oy1 = min(w, tx1 + sx), min(h, ty1 + sy)
    f = max(1, int(math.ceil(max(tx1 - tx0, ty1 - ty0) / MAX_TEMPLATE)))
    # downsample both crops on one grid anchored at the search window's corner
    tx0, ty0 = ox0 + ((tx0 - ox0) // f) * f, oy0 + ((ty0 - oy0) // f) * f
    tw, th = max(1, (tx1 - tx0) // f), max(1, (ty1 - ty0) // f)
    sw, sh = (ox1 - ox0) // f, (oy1 - oy0) // f
    if tw < 2 or th < 2 or sw < tw or sh < th:
        return 0, 0, 0.0

    def crop(img, x, y, cw, ch):  # (ch, cw) pixels of side f, averaged
        a = np.asarray(img[y:y + ch * f, x:x + cw * f], dtype=np.float64)
        return a.reshape(ch, f, cw, f).mean((1, 3))

    template = crop(prev, tx0, ty0, tw, th)
    if float(template.std()) < 1e-3:
        return 0, 0, 0.0
    ncc = _ncc_map(crop(cur, ox0, oy0, sw, sh), template)
    i = int(np.argmax(ncc))
    py, px = divmod(i, ncc.shape[1])
    dx = ox0 + px * f - tx0
    dy = oy0 + py * f - ty0
    return int(dx), int(dy), float(ncc[py, px])


def shift_box(box, dx: int, dy: int, hw: tuple[int, int]):
    """``box`` moved by (dx, dy), the move cut short so that the box stays inside the image."""
    h, w = hw
    x0, y0, x1, y1 = box
    dx = max(-x0, min(w - 1 - x1, int(dx)))
    dy = max(-y0, min(h - 1 - y1, int(dy)))
    return (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
