"""Bad input to the Slicer logic's public functions (UniUltraSegmentLib, Qt-free) on real MRML
nodes (slicer-core): each raises the one exception type a dialog shows, ``InputError`` (the
engine's, a ValueError), with one line that names the input; nothing is written to disk.
Anything else escaping (AttributeError on a None node, a VTK TypeError, NaN to int...) is a bug."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import AXIAL, make_volume, mrml_context, slice_to_ras
from UniUltraSegmentLib import geometry as G
from UniUltraSegmentLib import logic as L
from UniUltraSegmentLib import segments as S
from UniUltraSegmentLib import sequences as Q
from UniUltraSegmentLib.errors import InputError

from uniultra.errors import InputError as EngineInputError

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)


@pytest.fixture
def scene(ctx, tmp_path):
    """Nodes every case picks from: a volume, an empty volume, a segmentation, a cine with and
    without per-frame masks, files that are not what a reader wants."""
    import slicer

    vol = make_volume(ctx, np.random.default_rng(0).random((1, 32, 40)).astype(np.float32))
    empty = slicer.vtkMRMLScalarVolumeNode()
    empty.SetName("blank")
    ctx.scene.AddNode(empty)
    seg = S.create_segmentation_for(ctx, vol)
    S.get_or_add_segment(seg, "a")
    cine = Q.create_cine(ctx, [np.zeros((8, 9), np.uint8)] * 3, name="loop")
    cine2 = Q.create_cine(ctx, [np.zeros((8, 9), np.uint8)] * 2, name="loop2")
    fseg, fsid = Q.ensure_segmentation_sequence(ctx, cine2, segment_name="vessel")
    (tmp_path / "text.txt").write_text("not an image")
    (tmp_path / "folder").mkdir()
    geom = G.slice_geometry(vol, slice_to_ras(AXIAL, 0.0))
    cgeom = G.slice_geometry(cine2.proxy, slice_to_ras(AXIAL, 0.0))
    return dict(ctx=ctx, vol=vol, empty=empty, seg=seg, cine=cine, cine2=cine2, fseg=fseg, fsid=fsid, geom=geom,
                cgeom=cgeom, t=tmp_path, s2r=slice_to_ras(AXIAL, 0.0))


# (id, call(scene) that must raise InputError, text the message must hold)
CASES = [
    # boxes
    ("box-nan", lambda s: L.validate_box((np.nan, 0, 5, 5), (10, 10)), "finite"),
    ("box-inf", lambda s: L.validate_box((0, 0, np.inf, 5), (10, 10)), "finite"),
    ("box-three", lambda s: L.validate_box((0, 5, 5), (10, 10)), "4 numbers"),
    ("box-text", lambda s: L.validate_box(("a", 0, 5, 5), (10, 10)), "4 numbers"),
    ("box-none", lambda s: L.validate_box(None, (10, 10)), "4 numbers"),
    ("box-empty", lambda s: L.validate_box((5, 5, 1, 1), (10, 10)), "empty"),
    ("box-outside", lambda s: L.validate_box((50, 50, 60, 60), (10, 10)), "outside"),
    # wrong or missing nodes
    ("view-no-volume", lambda s: L.ViewTarget.from_view(s["ctx"], None, s["s2r"]), "source volume"),
    ("view-segmentation", lambda s: L.ViewTarget.from_view(s["ctx"], s["seg"], s["s2r"]), "not an image volume"),
    ("view-empty-volume", lambda s: L.ViewTarget.from_view(s["ctx"], s["empty"], s["s2r"]), "no image data"),
    ("geometry-none", lambda s: G.slice_geometry(None, s["s2r"]), "no volume"),
    ("geometry-nan-matrix", lambda s: G.slice_geometry(s["vol"], np.full((4, 4), np.nan)), "SliceToRAS"),
    ("geometry-singular", lambda s: G.slice_geometry(s["vol"], np.zeros((4, 4))), "SliceToRAS"),
    ("geometry-empty", lambda s: G.slice_geometry(s["empty"], s["s2r"]), "no image data"),
    ("array-none", lambda s: G.volume_array(None), "no volume"),
    ("array-segmentation", lambda s: G.volume_array(s["seg"]), "vtkMRMLSegmentationNode"),
    ("array-empty", lambda s: G.volume_array(s["empty"]), "blank"),
    ("voxels-1d", lambda s: G.volume_node(np.zeros(5)), "(5,)"),
    ("voxels-empty", lambda s: G.volume_node(np.zeros((0, 4, 4))), "non-empty"),
    ("slice-outside", lambda s: G.extract_frame(s["vol"], s["geom"], 99), "slice 99"),
    ("segmentation-for-none", lambda s: S.create_segmentation_for(s["ctx"], None), "reference volume"),
    ("segmentation-for-seg", lambda s: S.create_segmentation_for(s["ctx"], s["seg"]), "not an image volume"),
    ("segment-in-none", lambda s: S.get_or_add_segment(None, "x"), "no segmentation"),
    ("segment-in-volume", lambda s: S.get_or_add_segment(s["vol"], "x"), "not a segmentation"),
    ("segment-no-name", lambda s: S.get_or_add_segment(s["seg"], " "), "name"),
    ("segment-unknown", lambda s: S.segment_array(s["seg"], "nope", s["vol"]), "'nope'"),
    ("segment-empty-volume", lambda s: S.segment_array(s["seg"], "a", s["empty"]), "no image data"),
    # cines
    ("cine-no-frames", lambda s: Q.create_cine(s["ctx"], []), "no frames"),
    ("cine-mixed-sizes", lambda s: Q.create_cine(s["ctx"], [np.zeros((8, 9)), np.zeros((5, 5))]), "sizes"),
    ("frame-1d", lambda s: Q.volume_from_frame(np.zeros(5)), "(5,)"),
    ("frame-4-channels-wrong", lambda s: Q.volume_from_frame(np.zeros((4, 4, 7))), "(4, 4, 7)"),
    ("dicom-missing", lambda s: Q.load_dicom_cine(s["ctx"], s["t"] / "none.dcm"), "none.dcm"),
    ("dicom-folder", lambda s: Q.load_dicom_cine(s["ctx"], s["t"] / "folder"), "folder"),
    ("dicom-text", lambda s: Q.load_dicom_cine(s["ctx"], s["t"] / "text.txt"), "text.txt"),
    ("sequence-missing", lambda s: Q.load_sequence_file(s["ctx"], s["t"] / "none.seq.nrrd"), "none.seq.nrrd"),
    ("sequence-text", lambda s: Q.load_sequence_file(s["ctx"], s["t"] / "text.txt"), "text.txt"),
    ("segmentation-missing", lambda s: Q.load_segmentation(s["ctx"], s["t"] / "none.seg.nrrd"), "none.seg.nrrd"),
    ("segmentation-text", lambda s: Q.load_segmentation(s["ctx"], s["t"] / "text.txt"), "text.txt"),
    ("per-frame-no-cine", lambda s: Q.ensure_segmentation_sequence(s["ctx"], None), "no cine"),
    ("per-frame-volume-as-seg", lambda s: Q.ensure_segmentation_sequence(s["ctx"], s["cine"], s["vol"]),
     "not a segmentation"),
    # saving and exporting
    ("save-sequence-none", lambda s: Q.save_sequence_file(s["ctx"], None, s["t"] / "x.seq.nrrd"), "no sequence"),
    ("save-sequence-under-file", lambda s: Q.save_sequence_file(s["ctx"], s["cine"].sequence,
                                                                s["t"] / "text.txt" / "x.seq.nrrd"), "text.txt"),
    ("save-segmentation-none", lambda s: Q.save_segmentation(None, s["t"] / "x.seg.nrrd"), "no segmentation"),
    ("save-segmentation-folder", lambda s: Q.save_segmentation(s["seg"], s["t"] / "folder"), "is a folder"),
    ("export-png-not-per-frame", lambda s: Q.export_frame_masks_png(s["cine"], s["seg"], "a", s["cgeom"], s["t"] / "o"),
     "no per-frame masks"),
    ("export-png-no-cine", lambda s: Q.export_frame_masks_png(None, s["fseg"], s["fsid"], s["cgeom"], s["t"] / "o"),
     "no cine"),
    ("export-png-unknown-segment", lambda s: Q.export_frame_masks_png(s["cine2"], s["fseg"], "nope", s["cgeom"],
                                                                      s["t"] / "o"), "'nope'"),
    ("export-png-folder-is-file", lambda s: Q.export_frame_masks_png(s["cine2"], s["fseg"], s["fsid"], s["cgeom"],
                                                                     s["t"] / "text.txt"), "is a file"),
    ("export-png-no-folder", lambda s: Q.export_frame_masks_png(s["cine2"], s["fseg"], s["fsid"], s["cgeom"], ""),
     "export folder"),
    ("export-seg-not-per-frame", lambda s: Q.export_frame_masks_seg_nrrd(s["cine"], s["seg"], s["t"] / "o"),
     "no per-frame masks"),
    ("export-seg-folder-is-file", lambda s: Q.export_frame_masks_seg_nrrd(s["cine2"], s["fseg"], s["t"] / "text.txt"),
     "is a file"),
]


def _files(root):
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("call, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_input_error(scene, call, message):
    before = _files(scene["t"])
    with pytest.raises(InputError) as info:
        call(scene)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text and len(text) < 400  # one line a dialog shows as it is
    assert _files(scene["t"]) == before  # nothing written


def test_one_exception_type_for_logic_and_engine():
    """A dialog catches one type: the logic's InputError is the engine's (and a ValueError)."""
    assert InputError is EngineInputError and issubclass(InputError, ValueError)


def test_exports_still_work(scene):
    """The checks refuse only bad input: the same cine exports PNGs and .seg.nrrd files."""
    out = scene["t"] / "out"
    pngs = Q.export_frame_masks_png(scene["cine2"], scene["fseg"], scene["fsid"], scene["cgeom"], out)
    segs = Q.export_frame_masks_seg_nrrd(scene["cine2"], scene["fseg"], out)
    assert [p.name for p in pngs] == ["frame_0000.png", "frame_0001.png"]
    assert [p.name for p in segs] == ["frame_0000.seg.nrrd", "frame_0001.seg.nrrd"]
    assert _files(out) == {p.name for p in pngs + segs}  # no staging leftovers
    back = Q.load_segmentation(scene["ctx"], segs[1])
    assert back.GetSegmentation().GetSegmentIdBySegmentName("vessel")
