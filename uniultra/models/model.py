"""UniUltraModel: a SAM2 model with an adaptation method, as one promptable segmenter.

It exposes the two halves the rest of the engine needs: ``encode`` (image -> embedding, the
expensive part that the predictor caches) and ``decode`` (embedding + prompts -> mask logits).
Prompts are in model-input pixel coordinates (the image resized to S x S).
"""

from __future__ import annotations

import torch
from torch import nn

from uniultra.models.architectures import Arch
from uniultra.models.peft import updated_parameter_names


class UniUltraModel(nn.Module):
    def __init__(self, sam: nn.Module, arch: Arch, image_size: int, peft: dict, name: str | None = None):
        super().__init__()
        self.sam = sam
        self.arch = arch
        self.image_size = image_size
        self.peft = peft
        self.name = name or arch.name
        # True when the memory attention/encoder hold trained weights (Meta's checkpoints or a
        # model trained on video): only then is SAM2's memory propagation meaningful.
        self.memory_trained = False
        # weight of the ellipse prior added to box rows' logits (uniultra.models.prior); 0 = none
        self.box_prior = 0.0
        self.box_prior_round: float | None = None  # round boxes' weight, None: the same

    # ------------------------------------------------------------------ encoder
    def encode(self, images: torch.Tensor) -> dict:
        """Run the image encoder; returns the embedding the decoder needs (and FPN maps)."""
        sam = self.sam
        out = sam.image_encoder(images)
        fpn = list(out["backbone_fpn"])
        high = [sam.sam_mask_decoder.conv_s0(fpn[0]), sam.sam_mask_decoder.conv_s1(fpn[1])] \
            if sam.use_high_res_features_in_sam else None
        embed = fpn[-1]
        if sam.directly_add_no_mem_embed:
            embed = embed + sam.no_mem_embed.view(1, -1, 1, 1)
        return {"image_embed": embed, "high_res_feats": high, "fpn": fpn}

    # ------------------------------------------------------------------ decoder
    @staticmethod
    def embedding_rows(emb: dict, rows) -> dict:
        """The decoder's part of a batched embedding, for the images ``rows`` (index tensor or slice)."""
        high = emb.get("high_res_feats")
        return {"image_embed": emb["image_embed"][rows],
                "high_res_feats": None if high is None else [h[rows] for h in high]}

    def decode(
        self,
        emb: dict,
        boxes: torch.Tensor | None = None,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
        prior_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one prompt set per row; an embedding of batch 1 is shared by all rows.
        ``prior_scale`` multiplies the model's box-shape prior (propagation's chained boxes)."""
        sam = self.sam
        coords, labels = point_coords, point_labels
        if boxes is not None:
            b = boxes.reshape(-1, 2, 2)
            box_labels = torch.tensor([2, 3], device=b.device, dtype=torch.int64).expand(b.shape[0], 2)
            if coords is not None:
                coords = torch.cat([b, coords], dim=1)
                labels = torch.cat([box_labels, labels.to(torch.int64)], dim=1)
            else:
                coords, labels = b, box_labels
        points = (coords, labels) if coords is not None else None
        sparse, dense = sam.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        n = sparse.shape[0]
        image_embed = emb["image_embed"]
        high = emb["high_res_feats"]
        repeat = image_embed.shape[0] == 1 and n > 1
        if not repeat and image_embed.shape[0] != n:
            raise ValueError(f"{n} prompt sets for {image_embed.shape[0]} images")
        if repeat and high is not None:
            high = [h.expand(n, -1, -1, -1) for h in high]
        logits, iou, _tokens, _obj = sam.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=repeat,
            high_res_features=high,
        )
        return self.with_box_prior(logits, boxes, prior_scale), iou

    def with_box_prior(self, logits: torch.Tensor, boxes: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
        """``logits`` plus this model's box-shape prior (times ``scale``) for the rows' boxes."""
        from uniultra.models.prior import add_box_prior

        r = self.box_prior_round
        return add_box_prior(logits, boxes, self.box_prior * scale, self.image_size,
                             round_weight=None if r is None else r * scale)

    def forward(self, images, boxes=None, point_coords=None, point_labels=None, mask_input=None):
        """Single-mask logits at S/4 for a batch of images with one prompt set each."""
        logits, _ = self.decode(self.encode(images), boxes, point_coords, point_labels, mask_input)
        return logits

    # ------------------------------------------------------------------ reports
    def param_report(self) -> dict:
        """Parameter counts. ``trainable`` counts every parameter with requires_grad (the
        paper's way, memory modules included); ``updated`` those that receive gradients in
        single-image training."""
        params = dict(self.sam.named_parameters())
        total = sum(p.numel() for p in params.values())
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        updated = sum(params[n].numel() for n in updated_parameter_names(self.sam))
        encoder = sum(p.numel() for n, p in params.items() if n.startswith("image_encoder."))
        return {
            "name": self.name,
            "arch": self.arch.name,
            "peft": self.peft.get("method"),
            "image_size": self.image_size,
            "total_params": total,
            "trainable_params": trainable,
            "trainable_share": 100.0 * trainable / total,
            "updated_params": updated,
            "updated_share": 100.0 * updated / total,
            "encoder_params": encoder,
        }

    def encoder_gflops(self) -> float:
        """Image-encoder GFLOPs at the model's input size, counted by torch's FlopCounterMode
        (convolutions, matmuls, attention; one multiply-add = 2 FLOPs)."""
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, self.image_size, self.image_size, device=next(self.parameters()).device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self.sam.image_encoder(x)
        return counter.get_total_flops() / 1e9
