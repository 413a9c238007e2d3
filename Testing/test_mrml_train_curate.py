"""UniUltraTrain curation on the real Slicer core: scene segmentations -> uniform dataset, voxel-aligned."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
from mrml_fixtures import AXIAL, REPO, make_volume, mrml_context, rotation, slice_to_ras
from PIL import Image
from UniUltraSegmentLib.geometry import slice_geometry
from UniUltraSegmentLib.segments import (
    SegmentEditor,
    create_segmentation_for,
    get_or_add_segment,
    oriented_image_from_array,
    write_masks,
)
from UniUltraSegmentLib.sequences import (
    create_cine,
    ensure_segmentation_sequence,
    get_or_add_segment_in_all,
    save_segmentation,
    write_cine_masks,
)

if str(REPO / "UniUltraTrain") not in sys.path:
    sys.path.insert(0, str(REPO / "UniUltraTrain"))
from UniUltraTrainLib import curate  # noqa: E402

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)


def _read(path):
    return np.array(Image.open(path))


def _rows(out):
    with open(out / "split.csv", newline="") as f:
        return list(csv.DictReader(f))


def _labelled_volume(ctx, vol, seg_name, label_arr, segment="lesion"):
    """Segmentation on `vol` whose segment `segment` is exactly the voxels where label_arr > 0."""
    seg = create_segmentation_for(ctx, vol, seg_name)
    sid = get_or_add_segment(seg, segment)
    editor = SegmentEditor(ctx)
    editor.configure(seg, vol, sid)
    m = curate.ijk_to_ras_of(vol)
    editor.save_state_for_undo()
    editor.modify(seg, sid, oriented_image_from_array((label_arr > 0).astype(np.uint8), m), "add")
    return seg, sid


def test_export_2d_grey_and_rgb_pixel_exact(ctx, tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (1, 20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (1, 18, 26, 3), dtype=np.uint8)
    v1 = make_volume(ctx, grey, name="grey img")
    v2 = make_volume(ctx, rgb, name="colour", rgb=True)
    lab1 = np.zeros_like(grey)
    lab1[0, 3:9, 5:20] = 1
    lab1[0, 12:15, 2:4] = 1  # a second object
    lab2 = np.zeros(rgb.shape[:3], np.uint8)
    lab2[0, 2:10, 1:7] = 1
    s1, _ = _labelled_volume(ctx, v1, "s1", lab1)
    s2, _ = _labelled_volume(ctx, v2, "s2", lab2)
    cases = [curate.make_case(ctx, s1), curate.make_case(ctx, s2)]
    assert [c.kind for c in cases] == ["2d", "rgb"]
    res = curate.export_dataset(cases, ["lesion"], tmp_path / "ds", seed=3)
    out = tmp_path / "ds"
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["grey_img_0000", "colour_0000"]
    assert {r["split"] for r in rows} == {"train", "val"}  # two cases: one in val
    # a 2D image loaded by Slicer (LPS) is shown as stored: PNG == array, mask on the same pixels
    assert np.array_equal(_read(out / "images" / "grey_img_0000.png"), grey[0])
    assert np.array_equal(_read(out / "masks" / "grey_img_0000.png"), lab1[0] * 255)
    img = _read(out / "images" / "colour_0000.png")
    assert img.shape == (18, 26, 3) and np.array_equal(img, rgb[0])
    assert np.array_equal(_read(out / "masks" / "colour_0000.png"), lab2[0] * 255)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["labels"] == {"255": "lesion"} and sum(meta["count"].values()) == 2
    by_case = {r["case"]: r for r in res.summary}
    assert by_case["grey_img"]["lesion"] == 2 and by_case["colour"]["lesion"] == 1
    assert by_case["total"]["frames"] == 2
    assert res.preview is not None and _read(res.preview).ndim == 3
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave nothing behind


def _oblique_matrix(spacing, degrees=30.0):
    m = np.eye(4)
    m[:3, :3] = rotation((1, 2, 3), degrees) @ np.diag(spacing)
    m[:3, 3] = (10.0, -5.0, 3.0)
    return m


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_export_3d_oblique_anisotropic_voxel_aligned(ctx, tmp_path, orientation):
    rng = np.random.default_rng(1)
    vol_arr = rng.integers(0, 256, (6, 14, 11), dtype=np.uint8)  # (K, J, I)
    m = _oblique_matrix((0.3, 0.7, 2.5))
    vol = make_volume(ctx, vol_arr, m, name="vol3d")
    lab = np.zeros_like(vol_arr)
    # label = image > 128 on a few slices of every axis direction, so alignment shows pixel by pixel
    lab[1] = vol_arr[1] > 128
    lab[4, 2:9, 3:8] = vol_arr[4, 2:9, 3:8] > 128
    seg, _ = _labelled_volume(ctx, vol, "seg3d", lab)
    case = curate.make_case(ctx, seg)
    assert case.kind == "3d"
    res = curate.export_dataset([case], ["lesion"], tmp_path / "d", orientation=orientation, preview=False)
    geom = curate.volume_plane_geometry(vol, orientation)
    n = geom.dims[geom.axis]
    expected = [k for k in range(n) if geom.frame_from_array(lab, k).any()]
    rows = _rows(tmp_path / "d")
    assert [int(r["frame"]) for r in rows] == expected and {r["split"] for r in rows} == {"train"}
    for r in rows:
        k = int(r["frame"])
        img = _read(tmp_path / "d" / "images" / f"{r['id']}.png")
        mask = _read(tmp_path / "d" / "masks" / f"{r['id']}.png")
        assert np.array_equal(img, geom.frame_from_array(vol_arr, k))
        assert np.array_equal(mask > 0, geom.frame_from_array(lab, k) > 0)
        # voxel alignment independent of the geometry helper: the mask is "image > 128" where labelled
        assert np.all(img[mask > 0] > 128)
    # frames are cut along the volume's own planes, oriented like the view rotated to the volume plane
    s2r = np.eye(4)
    dirs = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    preset = curate.ORIENTATIONS[orientation]
    for c in range(3):
        a = int(np.argmax(np.abs(dirs.T @ preset[:, c])))
        s2r[:3, c] = np.sign(dirs[:, a] @ preset[:, c]) * dirs[:, a]
    s2r[:3, 3] = m[:3, 3]  # through voxel (0, 0, 0)
    view = slice_geometry(vol, s2r)
    assert (view.axis, view.col_axis, view.row_axis, view.col_flip, view.row_flip) == (
        geom.axis, geom.col_axis, geom.row_axis, geom.col_flip, geom.row_flip)
    assert res.summary[-1]["frames"] == len(expected)


def test_export_3d_16bit_windowed_consistently(ctx, tmp_path):
    arr = (np.arange(3 * 8 * 9, dtype=np.int16).reshape(3, 8, 9) * 7 - 300).astype(np.int16)
    vol = make_volume(ctx, arr, np.diag([0.5, 0.5, 1.0, 1.0]), name="ct")
    lab = np.zeros(arr.shape, np.uint8)
    lab[0, 1:4, 1:4] = 1
    lab[2, 5:7, 5:8] = 1
    seg, _ = _labelled_volume(ctx, vol, "ctseg", lab)
    curate.export_dataset([curate.make_case(ctx, seg)], ["lesion"], tmp_path / "d", preview=False)
    a = _read(tmp_path / "d" / "images" / "ct_0000.png")
    b = _read(tmp_path / "d" / "images" / "ct_0002.png")
    assert a.dtype == np.uint8 and a.mean() < b.mean()  # one window for the whole volume


def test_export_cine_with_segmentation_sequence(ctx, tmp_path):
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (12, 16), dtype=np.uint8) for _ in range(5)]
    cine = create_cine(ctx, frames, spacing=(0.2, 0.3), name="clip A")
    geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
    seg, sid = ensure_segmentation_sequence(ctx, cine, segment_name="vessel")
    other = get_or_add_segment_in_all(cine.browser.GetSequenceNode(seg), seg, "plaque")
    editor = SegmentEditor(ctx)
    editor.configure(seg, cine.proxy, sid)
    masks = [None] * 5
    for i in (1, 3):
        masks[i] = frames[i] > 100
    write_cine_masks(ctx, editor, cine, seg, sid, geom, masks)
    cine.select(3)
    plaque = np.zeros((12, 16), bool)
    plaque[0:2, 0:3] = True
    write_masks(editor, seg, other, geom, {0: plaque})
    cine.select(0)
    case = curate.make_case(ctx, seg)
    assert case.kind == "cine" and case.name == "clip A"
    res = curate.export_dataset([case], {"vessel": 1, "plaque": 2}, tmp_path / "c", preview=True)
    rows = _rows(tmp_path / "c")
    assert [(r["id"], r["clip"], r["frame"]) for r in rows] == [
        ("clip_A_0001", "clip_A", "1"), ("clip_A_0003", "clip_A", "3")]
    for i in (1, 3):
        img = _read(tmp_path / "c" / "images" / f"clip_A_{i:04d}.png")
        mask = _read(tmp_path / "c" / "masks" / f"clip_A_{i:04d}.png")
        assert np.array_equal(img, frames[i])
        expect = (frames[i] > 100).astype(np.uint8)
        if i == 3:
            expect[plaque] = 2  # later target wins where segments overlap
        assert np.array_equal(mask, expect)
    assert res.labels == {1: "vessel", 2: "plaque"}
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["labels"] == {"1": "vessel", "2": "plaque"}
    assert res.summary[0]["plaque"] == 1 and res.summary[0]["frames"] == 2


def test_split_by_case_seeded(ctx, tmp_path):
    names = [f"case{i}" for i in range(7)]
    a = curate.split_cases(names, 0.3, seed=5)
    assert a == curate.split_cases(list(reversed(names)), 0.3, seed=5)
    assert sum(v == "val" for v in a.values()) == 2
    assert curate.split_cases(["x", "y"], 0.0, 0) != {"x": "train", "y": "train"}
    assert curate.split_cases(["only"], 0.5, 0) == {"only": "train"}
    assert list(curate.split_cases(["p", "q"], 1.0, 0).values()).count("train") == 1
    # several cines: a clip never straddles splits
    rng = np.random.default_rng(3)
    cases = []
    for c in range(4):
        frames = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)]
        cine = create_cine(ctx, frames, name=f"clip{c}")
        geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
        seg, sid = ensure_segmentation_sequence(ctx, cine, segment_name="t")
        editor = SegmentEditor(ctx)
        editor.configure(seg, cine.proxy, sid)
        write_cine_masks(ctx, editor, cine, seg, sid, geom, [f > 128 for f in frames])
        cases.append(curate.make_case(ctx, seg))
    curate.export_dataset(cases, ["t"], tmp_path / "s", val_fraction=0.5, seed=1, preview=False)
    rows = _rows(tmp_path / "s")
    per_clip = {}
    for r in rows:
        per_clip.setdefault(r["clip"], set()).add(r["split"])
    assert len(rows) == 12 and all(len(s) == 1 for s in per_clip.values())
    assert sorted(s.pop() for s in per_clip.values()) == ["train", "train", "val", "val"]


def test_export_errors_name_the_problem(ctx, tmp_path):
    vol = make_volume(ctx, np.zeros((1, 5, 5), np.uint8), name="blank")
    seg = create_segmentation_for(ctx, vol, "empty seg")
    get_or_add_segment(seg, "lesion")
    with pytest.raises(ValueError, match="any labelled voxel"):
        curate.export_dataset([curate.make_case(ctx, seg)], ["lesion"], tmp_path / "e")
    with pytest.raises(ValueError, match="no target segment"):
        curate.export_dataset([curate.make_case(ctx, seg)], [], tmp_path / "e")
    import slicer

    lone = slicer.vtkMRMLSegmentationNode()
    lone.SetName("lone")
    ctx.scene.AddNode(lone)
    with pytest.raises(ValueError, match="lone.*no source volume"):
        curate.make_case(ctx, lone)


def test_cases_from_folder_of_seg_nrrd(ctx, tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(4)
    folder = tmp_path / "in"
    folder.mkdir()
    arr = rng.integers(0, 256, (4, 10, 12), dtype=np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.4, 0.6, 1.5))
    img.SetOrigin((3.0, 4.0, 5.0))
    sitk.WriteImage(img, str(folder / "patient1.nrrd"))
    png = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(png).save(folder / "us2.png")
    # segmentations made on those images, saved as Slicer does (.seg.nrrd through its storage node)
    v1 = curate.load_volume_file(ctx, folder / "patient1.nrrd")
    lab = np.zeros_like(arr)
    lab[2] = arr[2] > 200
    s1, _ = _labelled_volume(ctx, v1, "s1", lab)
    save_segmentation(s1, folder / "patient1.seg.nrrd")
    v2 = curate.load_volume_file(ctx, folder / "us2.png")
    assert v2.IsA("vtkMRMLVectorVolumeNode")
    lab2 = np.zeros((1, 9, 7), np.uint8)
    lab2[0, 2:5, 1:6] = 1
    s2, _ = _labelled_volume(ctx, v2, "s2", lab2)
    save_segmentation(s2, folder / "us2_seg.seg.nrrd")
    ctx.scene.Clear(0)
    assert [(i.name, s.name) for i, s in curate.find_pairs(folder)] == [
        ("patient1.nrrd", "patient1.seg.nrrd"), ("us2.png", "us2_seg.seg.nrrd")]
    cases = curate.cases_from_folder(ctx, folder)
    assert [(c.name, c.kind) for c in cases] == [("patient1", "3d"), ("us2", "rgb")]
    curate.export_dataset(cases, ["lesion"], tmp_path / "out", preview=False)
    rows = _rows(tmp_path / "out")
    assert [r["id"] for r in rows] == ["patient1_0002", "us2_0000"]
    img = _read(tmp_path / "out" / "images" / "patient1_0002.png")
    mask = _read(tmp_path / "out" / "masks" / "patient1_0002.png")
    # ITK identity direction -> Slicer LPS: the slice is shown as stored
    assert np.array_equal(img, arr[2]) and np.array_equal(mask > 0, arr[2] > 200)
    assert np.array_equal(_read(tmp_path / "out" / "images" / "us2_0000.png"), png)
    assert np.array_equal(_read(tmp_path / "out" / "masks" / "us2_0000.png"), lab2[0] * 255)


def test_scratch_context_inside_slicer_adds_no_converter_rules():
    """Row 13 of the Slicer API audit: every Segmentations logic appends its converter rules to the
    process-wide factory; the Train module's scratch scene must not add them again."""
    import slicer
    from UniUltraSegmentLib.context import create_context

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    before = len(factory.GetConverterRules())
    ctx = create_context(register_converters=False)
    assert len(factory.GetConverterRules()) == before and ctx.segmentations_logic is None
    ctx.scene.Clear(1)
