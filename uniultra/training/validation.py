"""Validation during training: mean Dice per dataset with seeded, jittered box prompts.

The images and prompts come from the generator ``uniultra evaluate`` uses
(:func:`uniultra.evaluation.evaluate.prompted_cases`, through
:func:`uniultra.training.data.val_set`), and each image is scored by the same
:func:`uniultra.evaluation.metrics.dice` of the union of its masks, so validation Dice equals
``uniultra evaluate --prompt box`` Dice on the same split, seed and jitter
(``Testing/test_training.py`` checks it).  What differs is only how masks are predicted: here
in batches of images on the training device (and under DDP each rank scores every world-th image
and the sums are all-reduced), there one image at a time through the Predictor.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

DECODE_ROWS = 32  # prompts decoded at once (LiteMedSAM's decoder keeps 256x256 maps per prompt)


@torch.no_grad()
def validate(model, images, device: torch.device, amp: torch.dtype | None = None, batch: int = 16,
             rank: int = 0, world: int = 1) -> dict:
    """Mean Dice per dataset (and their mean, ``"mean"``) of ``model`` on ``ValImage`` s."""
    from uniultra.data.transforms import box_to_model, image_to_tensor, upsample_logits
    from uniultra.evaluation.metrics import dice

    was_training = model.training
    model.eval()
    S = model.image_size
    names = sorted({v.dataset for v in images})
    sums = torch.zeros(len(names), 2, dtype=torch.float64)
    mine = images[rank::world]
    ac = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    for k in range(0, len(mine), batch):
        chunk = mine[k: k + batch]
        x = torch.stack([image_to_tensor(v.image, S) for v in chunk]).to(device)
        rows = [j for j, v in enumerate(chunk) for _ in v.boxes]
        boxes = [box_to_model(bx, v.gt.shape, S) for v in chunk for bx in v.boxes]
        logits = None
        with ac:
            emb = model.encode(x)
            if rows:  # in slices of DECODE_ROWS prompts: images with many objects stay in bounded memory
                parts = []
                for r0 in range(0, len(rows), DECODE_ROWS):
                    e = model.embedding_rows(emb, torch.as_tensor(rows[r0:r0 + DECODE_ROWS], device=device))
                    b = torch.as_tensor(np.asarray(boxes[r0:r0 + DECODE_ROWS]), dtype=torch.float32, device=device)
                    parts.append(model.decode(e, b)[0].float().cpu())
                logits = torch.cat(parts)
        logits = logits.float().cpu() if logits is not None else None
        for j, v in enumerate(chunk):
            pred = np.zeros(v.gt.shape, bool)
            for r in [r for r, jj in enumerate(rows) if jj == j]:
                pred |= upsample_logits(logits[r, 0], v.gt.shape, S).numpy() > 0
            d = names.index(v.dataset)
            sums[d, 0] += dice(pred, v.gt)
            sums[d, 1] += 1
    if world > 1:
        red = sums.to(device) if device.type == "cuda" else sums
        dist.all_reduce(red)
        sums = red.cpu()
    if was_training:
        model.train()
    out = {n: float(sums[i, 0] / max(1.0, float(sums[i, 1]))) for i, n in enumerate(names)}
    out["mean"] = float(np.mean([out[n] for n in names])) if names else float("nan")
    return out
