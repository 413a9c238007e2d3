"""The class every SAM2-family model is built as: sam2's own video predictor, chosen through the
Hydra ``_target_`` override exactly as ``sam2.build_sam.build_sam2_video_predictor`` chooses it.

Image use is unchanged: ``SAM2VideoPredictor`` overrides none of ``SAM2Base``'s image code
(``forward_image``, the prompt encoder, the mask decoder), and adds no parameters, so state dicts
and checkpoints are Meta's.  Memory propagation (:func:`uniultra.inference.propagate_memory`) uses
sam2's public ``init_state`` / ``add_new_points_or_box`` / ``propagate_in_video`` on this object:
no class swap at run time, no hand-built inference state.
"""

from __future__ import annotations

import contextlib

import sam2.sam2_video_predictor as _svp
import torch

TARGET = "uniultra.models.video.VideoPredictor"


class VideoPredictor(_svp.SAM2VideoPredictor):
    """``SAM2VideoPredictor`` that can also start from frames already in memory."""

    def init_state_from_arrays(self, images: torch.Tensor, video_hw: tuple[int, int]) -> dict:
        """sam2's own :meth:`init_state`, with its frame loader handed ``images`` -- ``[N, 3, S, S]``
        prepared as ``load_video_frames`` prepares JPEG frames (resized to ``image_size``,
        ImageNet-normalised), on the model's device -- instead of a folder of JPEGs."""

        def load_video_frames(**_kwargs):
            return images, int(video_hw[0]), int(video_hw[1])

        with _replaced(_svp, "load_video_frames", load_video_frames):
            return self.init_state(video_path="<frames in memory>")


@contextlib.contextmanager
def _replaced(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)
