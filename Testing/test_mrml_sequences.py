"""Cine ultrasound on real MRML sequences: frames, per-frame masks, undo, DICOM, files."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import AXIAL, DATA, make_volume, mrml_context, slice_to_ras
from UniUltraSegmentLib.geometry import extract_frame, slice_geometry
from UniUltraSegmentLib.segments import (
    SegmentEditor,
    create_segmentation_for,
    get_or_add_segment,
    segment_frame,
    write_masks,
)
from UniUltraSegmentLib.sequences import (
    cine_frame_masks,
    create_cine,
    ensure_segmentation_sequence,
    export_frame_masks_png,
    export_frame_masks_seg_nrrd,
    find_cine,
    load_dicom_cine,
    load_segmentation,
    load_sequence_file,
    read_dicom_cine,
    save_segmentation,
    save_sequence_file,
    write_cine_masks,
)

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)


def _frames(n=5, h=12, w=16):
    rng = np.random.default_rng(1)
    return [(rng.integers(0, 200, (h, w)) + i).astype(np.uint8) for i in range(n)]


def _box(shape, x0, y0, x1, y1):
    m = np.zeros(shape, bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def test_cine_proxy_shows_current_frame(ctx):
    frames = _frames()
    cine = create_cine(ctx, frames, spacing=(0.2, 0.3), frame_time_s=0.04)
    assert find_cine(ctx, cine.proxy).sequence is cine.sequence
    assert find_cine(ctx, make_volume(ctx, np.zeros((1, 4, 4), np.uint8))) is None
    geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
    for i in (3, 0, 4):
        cine.select(i)
        assert cine.current_frame == i
        assert np.array_equal(extract_frame(cine.proxy, geom), frames[i])
    assert all(np.array_equal(a, b) for a, b in zip(cine.frames(geom), frames))
    sp = cine.proxy.GetSpacing()
    assert np.allclose(sp[:2], (0.2, 0.3))


def test_per_frame_masks_follow_scrubbing_and_undo(ctx):
    frames = _frames()
    cine = create_cine(ctx, frames)
    geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
    seg, sid = ensure_segmentation_sequence(ctx, cine, segment_name="vessel")
    editor = SegmentEditor(ctx)
    editor.configure(seg, cine.proxy, sid)
    # one interactive apply on frame 2 goes through the proxy and is saved into frame 2 only
    cine.select(2)
    m2 = _box(geom.shape, 1, 1, 4, 5)
    write_masks(editor, seg, sid, geom, {geom.index: m2})
    masks = cine_frame_masks(cine, seg, sid, geom)
    assert np.array_equal(masks[2], m2) and sum(m.sum() for m in masks) == m2.sum()
    # propagation result: frames 0, 3, 4 (1 left alone), one undo record
    res = [_box(geom.shape, i, 0, i + 3, 3) for i in range(5)]
    res[1] = None
    cine.select(4)
    edit = write_cine_masks(ctx, editor, cine, seg, sid, geom, res, mode="add")
    assert edit.frames_written == [0, 2, 3, 4]
    assert cine.current_frame == 4
    masks = cine_frame_masks(cine, seg, sid, geom)
    assert not masks[1].any()
    assert np.array_equal(masks[2], m2 | res[2])
    for i in (0, 3, 4):
        assert np.array_equal(masks[i], res[i])
    # scrubbing shows each frame's mask in the proxy segmentation
    for i in range(5):
        cine.select(i)
        assert np.array_equal(segment_frame(seg, sid, cine.proxy, geom), masks[i])
    edit.undo(ctx)
    masks = cine_frame_masks(cine, seg, sid, geom)
    assert np.array_equal(masks[2], m2) and sum(m.sum() for m in masks) == m2.sum()
    assert np.array_equal(segment_frame(seg, sid, cine.proxy, geom), masks[4])


def test_existing_segmentation_joins_the_browser(ctx):
    cine = create_cine(ctx, _frames(3))
    geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
    cine.select(1)
    seg = create_segmentation_for(ctx, cine.proxy)
    sid = get_or_add_segment(seg, "lesion")
    editor = SegmentEditor(ctx)
    editor.configure(seg, cine.proxy, sid)
    m = _box(geom.shape, 2, 2, 5, 5)
    write_masks(editor, seg, sid, geom, {geom.index: m})
    seg2, sid2 = ensure_segmentation_sequence(ctx, cine, seg, "lesion")
    assert seg2 is seg and sid2 == sid
    masks = cine_frame_masks(cine, seg, sid, geom)
    # what the user drew before the conversion is kept, on every frame (the caller asked first)
    assert all(np.array_equal(mk, m) for mk in masks)
    # calling again is a no-op (no stray sequences or segments)
    assert ensure_segmentation_sequence(ctx, cine, seg, "lesion") == (seg, sid)
    assert seg.GetSegmentation().GetNumberOfSegments() == 1


def test_exports_and_seg_nrrd_round_trip(ctx, tmp_path):
    from PIL import Image

    cine = create_cine(ctx, _frames(3), spacing=(0.5, 0.5))
    geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
    seg, sid = ensure_segmentation_sequence(ctx, cine)
    editor = SegmentEditor(ctx)
    editor.configure(seg, cine.proxy, sid)
    res = [_box(geom.shape, i, i, i + 4, i + 2) for i in range(3)]
    write_cine_masks(ctx, editor, cine, seg, sid, geom, res)
    pngs = export_frame_masks_png(cine, seg, sid, geom, tmp_path / "png")
    for p, m in zip(pngs, res):
        assert np.array_equal(np.array(Image.open(p)) > 0, m)
    segs = export_frame_masks_seg_nrrd(cine, seg, tmp_path / "seg")
    for i, p in enumerate(segs):
        back = load_segmentation(ctx, p)
        assert np.array_equal(segment_frame(back, sid, cine.sequence.GetNthDataNode(i), geom, 0), res[i])
    # single segmentation round trip, 3D anisotropic
    m = np.array([[0, 0, 2.5, 1], [-0.5, 0, 0, 2], [0, 0.8, 0, 3], [0, 0, 0, 1]], float)
    vol = make_volume(ctx, np.zeros((4, 5, 6), np.int16), m)
    s = create_segmentation_for(ctx, vol)
    a, b = get_or_add_segment(s, "a"), get_or_add_segment(s, "b")
    from UniUltraSegmentLib.segments import segment_array

    g = slice_geometry(vol, slice_to_ras(AXIAL, 4.6))  # S = 0.8 j + 3 -> j = 2
    ed = SegmentEditor(ctx)
    ed.configure(s, vol, a)
    write_masks(ed, s, a, g, {g.index: _box(g.shape, 0, 0, 2, 2)})
    write_masks(ed, s, b, g, {g.index: _box(g.shape, 3, 1, 4, 3)})
    save_segmentation(s, tmp_path / "x.seg.nrrd")
    back = load_segmentation(ctx, tmp_path / "x.seg.nrrd")
    names = {back.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)}
    assert names == {"a", "b"}
    for sid_ in (a, b):
        assert np.array_equal(segment_array(back, sid_, vol), segment_array(s, sid_, vol))
        assert segment_array(s, sid_, vol).sum() > 0


def test_seq_nrrd_round_trip(ctx, tmp_path):
    frames = _frames(4)
    cine = create_cine(ctx, frames, spacing=(0.25, 0.25), frame_time_s=0.05)
    save_sequence_file(ctx, cine.sequence, tmp_path / "clip.seq.nrrd")
    back = load_sequence_file(ctx, tmp_path / "clip.seq.nrrd")
    assert back.num_frames == 4
    geom = slice_geometry(back.proxy, slice_to_ras(AXIAL, 0.0))
    assert all(np.array_equal(a, b) for a, b in zip(back.frames(geom), frames))
    with pytest.raises(ValueError, match="seq.nrrd"):
        load_sequence_file(ctx, tmp_path / "missing.seq.nrrd")


def test_palette_colour_rle_dicom(ctx):
    path = DATA / "dicom" / "US-PAL-8-10x-echo.dcm"
    if not path.exists():
        pytest.skip("shared data not present")
    d = read_dicom_cine(path)
    assert d.frames.shape == (10, 430, 600, 3) and d.frames.dtype == np.uint8
    assert d.frame_time_s == pytest.approx(0.076)
    cine = load_dicom_cine(ctx, path)
    assert cine.num_frames == 10 and cine.proxy.GetClassName() == "vtkMRMLVectorVolumeNode"
    geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
    cine.select(7)
    assert np.array_equal(extract_frame(cine.proxy, geom), d.frames[7])


def test_ybr_jpeg_dicom(ctx):
    from pydicom import examples

    path = examples.get_path("ybr_color")
    d = read_dicom_cine(path)
    assert d.frames.shape == (30, 240, 320, 3)
    assert d.spacing[0] == pytest.approx(0.5105, abs=1e-3)  # ultrasound region, cm -> mm
    cine = load_dicom_cine(ctx, path)
    geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
    cine.select(29)
    frame = extract_frame(cine.proxy, geom)
    assert np.array_equal(frame, d.frames[29])
    assert abs(int(frame[..., 0].mean()) - int(frame[..., 2].mean())) < 80  # converted to RGB, not YCbCr


def test_not_dicom_is_a_clear_error(tmp_path):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"nope")
    with pytest.raises(ValueError, match="DICOM"):
        read_dicom_cine(p)


def test_shipped_sample_data_loads(ctx):
    from mrml_fixtures import REPO
    from PIL import Image

    sample = REPO / "UniUltraSegment" / "Resources" / "SampleData"
    cine = load_sequence_file(ctx, sample / "CarotidCine.seq.nrrd")
    assert cine.num_frames == 10
    geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
    frames = cine.frames(geom)
    assert frames[0].shape == geom.shape and frames[0].dtype == np.uint8
    assert not np.array_equal(frames[0], frames[9])
    png = np.array(Image.open(sample / "CarotidUS.png"))
    assert png.ndim == 2 and png.dtype == np.uint8
    total = sum(p.stat().st_size for p in sample.iterdir())
    assert total < 1.5e6


def _dicom_variants(tmp_path):
    """DICOM files whose decoding used to differ between the CLI and Slicer readers: MONOCHROME1
    (16-bit single frame and 32-bit multi-frame), YBR_FULL_422 JPEG, palette colour, RGB."""
    import pydicom
    from pydicom import examples

    out = {}
    for name in ("ct", "rt_dose"):  # MONOCHROME2 -> MONOCHROME1 (inverted for display)
        ds = pydicom.dcmread(examples.get_path(name))
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(tmp_path / f"{name}-m1.dcm")
        out[f"{name}-m1"] = (tmp_path / f"{name}-m1.dcm", ds.pixel_array)
    for name in ("ybr_color", "palette_color", "rgb_color"):
        out[name] = (examples.get_path(name), None)
    return out


def test_dicom_same_pixels_from_cli_and_slicer(ctx, tmp_path):
    """One DICOM file reaches the model as the same pixels from `uniultra` (read_frames) and from
    Slicer (load_dicom_cine -> sequence -> the frames the effect reads)."""
    from uniultra.data.io import read_frames

    for name, (path, raw) in _dicom_variants(tmp_path).items():
        cli = read_frames(path)
        cine = load_dicom_cine(ctx, path)
        geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
        shown = cine.frames(geom)
        assert len(shown) == len(cli) >= 1, name
        for i, (a, b) in enumerate(zip(cli, shown)):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (name, i)
        if raw is not None:  # MONOCHROME1 is flipped within the data's range: min <-> max
            raw = raw if raw.ndim == 3 else raw[None]
            assert np.array_equal(np.stack(cli).astype(np.int64), raw.max() + raw.min() - raw.astype(np.int64)), name
    ybr = read_frames(_dicom_variants(tmp_path)["ybr_color"][0])[0]
    assert abs(int(ybr[..., 0].mean()) - int(ybr[..., 2].mean())) < 80  # RGB, not YCbCr
