"""Export a model (image encoder + prompt encoder + mask decoder) to ONNX, and run it with
onnxruntime with the same pre- and post-processing as the PyTorch predictor.

Two graphs are written so that the embedding cache survives export:
``<out>`` (image -> embedding + high-resolution features) and ``<out stem>.decoder.onnx``
(embedding + prompts -> mask logits and score).  Boxes travel as two points with SAM's labels
2 and 3 (SAM2's prompt encoder appends its own padding point, inside the graph).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from uniultra.checks import StagedFiles
from uniultra.data.transforms import box_to_model, image_to_model_coords, to_model_input, upsample_logits
from uniultra.errors import InputError
from uniultra.inference.predictor import check_box, check_image

PARITY_TOLERANCE = 1e-3  # max |logit| difference accepted between onnxruntime and PyTorch


def _single_embedding(model) -> bool:
    """LiteMedSAM-family models: the decoder reads the image embedding alone."""
    return getattr(getattr(model, "arch", None), "family", "sam2") != "sam2"


class _Encoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        e = self.model.encode(image)
        high = e["high_res_feats"]
        if high is None:
            return (e["image_embed"],)
        return e["image_embed"], high[0], high[1]


class _LiteDecoder(nn.Module):
    """LiteMedSAM family: box corners arrive as points labelled 2 and 3, padding as -1."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_embed, point_coords, point_labels):
        sparse = self.model.sparse_embeddings(point_coords, point_labels)
        logits, iou = self.model.decode_sparse({"image_embed": image_embed}, sparse)
        return _with_prior(self.model, logits, point_coords, point_labels), iou


class _Decoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_embed, feat_s0, feat_s1, point_coords, point_labels):
        emb = {"image_embed": image_embed, "high_res_feats": [feat_s0, feat_s1]}
        logits, iou = self.model.decode(emb, None, point_coords, point_labels)
        return _with_prior(self.model, logits, point_coords, point_labels), iou


def _with_prior(model, logits, point_coords, point_labels):
    """The model's box-shape prior, for the box given as corner points (labels 2 and 3)."""
    from uniultra.models.prior import add_box_prior, box_from_points, has_prior

    if not has_prior(model):
        return logits
    boxes, has_box = box_from_points(point_coords, point_labels)
    return add_box_prior(logits, boxes, model.box_prior, model.image_size, has_box,
                         round_weight=getattr(model, "box_prior_round", None))


def decoder_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".decoder.onnx")


def export_onnx(model, out: str | Path, opset: int = 17) -> tuple[Path, Path]:
    """Write the encoder to ``out`` and the decoder beside it, as one unit: a failure at any point
    (the export, the disk, the second move) leaves neither new file and the older ones as they were."""
    single = _single_embedding(model)
    if not single and not model.sam.use_high_res_features_in_sam:
        raise InputError(f"model {model.name} has no high-resolution decoder features; ONNX export needs them")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    try:
        return _export(model.cpu().eval(), out, single, opset)
    finally:
        # torch.onnx.export puts the module it is given back into *that module's* mode, recursively:
        # a wrapper left in training mode switched the model to training mode, so a model with
        # BatchNorm (the cnn-branch's ResNet) computed other embeddings after an export
        model.train(was_training)


def _export(model, out: Path, single: bool, opset: int) -> tuple[Path, Path]:
    s = model.image_size
    image = torch.zeros(1, 3, s, s)
    with torch.no_grad():
        feats = _Encoder(model)(image)
    coords = torch.tensor([[[10.0, 10.0], [s / 2, s / 2], [s / 4, s / 4]]])
    labels = torch.tensor([[2, 3, 1]], dtype=torch.int64)
    if single:
        decoder, dec_inputs, feat_names = _LiteDecoder(model), (feats[0], coords, labels), ["image_embed"]
    else:
        decoder, dec_inputs, feat_names = _Decoder(model), (*feats, coords, labels), ["image_embed", "feat_s0", "feat_s1"]
    dec_out = decoder_path(out)
    with StagedFiles() as staged:  # encoder and decoder: both or neither (older files kept on failure)
        tmp_enc, tmp_dec = staged.path(out), staged.path(dec_out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Encoder(model).eval(), (image,), str(tmp_enc), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=feat_names)
            torch.onnx.export(decoder.eval(), dec_inputs, str(tmp_dec), dynamo=False,
                              opset_version=opset,
                              input_names=feat_names + ["point_coords", "point_labels"],
                              output_names=["logits", "iou"],
                              dynamic_axes={"point_coords": {1: "points"}, "point_labels": {1: "points"}})
    return out, dec_out


class OnnxPredictor:
    """The exported graphs run on onnxruntime (CPU), with the Predictor's own pre- and
    post-processing (``to_model_input``, ``upsample_logits``: these need torch, so this is not a
    PyTorch-free runtime).  One image and one prompt set at a time: ``set_image``, then
    ``predict_logits`` (low-resolution logits and score, what the parity tests compare with the
    Predictor) or ``predict`` (one mask at image size and its score).  No command uses it; it is
    the reference for running the exported files elsewhere and for the parity tests."""

    def __init__(self, encoder_path: str | Path, image_size: int):
        import onnxruntime as ort

        enc = Path(encoder_path)
        for p in (enc, decoder_path(enc)):
            if not p.is_file():
                raise InputError(f"ONNX file {p} does not exist: run `uniultra export` first")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.encoder = ort.InferenceSession(str(enc), opts, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(decoder_path(enc)), opts, providers=["CPUExecutionProvider"])
        self.size = image_size
        self._feats = None
        self._hw = None

    def set_image(self, image: np.ndarray) -> None:
        a = check_image(image)
        x, _ = to_model_input(a, self.size)
        self._feats = self.encoder.run(None, {"image": x.numpy()})
        self._hw = a.shape[:2]

    def predict_logits(self, box=None, points=None, labels=None) -> tuple[np.ndarray, float]:
        hw = self._hw
        coords, labs = [], []
        if box is not None:
            b = box_to_model(check_box(box, hw), hw, self.size)
            coords += [[b[0], b[1]], [b[2], b[3]]]
            labs += [2, 3]
        if points is not None:
            coords += image_to_model_coords(np.asarray(points, dtype=np.float64), hw, self.size).tolist()
            labs += list(labels if labels is not None else [1] * len(points))
        if not coords:
            raise InputError("no prompt given: a box or at least one point is needed")
        names = [i.name for i in self.decoder.get_inputs()]
        if "feat_s0" not in names and box is None:  # LiteMedSAM: SAM's padding point for points alone
            coords.append([0.0, 0.0])
            labs.append(-1)
        feeds = dict(zip(names, self._feats))
        feeds.update(point_coords=np.asarray([coords], dtype=np.float32),
                     point_labels=np.asarray([labs], dtype=np.int64))
        logits, iou = self.decoder.run(None, feeds)
        return logits, float(iou[0, 0])

    def predict(self, box=None, points=None, labels=None) -> tuple[np.ndarray, float]:
        logits, score = self.predict_logits(box, points, labels)
        mask = upsample_logits(torch.from_numpy(logits[0, 0]), self._hw, self.size) > 0
        return mask.numpy(), score
