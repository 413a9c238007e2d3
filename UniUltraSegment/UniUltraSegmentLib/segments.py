"""Segments: 2D masks into the right slice of a segment, through the Segment Editor logic.

Writes go through `vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`, the same code the
Segment Editor uses, so the editor node's masking settings (editable area, editable intensity
range, overwrite other segments) are respected, and an undo state is saved before each write.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .geometry import SliceGeometry, ijk_to_ras_of

MASK_MODES = {
    "everywhere": "EditAllowedEverywhere",
    "inside_all": "EditAllowedInsideAllSegments",
    "inside_visible": "EditAllowedInsideVisibleSegments",
    "outside_all": "EditAllowedOutsideAllSegments",
    "outside_visible": "EditAllowedOutsideVisibleSegments",
    "inside_segment": "EditAllowedInsideSingleSegment",
}
OVERWRITE_MODES = {"all": "OverwriteAllSegments", "visible": "OverwriteVisibleSegments", "none": "OverwriteNone"}


def _numpy_matrix_to_vtk(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


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
    image.SetImageToWorldMatrix(_numpy_matrix_to_vtk(ijk_to_ras))
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


def labelmap_from_frame_mask(geometry: SliceGeometry, mask: np.ndarray, index: int | None = None):
    """A one-slice labelmap for a (H, W) mask on slice `index` (default: the slice the view shows)."""
    return labelmap_from_masks(geometry, {geometry.index if index is None else index: mask})


def segment_array(seg_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a 0/1 uint8 array (K, J, I) on the voxel grid of `volume_node`."""
    import slicer
    from vtk.util import numpy_support

    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise ValueError(f"segment '{segment_id}' is not in segmentation '{seg_node.GetName()}'")
    dims = volume_node.GetImageData().GetDimensions()
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg_node, segment_id, labelmap)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetImageToWorldMatrix(_numpy_matrix_to_vtk(ijk_to_ras_of(volume_node)))
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

    seg = slicer.vtkMRMLSegmentationNode()
    seg.SetName(name or f"{volume_node.GetName()} segmentation")
    ctx.scene.AddNode(seg)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return seg


class SegmentEditor:
    """The Segment Editor logic and parameter node, without the Segment Editor widget.

    Inside Slicer the effect uses the widget's own logic (scriptedEffect.modifySegmentByLabelmap);
    this class gives scripts and tests the same behaviour: masking, overwrite, undo/redo.
    """

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

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def undo(self) -> None:
        if not self.logic.CanUndo():
            raise ValueError("nothing to undo")
        self.logic.Undo()

    def redo(self) -> None:
        if not self.logic.CanRedo():
            raise ValueError("nothing to redo")
        self.logic.Redo()

    def apply_labelmap(
        self, seg_node, segment_id: str, labelmap, mode: str = "add", save_undo: bool = True
    ) -> None:
        """Write a labelmap into a segment: "add" (union), "set" (replace inside the labelmap's
        extent only, e.g. one slice), "remove".  Masking settings apply; undo state first."""
        logic = self.logic
        if self.node.GetSegmentationNode() is not seg_node:
            self.node.SetAndObserveSegmentationNode(seg_node)
        if save_undo:
            logic.SaveStateForUndo()
        if mode == "add":
            logic.ModifySegmentByLabelmap(seg_node, segment_id, labelmap, logic.ModificationModeAdd, False, False)
        elif mode == "remove":
            logic.ModifySegmentByLabelmap(seg_node, segment_id, labelmap, logic.ModificationModeRemove, False, False)
        elif mode == "set":
            # ModificationModeSet would replace the whole segment (its extent argument did not
            # restrict it in our tests), so: clear the labelmap's extent, then add the mask.
            extent = labelmap.GetExtent()
            ones = oriented_image_from_array(
                np.ones((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1), np.uint8),
                _vtk_matrix_of(labelmap),
                (extent[0], extent[2], extent[4]),
            )
            logic.ModifySegmentByLabelmap(seg_node, segment_id, ones, logic.ModificationModeRemove, False, False)
            logic.ModifySegmentByLabelmap(seg_node, segment_id, labelmap, logic.ModificationModeAdd, False, False)
        else:
            raise ValueError(f"mode '{mode}' is not one of add, set, remove")

    def write_frame_mask(
        self,
        seg_node,
        segment_id: str,
        geometry: SliceGeometry,
        mask: np.ndarray,
        index: int | None = None,
        mode: str = "add",
        save_undo: bool = True,
    ) -> None:
        """Write a (H, W) frame mask into slice `index` (default: the shown slice) of a segment."""
        if mask is None or not np.any(mask) and mode == "add":
            return
        self.apply_labelmap(seg_node, segment_id, labelmap_from_frame_mask(geometry, mask, index), mode, save_undo)

    def write_slice_masks(
        self,
        seg_node,
        segment_id: str,
        geometry: SliceGeometry,
        masks: Mapping[int, np.ndarray] | list,
        mode: str = "add",
        save_undo: bool = True,
    ) -> int:
        """Write masks for several slices ({index: mask} or a list with None gaps) in one edit,
        i.e. one undo state.  Returns the number of slices written."""
        if not isinstance(masks, Mapping):
            masks = {i: m for i, m in enumerate(masks) if m is not None}
        masks = {int(k): v for k, v in masks.items() if v is not None}
        if not masks:
            return 0
        if mode == "set":
            # replace only on the slices that received a mask, leave the others untouched
            if save_undo:
                self.logic.SaveStateForUndo()
            for k, m in sorted(masks.items()):
                self.apply_labelmap(seg_node, segment_id, labelmap_from_frame_mask(geometry, m, k), "set", False)
            return len(masks)
        self.apply_labelmap(seg_node, segment_id, labelmap_from_masks(geometry, masks), mode, save_undo)
        return len(masks)
