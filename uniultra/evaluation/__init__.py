"""Evaluation: metrics, baselines and dataset / clip evaluation (model-independent)."""

from uniultra.evaluation.evaluate import evaluate_clips, evaluate_dataset
from uniultra.evaluation.metrics import (
    baseline_mask,
    box_fill,
    coco_map,
    dice,
    ellipse_in_box,
    hd95,
    iou,
)

__all__ = ["baseline_mask", "box_fill", "coco_map", "dice", "ellipse_in_box", "evaluate_clips", "evaluate_dataset",
           "hd95", "iou"]
