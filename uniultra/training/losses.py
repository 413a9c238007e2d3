"""Segmentation losses for promptable training.

* :func:`dice_loss` -- soft Dice on sigmoid probabilities, per sample, averaged over the batch.
* :func:`focal_loss` -- sigmoid focal loss (alpha 0.25, gamma 2; RetinaNet/SAM), mean over pixels.
* :func:`bce_loss` -- binary cross-entropy on logits, mean over pixels.
* :func:`iou_mse_loss` -- MSE between the IoU head's prediction and the actual IoU of the
  thresholded mask (SAM/UltraSam).
* :class:`LossWeights` -- weights (in :mod:`uniultra.training.config`); the default is UltraSam's
  ``focal 20 : dice 1``; the preset ``sam-unet`` is SAM-UNet's ``dice 20 : focal 1``.
* :func:`segmentation_loss` -- the combined loss on ``[B, M, h, w]`` logits against ``[B, 1, H, W]``
  targets.  Logits are upsampled (bilinear) to the target resolution before the loss: training
  at the full input size S is more accurate at the boundary than downsampling the target to the
  decoder's S/4 output.  With several masks per row (multimask) the loss is taken on the mask
  with the highest actual IoU (UltraSam).
* :func:`promptable_loss` -- runs the decoder for a batch of prompts, optionally twice (UltraSam's
  refinement training: pass-1 logits, detached, are fed as the mask prompt of pass 2, which
  outputs three masks); the loss is the sum of both passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uniultra.training.config import LossWeights  # noqa: F401 (re-exported: torch-free, checked in configs)

EPS = 1.0




def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)`` per row (all dims but the first)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    num = 2.0 * (p * t).sum(1) + eps
    den = p.sum(1) + t.sum(1) + eps
    return (1.0 - num / den).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss, mean over all elements."""
    x = logits.float()
    t = target.float()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with the target, per row (no gradient)."""
    with torch.no_grad():
        p = (logits > 0).flatten(1)
        t = (target > 0.5).flatten(1)
        inter = (p & t).sum(1).float()
        union = (p | t).sum(1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_mse_loss(pred_iou: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred_iou.float(), mask_iou(logits, target))


def upsample_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weights: LossWeights,
                      pred_iou: torch.Tensor | None = None, sync: bool = True) -> tuple[torch.Tensor, dict]:
    """Weighted loss of ``logits [B, M, h, w]`` against ``target [B, 1, H, W]`` (see module doc).

    Returns ``(loss, parts)`` where ``parts`` holds the unweighted terms as floats (as detached
    tensors with ``sync=False``, which avoids a GPU synchronisation per term)."""
    up = upsample_to(logits, tuple(target.shape[-2:]))
    b, m = up.shape[:2]
    if m > 1:  # pick, per row, the mask with the highest actual IoU
        ious = mask_iou(up.reshape(b * m, 1, *up.shape[-2:]),
                        target.repeat_interleave(m, 0)).view(b, m)
        best = ious.argmax(1)
        rows = torch.arange(b, device=up.device)
        chosen = up[rows, best][:, None]
    else:
        chosen = up
    terms = {}
    total = up.new_zeros(())
    if weights.dice:
        terms["dice"] = dice_loss(chosen, target)
        total = total + weights.dice * terms["dice"]
    if weights.focal:
        terms["focal"] = focal_loss(chosen, target)
        total = total + weights.focal * terms["focal"]
    if weights.bce:
        terms["bce"] = bce_loss(chosen, target)
        total = total + weights.bce * terms["bce"]
    if weights.iou and pred_iou is not None:
        full_t = target.repeat_interleave(m, 0)
        terms["iou"] = iou_mse_loss(pred_iou.reshape(-1), up.reshape(b * m, 1, *up.shape[-2:]), full_t)
        total = total + weights.iou * terms["iou"]
    return total, {k: (float(v.detach()) if sync else v.detach()) for k, v in terms.items()}


def decode_prompts(model, emb: dict, image_index: torch.Tensor, boxes: torch.Tensor | None = None,
                   has_box: torch.Tensor | None = None, point_coords: torch.Tensor | None = None,
                   point_labels: torch.Tensor | None = None, mask_input: torch.Tensor | None = None,
                   multimask: bool = False, has_points: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode prompt rows (row k belongs to image ``image_index[k]`` of ``emb``).

    Rows with a box (``has_box``; all rows when ``has_box`` is None) and rows with points only are
    decoded in separate calls (the prompt encoder needs one layout per call); point labels -1 are
    padding.  ``has_box`` may live on the CPU (then grouping needs no GPU synchronisation), and
    ``has_points`` (whether any label is >= 0) may be given for the same reason.
    Returns ``(logits [R, M, S/4, S/4], iou [R, M])`` in row order."""
    n = int(image_index.shape[0])
    dev = image_index.device
    if has_box is None:
        has_box = torch.full((n,), boxes is not None, dtype=torch.bool)
    groups = []
    if bool(has_box.all()) if has_box.device.type == "cpu" else False:
        groups.append((True, None))
    else:
        for flag in (True, False):
            rows = torch.nonzero(has_box == flag).flatten()
            if rows.numel():
                groups.append((flag, rows.to(dev)))
    if has_points is None:
        has_points = point_coords is not None and point_labels is not None and bool((point_labels >= 0).any())
    logits_all = iou_all = None
    for flag, rows in groups:
        if rows is None:  # every row has a box: no regrouping
            pc, pl = (point_coords, point_labels) if has_points else (None, None)
            lg, io = model.decode(model.embedding_rows(emb, image_index), boxes, pc, pl, mask_input=mask_input, multimask=multimask)
            return lg, io
        pc = pl = None
        if has_points and bool((point_labels[rows] >= 0).any()):
            pc, pl = point_coords[rows], point_labels[rows]
        if not flag and pc is None:
            raise ValueError("a prompt row has neither a box nor points")
        e = model.embedding_rows(emb, image_index[rows])
        mi = mask_input[rows] if mask_input is not None else None
        lg, io = model.decode(e, boxes[rows] if flag else None, pc, pl, mask_input=mi, multimask=multimask)
        if logits_all is None:
            logits_all = lg.new_zeros((n, *lg.shape[1:]))
            iou_all = io.new_zeros((n, *io.shape[1:]))
        logits_all[rows] = lg
        iou_all[rows] = io
    return logits_all, iou_all


def promptable_loss(model, images: torch.Tensor, target: torch.Tensor, weights: LossWeights,
                    boxes: torch.Tensor | None = None, point_coords: torch.Tensor | None = None,
                    point_labels: torch.Tensor | None = None, two_pass: bool = False,
                    has_box: torch.Tensor | None = None, image_index: torch.Tensor | None = None,
                    has_points: bool | None = None, sync: bool = True,
                    emb: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Encode ``images`` (unless their embedding ``emb`` is given), decode one prompt set per row
    and return the loss (see module doc).

    ``target`` ``[R, 1, H, W]``; row k prompts image ``image_index[k]`` (default: row k = image k).
    ``model`` is a :class:`uniultra.models.UniUltraModel` (or anything with ``encode``/``decode``)."""
    if emb is None:
        emb = model.encode(images)
    if image_index is None:
        image_index = torch.arange(images.shape[0], device=images.device)
    logits, iou = decode_prompts(model, emb, image_index, boxes, has_box, point_coords, point_labels,
                                 has_points=has_points)
    loss, parts = segmentation_loss(logits, target, weights, iou, sync=sync)
    if two_pass:
        logits2, iou2 = decode_prompts(model, emb, image_index, boxes, has_box, point_coords, point_labels,
                                       mask_input=logits.detach(), multimask=True, has_points=has_points)
        loss2, parts2 = segmentation_loss(logits2, target, weights, iou2, sync=sync)
        loss = loss + loss2
        parts.update({f"{k}2": v for k, v in parts2.items()})
    parts["loss"] = float(loss.detach()) if sync else loss.detach()
    return loss, parts
