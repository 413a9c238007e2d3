"""Models: every adaptation method's shapes and freezing rules, the paper's counts, checkpoints."""

from __future__ import annotations

import pytest
import torch

from uniultra.errors import InputError
from uniultra.models import build_model, save_checkpoint
from uniultra.models.ch_adapter import ParallelToMLP, SobelMagnitude, has_ch_adapters
from uniultra.models.peft import LoRALinear

SIZE = 128  # small inputs keep the suite fast; every size that is a multiple of 32 works


def _forward(model, b=2):
    x = torch.randn(b, 3, model.image_size, model.image_size)
    boxes = torch.tensor([[8.0, 8.0, 60.0, 70.0]] * b)
    return model(x, boxes=boxes)


def _trainable(model):
    return {n for n, p in model.sam.named_parameters() if p.requires_grad}


def test_ch_adapter_in_every_block_and_freezing():
    m = build_model("sam2.1-hiera-tiny", image_size=SIZE, random_init=True, peft="ch-adapter")
    trunk = m.sam.image_encoder.trunk
    assert has_ch_adapters(trunk)
    # wired by hooks on sam2's own modules: the classes are sam2's, one adapter hook per block
    assert type(trunk).__module__.startswith("sam2.") and all(type(b).__module__.startswith("sam2.") for b in trunk.blocks)
    assert all(sum(isinstance(h, ParallelToMLP) for h in b._forward_hooks.values()) == 1 for b in trunk.blocks)
    for blk in trunk.blocks:  # context bottleneck D -> D/4 -> D, edge projection 4 -> D
        d = blk.dim_out
        assert blk.ch_adapter.down.weight.shape == (d // 4, d)
        assert blk.ch_adapter.up.weight.shape == (d, d // 4)
        assert blk.ch_adapter.edge_proj.weight.shape == (d, 4, 1, 1)
    train = _trainable(m)
    assert "image_encoder.trunk.edge_stem.weight" in train  # the edge conv trains (published code froze it)
    assert not any(n.startswith("image_encoder.neck.") for n in train)
    frozen_trunk = [n for n, p in trunk.named_parameters() if "ch_adapter" not in n and "edge_stem" not in n]
    assert frozen_trunk and not any(f"image_encoder.trunk.{n}" in train for n in frozen_trunk)
    assert all(p.requires_grad for p in m.sam.sam_mask_decoder.parameters())
    assert all(p.requires_grad for p in m.sam.memory_attention.parameters())
    out = _forward(m)
    assert out.shape == (2, 1, SIZE // 4, SIZE // 4)
    out.mean().backward()
    assert trunk.edge_stem.weight.grad is not None and trunk.edge_stem.weight.grad.abs().sum() > 0
    assert trunk.blocks[0].ch_adapter.up.weight.grad is not None


def test_sobel_is_depthwise_and_spatially_correct():
    """A vertical step in channel 2 only gives a response in channel 2, along the step."""
    edge = torch.zeros(1, 4, 8, 8)
    edge[0, 2, :, 4:] = 1.0
    g = SobelMagnitude()(edge)
    assert g[0, [0, 1, 3]].max() < 1e-4
    row = g[0, 2, 4]  # one row away from the borders: response on both sides of the step only
    assert row[3] > 1 and row[4] > 1
    assert row[0] < 1e-4 and row[1] < 1e-4 and row[5] < 1e-4
    assert torch.allclose(g[0, 2, 1:7, 3], g[0, 2, 4, 3].expand(6))  # same along the step


def test_edge_map_follows_stage_grids():
    m = build_model("uniultra-mini", image_size=SIZE)
    seen = []
    trunk = m.sam.image_encoder.trunk
    for blk in trunk.blocks:  # the edge map each adapter gets is on its block's output grid
        blk.ch_adapter.register_forward_hook(lambda mod, args, out: seen.append((args[1].shape[-2:], out.shape[1:3])))
    _forward(m, 1)
    assert len(seen) == len(trunk.blocks) and all(tuple(e) == tuple(t) for e, t in seen)
    assert {tuple(e) for e, _ in seen} == {(SIZE // 4 >> s, SIZE // 4 >> s) for s in range(len(trunk.stage_ends))}


@pytest.mark.parametrize("scope", ["encoder+decoder", "decoder"])
def test_lora_rank_targets_and_freezing(scope):
    m = build_model("sam2.1-hiera-tiny", image_size=SIZE, random_init=True, peft="lora", peft_options={"rank": 4}, scope=scope)
    train = _trainable(m)
    assert train and all("lora_" in n for n in train)
    qkv = m.sam.image_encoder.trunk.blocks[0].attn.qkv
    if scope == "encoder+decoder":
        assert isinstance(qkv, LoRALinear) and len(qkv.lora_A) == 2  # q and v only
        assert qkv.lora_A[0].shape[0] == 4 and float(qkv.lora_B[0].detach().abs().sum()) == 0.0
    else:
        assert not isinstance(qkv, LoRALinear)
    assert any(n.startswith("sam_mask_decoder.") for n in train)
    assert _forward(m).shape == (2, 1, SIZE // 4, SIZE // 4)


def test_lora_starts_as_identity():
    torch.manual_seed(0)
    base = build_model("uniultra-student-e8", image_size=SIZE, peft="full")
    sd = base.sam.state_dict()
    lora = build_model("uniultra-student-e8", image_size=SIZE, peft="lora")
    lora.sam.load_state_dict(sd, strict=False)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(base.eval()(x, boxes=torch.tensor([[5.0, 5, 60, 60]])),
                              lora.eval()(x, boxes=torch.tensor([[5.0, 5, 60, 60]])), atol=1e-5)


def test_adapter_and_cnn_branch_and_full_and_decoder():
    m = build_model("sam2.1-hiera-tiny", image_size=SIZE, random_init=True, peft="adapter")
    train = _trainable(m)
    assert any(".attn.adapter." in n for n in train) and any(".mlp.adapter." in n for n in train)
    assert any(n.startswith("sam_mask_decoder.transformer.layers.0.mlp.adapter") for n in train)
    assert len({n.split(".")[3] for n in train if n.startswith("image_encoder.trunk.blocks.")}) == 4
    assert _forward(m).shape[1:] == (1, SIZE // 4, SIZE // 4)

    m = build_model("sam2.1-hiera-tiny", image_size=SIZE, random_init=True, peft="cnn-branch", peft_options={"depth": 18})
    train = _trainable(m)
    assert any(n.startswith("image_encoder.trunk.cnn_branch.") for n in train)
    assert not any(n.startswith("image_encoder.trunk.blocks.") for n in train)
    assert all(p.requires_grad for p in m.sam.sam_mask_decoder.parameters())
    assert sorted(int(k) for k in m.sam.image_encoder.trunk.cnn_branch.proj) == [5, 7, 9]
    assert _forward(m).shape[1:] == (1, SIZE // 4, SIZE // 4)

    m = build_model("uniultra-student-e8", image_size=SIZE, peft="decoder")
    train = _trainable(m)
    assert train and all(n.startswith(("sam_mask_decoder.", "sam_prompt_encoder.")) for n in train)
    m = build_model("uniultra-student-e8", image_size=SIZE, peft="full")
    assert all(p.requires_grad for p in m.sam.parameters())


def test_bad_method_options_and_sizes():
    with pytest.raises(ValueError, match="unknown adaptation method"):
        build_model("uniultra-student-e8", image_size=SIZE, peft="prompt-tuning")
    with pytest.raises(ValueError, match="do not apply"):
        build_model("uniultra-student-e8", image_size=SIZE, peft="lora", peft_options={"depth": 3})
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("uniultra-student-e8", image_size=100)


def test_paper_counts_hiera_large_and_mini():
    """UniUltra's 8.91% (memory modules counted as trainable) and UniUltra-mini's 0.86M encoder."""
    large = build_model("sam2-hiera-large", image_size=256, peft="ch-adapter", random_init=True)
    r = large.param_report()
    adapters = sum(p.numel() for n, p in large.sam.named_parameters() if "ch_adapter" in n or "edge_stem" in n)
    assert round(adapters / 1e6, 2) == 9.07
    assert round(r["trainable_params"] / 1e6, 2) == 20.80
    assert round(r["trainable_share"], 2) == 8.91
    assert round(r["updated_params"] / 1e6, 2) == 13.29
    del large
    mini = build_model("uniultra-mini", image_size=256)
    assert round(mini.param_report()["encoder_params"] / 1e6, 2) == 0.86
    expected = {8: 0.24, 24: 1.87, 32: 3.27, 48: 7.23}
    for d, mparams in expected.items():
        s = build_model(f"uniultra-student-e{d}", image_size=128)
        assert abs(s.param_report()["encoder_params"] / 1e6 - mparams) < 0.02, d


def test_updated_params_really_receive_gradients():
    m = build_model("uniultra-student-e8", image_size=SIZE, peft="ch-adapter")
    x = torch.randn(1, 3, SIZE, SIZE)
    logits = m(x, boxes=torch.tensor([[4.0, 4, 50, 50]]), point_coords=torch.tensor([[[20.0, 20.0]]]),
               point_labels=torch.tensor([[1]]), mask_input=torch.randn(1, 1, SIZE // 4, SIZE // 4))
    logits.sum().backward()
    report = m.param_report()
    got = sum(p.numel() for p in m.sam.parameters() if p.grad is not None)
    # the decoder's multimask heads and the unused "not a point" embedding get no gradient with
    # a single-mask output; everything else counted as updated does
    assert 0.8 * report["updated_params"] <= got <= report["updated_params"]
    assert not any(p.grad is not None for p in m.sam.memory_attention.parameters())


def test_meta_checkpoint_round_trip(tmp_path):
    """A bare Meta-format checkpoint loads strictly, architecture inferred from its keys."""
    m = build_model("sam2.1-hiera-tiny", image_size=SIZE, random_init=True)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": m.sam.state_dict()}, path)
    again = build_model(str(path), image_size=SIZE)
    assert again.arch.name == "sam2.1-hiera-tiny" and again.memory_trained
    for (k, a), (_, b) in zip(m.sam.state_dict().items(), again.sam.state_dict().items()):
        assert torch.equal(a, b), k
    # and Meta's own builder reads our file
    from sam2.build_sam import build_sam2

    build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(path), device="cpu",
               hydra_overrides_extra=[f"++model.image_size={SIZE}"])


def test_uniultra_checkpoint_round_trip_with_adapters(tmp_path):
    m = build_model("uniultra-student-e8", image_size=SIZE, peft="lora", peft_options={"rank": 2})
    with torch.no_grad():
        for p in m.sam.parameters():
            if p.requires_grad:
                p.add_(0.01)
    x = torch.randn(1, 3, SIZE, SIZE)
    box = torch.tensor([[5.0, 5, 70, 70]])
    full = save_checkpoint(m, tmp_path / "full.pt")
    again = build_model(str(full))
    assert again.peft["method"] == "lora"
    with torch.no_grad():
        assert torch.allclose(m.eval()(x, box), again.eval()(x, box), atol=1e-6)
    small = save_checkpoint(m, tmp_path / "image.pt", image_only=True, half=True)
    assert small.stat().st_size < 0.75 * full.stat().st_size
    assert build_model(str(small)).image_size == SIZE


def test_bad_checkpoints(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_model(str(tmp_path / "missing.pt"))
    m = build_model("uniultra-student-e8", image_size=SIZE)
    good = save_checkpoint(m, tmp_path / "good.pt")
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated"):
        build_model(str(trunc))
    sd = m.sam.state_dict()
    sd.pop(next(iter(sd)))
    torch.save({"model": sd, "uniultra": {"arch": "uniultra-student-e8", "image_size": SIZE,
                                          "peft": {"method": "ch-adapter"}}}, tmp_path / "wrong.pt")
    with pytest.raises(InputError, match="missing keys"):
        build_model(str(tmp_path / "wrong.pt"))
    with pytest.raises(InputError, match="unknown model"):
        build_model("no-such-model")


def test_student_with_another_method_round_trips(tmp_path):
    """A student always keeps its CH-Adapters; LoRA goes on top and reloads from file."""
    m = build_model("uniultra-student-e8", image_size=SIZE, peft="lora")
    names = {n for n, _ in m.sam.named_parameters()}
    assert any("ch_adapter" in n for n in names) and any("lora_" in n for n in names)
    again = build_model(str(save_checkpoint(m, tmp_path / "s.pt")))
    assert {n for n, _ in again.sam.named_parameters()} == names


def test_fine_tuning_a_trained_student_with_ch_adapter_freezes_its_trunk(tmp_path):
    path = save_checkpoint(build_model("uniultra-student-e8", image_size=SIZE), tmp_path / "s.pt")
    m = build_model(str(path), peft="ch-adapter")
    train = _trainable(m)
    assert any("ch_adapter" in n for n in train)
    assert not any(n.startswith("image_encoder.trunk.blocks.0.attn.") for n in train)
    assert not any(n.startswith("image_encoder.neck.") for n in train)
    small = save_checkpoint(m, tmp_path / "a.pt", trained_only=True, meta={"base": str(path)})
    again = build_model(str(small))
    assert again.peft["method"] == "ch-adapter"


def test_sam_unet_med_token_decoder(tmp_path):
    m = build_model("sam2.1-hiera-tiny", image_size=SIZE, random_init=True, peft="cnn-branch",
                    peft_options={"depth": 18, "decoder": "med-token"})
    train = _trainable(m)
    assert "sam_mask_decoder.med_token.weight" in train and any("med_mlp" in n for n in train)
    x = torch.randn(2, 3, SIZE, SIZE)
    logits, score = m.decode(m.encode(x), boxes=torch.tensor([[4.0, 4, 60, 60], [10, 10, 90, 90]]), multimask=True)
    assert logits.shape == (2, 1, SIZE // 4, SIZE // 4) and torch.all(score == 1)
    logits.sum().backward()
    assert m.sam.sam_mask_decoder.med_token.weight.grad is not None
    again = build_model(str(save_checkpoint(m, tmp_path / "u.pt")))
    with torch.no_grad():
        assert torch.allclose(again.eval()(x[:1], torch.tensor([[4.0, 4, 60, 60]])),
                              m.eval()(x[:1], torch.tensor([[4.0, 4, 60, 60]])), atol=1e-5)


def test_ch_adapter_hooks_follow_a_deep_copy():
    """The adapters are wired by hook objects, not closures: a deep copy (made after a forward
    pass, with autograd on) computes the same, and its hooks use its own adapters."""
    import copy

    torch.manual_seed(0)
    m = build_model("uniultra-mini", image_size=SIZE).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    box = torch.tensor([[8.0, 8.0, 60.0, 70.0]])
    before = m.decode(m.encode(x), box)[0]
    twin = copy.deepcopy(m)
    with torch.no_grad():
        assert torch.equal(twin.decode(twin.encode(x), box)[0], before)
        for blk in twin.sam.image_encoder.trunk.blocks:
            blk.ch_adapter.up.weight.zero_()
            blk.ch_adapter.edge_proj.weight.zero_()
        changed = twin.decode(twin.encode(x), box)[0]
        assert not torch.allclose(changed, before, atol=1e-4)
        assert torch.equal(m.decode(m.encode(x), box)[0], before)


def test_cnn_branch_hooks_follow_a_deep_copy():
    """The CNN branch is wired by hooks on sam2's own trunk (no class swap): a deep copy computes
    the same and runs its own branch."""
    import copy

    torch.manual_seed(0)
    m = build_model("sam2.1-hiera-tiny", image_size=64, random_init=True, peft="cnn-branch",
                    peft_options={"depth": 18}).eval()
    trunk = m.sam.image_encoder.trunk
    assert type(trunk).__module__.startswith("sam2.")
    x = torch.randn(1, 3, 64, 64)
    box = torch.tensor([[8.0, 8.0, 40.0, 50.0]])
    before = m.decode(m.encode(x), box)[0]
    twin = copy.deepcopy(m)
    with torch.no_grad():
        assert torch.equal(twin.decode(twin.encode(x), box)[0], before)
        for conv in twin.sam.image_encoder.trunk.cnn_branch.proj.values():
            conv.weight.fill_(0.01)  # zero-initialised: give the copy's branch a say
        assert not torch.allclose(twin.decode(twin.encode(x), box)[0], before, atol=1e-4)
        assert torch.equal(m.decode(m.encode(x), box)[0], before)
