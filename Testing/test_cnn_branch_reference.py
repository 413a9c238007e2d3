"""SAM-UNet's CNN branch on Hiera, pinned to a recording.

`Testing/data/cnn_branch_reference.pt` was written by this file (``python
Testing/test_cnn_branch_reference.py``) from the implementation of commit 81084c5, where the branch
was installed by swapping the trunk's class and copying sam2's ``Hiera.forward``.  The test
computes the same outputs with today's code (SAM2.1 Hiera-tiny, 128 px, ResNet-18 branch, weights
from a generator seeded per state-dict key as in test_ch_adapter_reference.py) and requires them
to match within 1e-6: logits, IoU, the image embedding's channel means, and the gradient of one
projection conv of the branch (summed per output channel).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_ch_adapter_reference import _set_weights

REFERENCE = Path(__file__).parent / "data" / "cnn_branch_reference.pt"
TOL = 1e-6


def _outputs() -> dict:
    from uniultra.models import build_model

    m = build_model("sam2.1-hiera-tiny", image_size=128, random_init=True, peft="cnn-branch",
                    peft_options={"depth": 18})
    _set_weights(m.sam)
    m.eval()
    trunk = m.sam.image_encoder.trunk
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[8.0, 8.0, 60.0, 70.0], [30.0, 20.0, 120.0, 100.0]])
    emb = m.encode(x)
    logits, iou = m.decode(emb, boxes)
    logits.square().mean().backward()
    first = str(min(int(k) for k in trunk.cnn_branch.proj))
    return {"logits": logits.detach(), "iou": iou.detach(),
            "embed": emb["image_embed"].detach().mean(dim=(0, 2, 3)),
            "proj_grad": trunk.cnn_branch.proj[first].weight.grad.detach().sum(dim=(1, 2, 3))}  # per channel


@pytest.mark.usefixtures("one_thread")  # the recording's thread count (conftest.one_thread)
def test_outputs_match_the_recording():
    want = torch.load(REFERENCE, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    got = _outputs()
    assert sorted(got) == sorted(want)
    for key in want:
        diff = float((got[key].double() - want[key].double()).abs().max())
        assert got[key].shape == want[key].shape and diff <= TOL, (key, diff)
    assert float(want["proj_grad"].abs().max()) > 0  # the branch is on the path to the logits


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rec = {k: v.contiguous() for k, v in _outputs().items()}
    torch.save(rec, REFERENCE)
    print({k: tuple(v.shape) for k, v in rec.items()}, f"{REFERENCE.stat().st_size} bytes")
