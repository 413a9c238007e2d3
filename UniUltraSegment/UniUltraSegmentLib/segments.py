"""Segments: 2D masks into the right slice of a segment, through the Segment Editor's write route.

`write_masks` is the only function that writes into a user's segment.  It builds the modifier
labelmap (in the segmentation's own geometry) and hands it to a *writer*, which is either the
effect's `scriptedEffect.modifySegmentByLabelmap` or, for scripts and tests, `SegmentEditor`
below; both end in `vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap`, so the editor node's
masking settings (editable area, editable intensity range, overwrite other segments) and its
undo history apply the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import InputError, require_image, require_node
from .geometry import SliceGeometry, ijk_to_ras_of, numpy_to_vtk_matrix

MASK_MODES = {
    "everywhere": "EditAllowedEverywhere",
    "inside_all": "EditAllowedInsideAllSegments",
    "inside_visible": "EditAllowedInsideVisibleSegments",
    "outside_all": "EditAllowedOutsideAllSegments",
    "outside_visible": "EditAllowedOutsideVisibleSegments",
    "inside_segment": "EditAllowedInsideSingleSegment",
}
OVERWRITE_MODES = {"all": "OverwriteAllSegments", "visible": "OverwriteVisibleSegments", "none": "OverwriteNone"}


_numpy_matrix_to_vtk = numpy_to_vtk_matrix  # the old private name (still imported by other front ends)


def _vtk_matrix_of(oriented_image) -> np.ndarray:
    import vtk

    from .geometry import vtk_matrix_to_numpy

    m = vtk.vtkMatrix4x4()
    oriented_image.GetImageToWorldMatrix(m)
    return vtk_matrix_to_numpy(m)


def oriented_image_from_array(arr: np.ndarray, ijk_to_ras: np.ndarray, extent_origin=(0, 0, 0)):
    """A vtkOrientedImageData (unsigned char) holding `arr` (K, J, I) at IJK offset `extent_origin`."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    nk, nj, ni = arr.shape
    i0, j0, k0 = extent_origin
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = arr.ravel()
    image.SetImageToWorldMatrix(numpy_to_vtk_matrix(ijk_to_ras))
    return image


def labelmap_from_masks(geometry: SliceGeometry, masks: Mapping[int, np.ndarray]):
    """One labelmap covering the slices in `masks` ({slice index: (H, W) mask in frame pixels}).

    Slices between the first and last key that have no mask stay 0 (with "add" they change nothing).
    """
    if not masks:
        raise ValueError("no mask to write")
    idx = sorted(masks)
    lo, hi = idx[0], idx[-1]
    dims = list(geometry.dims)
    ext_dims = dims.copy()
    ext_dims[geometry.axis] = hi - lo + 1
    arr = np.zeros((ext_dims[2], ext_dims[1], ext_dims[0]), np.uint8)
    for k in idx:
        plane = geometry.array_from_frame(np.asarray(masks[k]) > 0).astype(np.uint8)
        sl: list = [slice(None)] * 3
        sl[2 - geometry.axis] = k - lo
        arr[tuple(sl)] = plane
    origin = [0, 0, 0]
    origin[geometry.axis] = lo
    return oriented_image_from_array(arr, geometry.ijk_to_ras, tuple(origin))


def segment_array(seg_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a 0/1 uint8 array (K, J, I) on the voxel grid of `volume_node`."""
    import slicer
    from vtk.util import numpy_support

    require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation")
    require_image(volume_node, "reference volume")
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"segment '{segment_id}' is not in segmentation '{seg_node.GetName()}'")
    dims = volume_node.GetImageData().GetDimensions()
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg_node, segment_id, labelmap)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetImageToWorldMatrix(numpy_to_vtk_matrix(ijk_to_ras_of(volume_node)))
    if labelmap.GetPointData().GetScalars() is None or labelmap.IsEmpty():
        return np.zeros((dims[2], dims[1], dims[0]), np.uint8)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, True
    )
    arr = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    # shared labelmap layers hold several segments: keep this segment's label only
    label = segment.GetLabelValue()
    return (arr == label).astype(np.uint8)


def segment_frame(seg_node, segment_id: str, volume_node, geometry: SliceGeometry, index: int | None = None):
    """The segment on one slice, as a (H, W) bool mask in frame pixels."""
    return geometry.frame_from_array(segment_array(seg_node, segment_id, volume_node), index) > 0


def get_or_add_segment(seg_node, name: str, color=None) -> str:
    """ID of the segment named `name`, adding an empty one if there is none (no stray duplicates)."""
    require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation")
    if not str(name or "").strip():
        raise InputError("segment name is empty: give the segment a name")
    segmentation = seg_node.GetSegmentation()
    sid = segmentation.GetSegmentIdBySegmentName(name)
    if sid:
        return sid
    if color is None:
        return segmentation.AddEmptySegment("", name)
    return segmentation.AddEmptySegment("", name, list(color))


def create_segmentation_for(ctx, volume_node, name: str | None = None):
    """A segmentation node with its display nodes, geometry taken from `volume_node`."""
    import slicer

    require_image(volume_node, "reference volume of the new segmentation")
    seg = slicer.vtkMRMLSegmentationNode()
    seg.SetName(name or f"{volume_node.GetName()} segmentation")
    ctx.scene.AddNode(seg)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return seg


class SegmentEditor:
    """The Segment Editor's write route without the Segment Editor widget: scripts and tests.

    This is one of the two adapters of the single write path (`write_masks`).  Both end in
    `vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap`:

    * here, called directly on a logic that shares the editor node (masking settings);
    * in the effect (`SegmentEditorUniUltraLib.SegmentEditorEffect.EffectWriter`), through
      `scriptedEffect.modifySegmentByLabelmap(node, segmentID, labelmap, mode)`, which in
      Slicer >= 5.10 is `d->Logic->ModifySegmentByLabelmap(node, id, labelmap, mode, extent,
      perSegment(), bypassMasking)` on the editor widget's own logic
      (Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorAbstractEffect.cxx).

    Everything else (which pixels, which slice or frame, geometry, add/replace/remove) is
    decided once, in `write_masks`, for both.
    """

    per_segment = True  # the UniUltra effect is per-segment (scriptedEffect.perSegment = True)

    def __init__(self, ctx, editor_node=None):
        import slicer

        self.ctx = ctx
        if editor_node is None:
            editor_node = slicer.vtkMRMLSegmentEditorNode()
            editor_node.SetSingletonTag("UniUltraSegmentEditor")
            editor_node = ctx.scene.AddNode(editor_node)
        self.node = editor_node
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(ctx.scene)
        self.logic.SetMRMLApplicationLogic(ctx.app_logic)
        self.logic.SetSegmentEditorNode(editor_node)

    def configure(self, seg_node, source_volume, segment_id: str | None = None) -> None:
        self.node.SetAndObserveSegmentationNode(seg_node)
        self.node.SetAndObserveSourceVolumeNode(source_volume)
        if segment_id:
            self.node.SetSelectedSegmentID(segment_id)

    def set_masking(
        self,
        editable_area: str = "everywhere",
        mask_segment_id: str | None = None,
        intensity_range: tuple[float, float] | None = None,
        overwrite: str = "all",
    ) -> None:
        """Masking as in the Segment Editor's "Masking" section (names in MASK_MODES/OVERWRITE_MODES)."""
        import slicer

        if editable_area not in MASK_MODES:
            raise ValueError(f"editable area '{editable_area}' is not one of {sorted(MASK_MODES)}")
        if overwrite not in OVERWRITE_MODES:
            raise ValueError(f"overwrite '{overwrite}' is not one of {sorted(OVERWRITE_MODES)}")
        if editable_area == "inside_segment" and not mask_segment_id:
            raise ValueError("editable area 'inside_segment' needs mask_segment_id")
        self.node.SetMaskMode(getattr(slicer.vtkMRMLSegmentationNode, MASK_MODES[editable_area]))
        self.node.SetMaskSegmentID(mask_segment_id or "")
        self.node.SetSourceVolumeIntensityMask(intensity_range is not None)
        if intensity_range is not None:
            self.node.SetSourceVolumeIntensityMaskRange(float(intensity_range[0]), float(intensity_range[1]))
        self.node.SetOverwriteMode(getattr(slicer.vtkMRMLSegmentEditorNode, OVERWRITE_MODES[overwrite]))

    # --- the writer protocol (the effect's EffectWriter has the same three methods) ---

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def modify(self, seg_node, segment_id: str, labelmap, mode: str) -> None:
        """`ModifySegmentByLabelmap(node, id, labelmap, mode, isPerSegment, bypassMasking=False)`."""
        modes = {"add": self.logic.ModificationModeAdd, "remove": self.logic.ModificationModeRemove}
        self.logic.ModifySegmentByLabelmap(seg_node, segment_id, labelmap, modes[mode], self.per_segment, False)

    # --- undo as the editor widget offers it (Ctrl+Z / z) ---

    def undo(self) -> None:
        if not self.logic.CanUndo():
            raise ValueError("nothing to undo")
        self.logic.Undo()

    def redo(self) -> None:
        if not self.logic.CanRedo():
            raise ValueError("nothing to redo")
        self.logic.Redo()


WRITE_MODES = ("add", "replace", "remove")


def world_to_node_matrix(node) -> np.ndarray:
    """(4, 4) world -> node-local matrix (identity without a parent transform); a ValueError for
    a non-linear transform, which UniUltra's pixel-exact geometry cannot follow."""
    from .geometry import parent_to_world

    return np.linalg.inv(parent_to_world(node))


def reference_geometry(seg_node):
    """The segmentation's labelmap geometry (the editor's reference geometry image), or None.

    The segment editor builds its modifier labelmap and aligned source volume in this geometry
    (vtkSlicerSegmentEditorLogic::ResetModifierLabelmapToDefault); with "editable intensity
    range" on, ModifySegmentByLabelmap silently drops a modifier in any other geometry."""
    import slicer

    converter = slicer.vtkSegmentationConverter
    text = seg_node.GetSegmentation().GetConversionParameter(converter.GetReferenceImageGeometryParameterName())
    if not text:
        return None
    image = slicer.vtkOrientedImageData()
    converter.DeserializeImageGeometry(text, image, False)
    return image


def align_to_segmentation(labelmap, seg_node):
    """`labelmap` (in world coordinates) moved into the segmentation's own coordinates and, when
    its grid differs, resampled (nearest neighbour) onto the segmentation's reference geometry."""
    import slicer

    to_node = world_to_node_matrix(seg_node)
    if not np.allclose(to_node, np.eye(4)):
        labelmap.SetImageToWorldMatrix(numpy_to_vtk_matrix(to_node @ _vtk_matrix_of(labelmap)))
    ref = reference_geometry(seg_node)
    if ref is None or slicer.vtkOrientedImageDataResample.DoGeometriesMatch(labelmap, ref):
        return labelmap
    # resample into the reference grid, on the part of it the labelmap covers
    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, ref, out, False, False)
    return out


def write_masks(writer, seg_node, segment_id: str, geometry: SliceGeometry, masks, mode: str = "add",
                save_undo: bool = True) -> list[int]:
    """THE write path: (H, W) frame masks into slices of a segment, through `writer`.

    masks: {slice index: mask} or a list with None gaps.  mode: "add" (union), "replace" (the
    masked slices become exactly the mask; other slices untouched), "remove".  One undo state for
    the whole write (when save_undo).  Masking (editable area, intensity range, overwrite) is the
    Segment Editor's own.  Returns the slice indices written.
    """
    if mode not in WRITE_MODES:
        raise ValueError(f"mode '{mode}' is not one of {', '.join(WRITE_MODES)}")
    if not isinstance(masks, Mapping):
        masks = {i: m for i, m in enumerate(masks) if m is not None}
    masks = {int(k): np.asarray(v) > 0 for k, v in masks.items() if v is not None}
    if mode == "add":
        masks = {k: v for k, v in masks.items() if v.any()}
    if not masks:
        return []
    if save_undo:
        writer.save_state_for_undo()
    if mode == "replace":
        # clear the covered slices (ModificationModeSet would clear the whole segment), then add
        ones = {k: np.ones(geometry.shape, bool) for k in masks}
        writer.modify(seg_node, segment_id, align_to_segmentation(labelmap_from_masks(geometry, ones), seg_node), "remove")
        covered = sorted(ones)
        masks = {k: v for k, v in masks.items() if v.any()}
        if masks:
            writer.modify(seg_node, segment_id, align_to_segmentation(labelmap_from_masks(geometry, masks), seg_node), "add")
        return covered
    writer.modify(seg_node, segment_id, align_to_segmentation(labelmap_from_masks(geometry, masks), seg_node), mode)
    return sorted(masks)
