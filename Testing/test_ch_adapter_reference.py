"""CH-Adapter outputs pinned to a recording.

`Testing/data/ch_adapter_reference.pt` was written by this file (``python
Testing/test_ch_adapter_reference.py``) from the CH-Adapter implementation of commit 4379b7e,
which installed the adapter by swapping the Hiera block's class and copying
``MultiScaleBlock.forward``.  The test computes the same outputs with the code of today and
requires them to match within 1e-6, so a change of how the adapter is wired into sam2's and
TinyViT's blocks cannot change what a trained model computes:

- the bundled ``uniultra-mini-us`` (a CH-Adapter student) on the module's carotid sample image
  with the ``make demo`` box: low-resolution logits, IoU score and the full-size mask;
- a SAM2.1 Hiera-tiny with CH-Adapters (128 px): logits, IoU, the distillation feature tap's
  per-level terms (MLP branch, scaled adapter) and the gradient of the edge stem;
- a LiteMedSAM (TinyViT) with CH-Adapters: logits and IoU.

The random models get their weights from a generator seeded per parameter *name*, so the
recording depends on the state-dict keys and shapes only, not on the order in which modules
are built.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REFERENCE = Path(__file__).parent / "data" / "ch_adapter_reference.pt"
SAMPLE = Path(__file__).parent.parent / "UniUltraSegment" / "Resources" / "SampleData" / "CarotidUS.png"
BOX = (50, 132, 123, 199)  # the `make demo` box
TOL = 1e-6


def _set_weights(module: torch.nn.Module) -> None:
    """Every state-dict tensor from a generator seeded by its key: norms near 1, the rest small,
    so the random model's activations stay in a normal range.  (Non-persistent buffers, such as
    the fixed Sobel kernels, are not in the state dict and keep their values.)"""
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            r = torch.randn(t.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                t.copy_(1 + 0.1 * r)
            elif leaf in ("running_var",):
                t.copy_(1 + 0.1 * r.abs())
            else:
                t.copy_(0.05 * r)


def _mini_us() -> dict:
    from uniultra.data.io import read_image
    from uniultra.inference import Predictor

    p = Predictor.from_name("uniultra-mini-us", device="cpu")
    p.set_image(read_image(SAMPLE))
    pred = p.predict(boxes=[BOX])
    return {"logits": pred.low_res_logits.float(), "score": torch.as_tensor(pred.scores),
            "mask_bits": torch.from_numpy(np.packbits(pred.masks))}  # the bool mask, 8 pixels a byte


def _hiera() -> dict:
    from uniultra.models import build_model
    from uniultra.training.distill import FeatureTap, stage_end_blocks

    m = build_model("sam2.1-hiera-tiny", image_size=128, random_init=True, peft="ch-adapter")
    _set_weights(m.sam)
    m.eval()
    trunk = m.sam.image_encoder.trunk
    tap = FeatureTap(trunk, stage_end_blocks(trunk))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 128, generator=g)
    boxes = torch.tensor([[8.0, 8.0, 60.0, 70.0], [30.0, 20.0, 120.0, 100.0]])
    emb = m.encode(x)
    logits, iou = m.decode(emb, boxes)
    out = {"logits": logits.detach(), "iou": iou.detach(), "embed": emb["image_embed"].detach().mean(dim=(0, 2, 3))}
    # the tap's terms, reduced per channel (the full maps would make the file large)
    out.update({f"tap_{k}": v.detach().mean(dim=(0, 1, 2)) for k, v in tap.terms().items()})
    tap.remove()
    logits.square().mean().backward()
    out["edge_stem_grad"] = trunk.edge_stem.weight.grad.detach().clone()
    out["adapter0_up_grad"] = trunk.blocks[0].ch_adapter.up.weight.grad.detach().clone()
    return out


def _litemedsam() -> dict:
    from uniultra.models import build_model

    m = build_model("litemedsam", peft="ch-adapter", random_init=True)
    _set_weights(m.sam)
    m.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 256, 256, generator=g)
    with torch.no_grad():
        emb = m.encode(x)
        logits, iou = m.decode(emb, torch.tensor([[40.0, 40.0, 200.0, 180.0]]))
    # with the adapters' weights zeroed the logits' sum moves by about 7.6 (checked when recorded)
    return {"logits": logits[..., ::2, ::2].contiguous(), "logits_sum": logits.double().sum().reshape(1),
            "iou": iou, "embed": emb["image_embed"].mean(dim=(0, 2, 3))}


CASES = {"mini_us": _mini_us, "hiera": _hiera, "litemedsam": _litemedsam}


@pytest.fixture(scope="module")
def reference() -> dict:
    assert REFERENCE.is_file(), f"{REFERENCE} is missing: it is part of the repository"
    return torch.load(REFERENCE, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.usefixtures("one_thread")  # the recording's thread count (conftest.one_thread)
def test_outputs_match_the_recording(reference, case):
    torch.manual_seed(0)
    got, want = CASES[case](), reference[case]
    assert sorted(got) == sorted(want)
    for key in want:
        a, b = got[key], want[key]
        assert a.shape == b.shape, (case, key, a.shape, b.shape)
        if not a.is_floating_point():
            assert torch.equal(a, b), (case, key, int((a != b).sum()))
            continue
        # the logits sum is over 65536 values: its own (relative) tolerance
        tol = TOL * max(1.0, float(b.abs().max())) if key == "logits_sum" else TOL
        diff = float((a.double() - b.double()).abs().max())
        assert diff <= tol, (case, key, diff)
    # the recording is not trivial: the adapters matter (checked once on the Hiera case)
    if case == "hiera":
        assert float(want["tap_adapter0"].abs().max()) > 1e-3
        assert float(want["edge_stem_grad"].abs().max()) > 0


if __name__ == "__main__":
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.set_num_threads(1)  # as the test compares (see one_thread)
    rec = {}
    for name, fn in CASES.items():
        torch.manual_seed(0)
        rec[name] = {k: v.detach().cpu().contiguous() for k, v in fn().items()}
        print(name, {k: tuple(v.shape) for k, v in rec[name].items()})
    torch.save(rec, REFERENCE)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes)")
    assert np.isfinite(float(rec["mini_us"]["logits"].abs().max()))
