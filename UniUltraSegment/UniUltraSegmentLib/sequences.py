"""Cine ultrasound as Slicer sequences: frames, per-frame segmentations, loading, export.

A cine loop in Slicer is a sequence of single-slice volumes shown through the proxy volume of
a sequence browser.  Per-frame masks live in a segmentation sequence synchronised in the same
browser, so scrubbing the browser shows each frame's mask in the proxy segmentation; with
"save changes" on, edits of the proxy segmentation are stored back into the current frame.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uniultra.checks import readable_file
from uniultra.data.dicom import DicomCine, read_dicom_cine  # noqa: F401  (the engine's reader)
from uniultra.fileio import atomic_write

from .errors import InputError, output_folder, require_node
from .geometry import SliceGeometry, volume_array, volume_node
from .segments import get_or_add_segment, segment_frame, write_masks


def volume_from_frame(frame: np.ndarray, spacing=(1.0, 1.0), name: str = "frame"):
    """A single-slice volume node (not in a scene) from a (H, W) or (H, W, 3) frame.

    Geometry as Slicer gives a loaded 2D image: LPS axes, so the image is upright in the
    Red (axial) view.  RGB frames become vector volumes.
    """
    frame = np.asarray(frame)
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (3, 4)) or 0 in frame.shape:
        raise InputError(f"frame of shape {frame.shape}: give a (H, W) grey or (H, W, 3) colour image")
    return volume_node(frame[None], np.diag([-float(spacing[0]), -float(spacing[1]), 1.0, 1.0]), name,
                       rgb=frame.ndim == 3)


@dataclass
class Cine:
    """A cine loop in the scene: browser, image sequence and its proxy volume."""

    browser: object
    sequence: object
    proxy: object

    @property
    def num_frames(self) -> int:
        return self.sequence.GetNumberOfDataNodes()

    @property
    def current_frame(self) -> int:
        return int(self.browser.GetSelectedItemNumber())

    def select(self, index: int) -> None:
        self.browser.SetSelectedItemNumber(int(index))

    def frames(self, geometry: SliceGeometry | None = None) -> list[np.ndarray]:
        """Every frame as a numpy copy, oriented like the proxy in the view (default: as stored)."""
        out = []
        for i in range(self.num_frames):
            arr = volume_array(self.sequence.GetNthDataNode(i))
            out.append(geometry.frame_from_array(arr, 0) if geometry is not None else np.array(arr[0]))
        return out


def create_cine(
    ctx,
    frames: Sequence[np.ndarray] | np.ndarray,
    spacing=(1.0, 1.0),
    frame_time_s: float = 0.0,
    name: str = "cine",
) -> Cine:
    """Put frames (N, H, W[, 3]) into a new sequence + browser; the proxy shows frame 0."""
    import slicer

    if frames is None or len(frames) == 0:
        raise InputError("no frames: a cine needs at least one frame")
    shapes = {np.shape(f) for f in frames}
    if len(shapes) > 1:
        raise InputError(f"frames of different sizes {sorted(shapes)[:3]}: every frame of a cine has one size")
    seq = slicer.vtkMRMLSequenceNode()
    seq.SetName(name)
    seq.SetIndexName("time")
    seq.SetIndexUnit("s")
    ctx.scene.AddNode(seq)
    for i, frame in enumerate(frames):
        value = f"{i * frame_time_s:.6g}" if frame_time_s > 0 else str(i)
        seq.SetDataNodeAtValue(volume_from_frame(np.asarray(frame), spacing, name), value)
    return browse(ctx, seq, name)


def browse(ctx, sequence, name: str | None = None) -> Cine:
    """A browser node for `sequence`, with its proxy node created."""
    import slicer

    browser = slicer.vtkMRMLSequenceBrowserNode()
    browser.SetName(name or sequence.GetName())
    ctx.scene.AddNode(browser)
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(0)
    ctx.sequences_logic.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    if proxy is not None:
        proxy.SetName(name or sequence.GetName())
        if proxy.GetDisplayNode() is None and hasattr(proxy, "CreateDefaultDisplayNodes"):
            proxy.CreateDefaultDisplayNodes()
    return Cine(browser, sequence, proxy)


def find_cine(ctx, volume_node) -> Cine | None:
    """The cine whose proxy is `volume_node`, or None when the volume is not a sequence proxy."""
    browser = ctx.sequences_logic.GetFirstBrowserNodeForProxyNode(volume_node)
    if browser is None:
        return None
    seq = browser.GetSequenceNode(volume_node)
    if seq is None:
        return None
    return Cine(browser, seq, volume_node)


# ---------------------------------------------------------------------------------- loading


def load_dicom_cine(ctx, path: str | os.PathLike, name: str | None = None) -> Cine:
    """A (multi-frame) ultrasound DICOM file into a new sequence + browser."""
    readable_file(path, "DICOM")
    d = read_dicom_cine(path)
    return create_cine(ctx, d.frames, d.spacing, d.frame_time_s, name or Path(path).stem)


def load_sequence_file(ctx, path: str | os.PathLike, name: str | None = None) -> Cine:
    """A `.seq.nrrd` volume sequence into a new sequence + browser."""
    import slicer

    path = str(readable_file(path, ".seq.nrrd"))
    seq = slicer.vtkMRMLSequenceNode()
    seq.SetName(name or Path(path).name.split(".")[0])
    ctx.scene.AddNode(seq)
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    ctx.scene.AddNode(storage)
    storage.SetFileName(path)
    if not storage.ReadData(seq) or seq.GetNumberOfDataNodes() == 0:
        ctx.scene.RemoveNode(storage)
        ctx.scene.RemoveNode(seq)
        raise InputError(f"'{path}' could not be read as a volume sequence (.seq.nrrd)")
    seq.SetAndObserveStorageNodeID(storage.GetID())
    return browse(ctx, seq, seq.GetName())


def save_sequence_file(ctx, sequence, path: str | os.PathLike) -> None:
    """Write a volume sequence to `.seq.nrrd` (atomically)."""
    import slicer

    path = Path(path)
    require_node(sequence, "vtkMRMLSequenceNode", "sequence to save")
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    _write_storage(storage, sequence, path)


def _write_storage(storage, node, path: Path) -> None:
    """Write ``node`` through an MRML storage node, atomically (VTK picks the writer from the file
    name, so the temporary file keeps the extension; WriteData returns 0 on failure).  A path that
    cannot be written is an InputError naming it."""
    from uniultra.checks import check_output_file

    check_output_file(path, "output file")

    def write(tmp: str) -> None:
        storage.SetFileName(tmp)
        if not storage.WriteData(node):
            raise OSError(f"could not write '{path}'")

    try:
        atomic_write(path, write, keep_ext=True)
    except OSError as e:
        raise InputError(f"could not write '{path}': {e.strerror or e}") from None


# ----------------------------------------------------------------------- .seg.nrrd round trip


def save_segmentation(seg_node, path: str | os.PathLike) -> None:
    """Write a segmentation node to `.seg.nrrd` (atomically)."""
    import slicer

    require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation to save")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    _write_storage(storage, seg_node, Path(path))


def load_segmentation(ctx, path: str | os.PathLike, name: str | None = None):
    """A `.seg.nrrd` file into a new segmentation node in the scene."""
    import slicer

    readable_file(path, ".seg.nrrd")
    seg = slicer.vtkMRMLSegmentationNode()
    seg.SetName(name or Path(path).name.split(".")[0])
    ctx.scene.AddNode(seg)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    ctx.scene.AddNode(storage)
    storage.SetFileName(str(path))
    if not storage.ReadData(seg):
        ctx.scene.RemoveNode(seg)
        ctx.scene.RemoveNode(storage)
        raise InputError(f"'{path}' could not be read as a segmentation (.seg.nrrd)")
    seg.SetAndObserveStorageNodeID(storage.GetID())
    seg.CreateDefaultDisplayNodes()
    return seg


# ------------------------------------------------------------------- per-frame segmentations


def ensure_segmentation_sequence(ctx, cine: Cine, seg_node=None, segment_name: str = "lesion"):
    """The proxy segmentation that shows each frame's mask, creating the segmentation sequence.

    If `seg_node` is given and not yet in the browser, it becomes the proxy: every frame gets an
    item holding a copy of every existing segment (with its content), so nothing the user drew
    disappears from any frame, and no frame is missing.  This changes what the segmentation is (one
    per frame instead of one for all), so callers ask the user first (`needs_segmentation_sequence`).
    Returns (proxy segmentation, segment ID).
    """
    import slicer

    if not isinstance(cine, Cine):
        raise InputError("no cine: select a sequence proxy volume (a cine loop) first")
    if seg_node is not None:
        require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation")
    browser = cine.browser
    if seg_node is not None and browser.GetSequenceNode(seg_node) is not None:
        seg_seq = browser.GetSequenceNode(seg_node)
        return seg_node, get_or_add_segment_in_all(seg_seq, seg_node, segment_name)
    if seg_node is None:
        seg_node = slicer.vtkMRMLSegmentationNode()
        seg_node.SetName(f"{cine.proxy.GetName()} segmentation")
        ctx.scene.AddNode(seg_node)
        seg_node.CreateDefaultDisplayNodes()
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(cine.proxy)
    sid = get_or_add_segment(seg_node, segment_name)
    seg_seq = slicer.vtkMRMLSequenceNode()
    seg_seq.SetName(f"{seg_node.GetName()} sequence")
    seg_seq.SetIndexName(cine.sequence.GetIndexName())
    seg_seq.SetIndexUnit(cine.sequence.GetIndexUnit())
    ctx.scene.AddNode(seg_seq)
    for i in range(cine.num_frames):
        item = slicer.vtkMRMLSegmentationNode()
        item.GetSegmentation().DeepCopy(seg_node.GetSegmentation())
        item.SetReferenceImageGeometryParameterFromVolumeNode(cine.sequence.GetNthDataNode(i))
        seg_seq.SetDataNodeAtValue(item, cine.sequence.GetNthIndexValue(i))
    ctx.sequences_logic.AddSynchronizedNode(seg_seq, seg_node, browser)
    browser.SetSaveChanges(seg_seq, True)
    ctx.sequences_logic.UpdateProxyNodesFromSequences(browser)
    return seg_node, sid


def needs_segmentation_sequence(cine: Cine, seg_node) -> bool:
    """True when writing per-frame masks would first turn `seg_node` into a per-frame sequence."""
    return cine.browser.GetSequenceNode(seg_node) is None


def _segment_ids(seg_node) -> list[str]:
    seg = seg_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def get_or_add_segment_in_all(seg_seq, proxy_seg, name: str) -> str:
    """Segment `name` in the proxy and every frame item (same ID everywhere)."""
    sid = proxy_seg.GetSegmentation().GetSegmentIdBySegmentName(name)
    if not sid:
        sid = get_or_add_segment(proxy_seg, name)
    segment = proxy_seg.GetSegmentation().GetSegment(sid)
    for i in range(seg_seq.GetNumberOfDataNodes()):
        item = seg_seq.GetNthDataNode(i).GetSegmentation()
        if item.GetSegment(sid) is None:
            item.AddEmptySegment(sid, segment.GetName(), list(segment.GetColor()))
    return sid


@dataclass
class CineEdit:
    """Undo record of a multi-frame write: the frames' segmentations before the write."""

    cine: Cine
    seg_sequence: object
    before: dict  # item number -> vtkSegmentation copy
    frames_written: list[int]

    def undo(self, ctx) -> None:
        for item_number, copy in self.before.items():
            self.seg_sequence.GetNthDataNode(item_number).GetSegmentation().DeepCopy(copy)
        current = self.cine.current_frame
        # refresh the proxy from the restored item
        self.cine.select(current + 1 if current + 1 < self.cine.num_frames else max(current - 1, 0))
        self.cine.select(current)
        ctx.sequences_logic.UpdateProxyNodesFromSequences(self.cine.browser)


def write_cine_masks(
    ctx,
    writer,
    cine: Cine,
    proxy_seg,
    segment_id: str,
    geometry: SliceGeometry,
    masks: Sequence[np.ndarray | None] | dict,
    mode: str = "replace",
) -> CineEdit:
    """Write one mask per frame (None or missing = leave the frame alone) into the per-frame segmentations.

    masks: a list with one entry per frame, or {frame: mask}.  Each frame is selected in the
    browser and written to the proxy segmentation through `write_masks` (so masking uses that
    frame's image and segments); the browser saves the proxy back into the frame's item.  The
    frame shown before is selected again afterwards.  One undo record for the whole write is
    returned: the editor's own undo history holds proxy states, and replaying one onto another
    frame would write the wrong frame.
    """
    import slicer

    seg_seq = cine.browser.GetSequenceNode(proxy_seg)
    if seg_seq is None:
        raise ValueError("the segmentation is not part of the cine's browser: call ensure_segmentation_sequence")
    if not isinstance(masks, dict):
        if len(masks) != cine.num_frames:
            raise ValueError(f"{len(masks)} masks for {cine.num_frames} frames")
        masks = dict(enumerate(masks))
    before = {}
    written = []
    current = cine.current_frame
    try:
        for i, mask in sorted(masks.items()):
            if mask is None or (mode == "add" and not np.any(mask)):
                continue
            if not 0 <= i < cine.num_frames:
                raise ValueError(f"frame {i} is outside the cine (0..{cine.num_frames - 1})")
            item_number = seg_seq.GetItemNumberFromIndexValue(cine.sequence.GetNthIndexValue(i))
            copy = slicer.vtkSegmentation()
            copy.DeepCopy(seg_seq.GetNthDataNode(item_number).GetSegmentation())
            before[item_number] = copy
            cine.select(i)
            write_masks(writer, proxy_seg, segment_id, geometry, {0: mask}, mode, save_undo=False)
            written.append(i)
    finally:
        cine.select(current)
    return CineEdit(cine, seg_seq, before, written)


def cine_frame_masks(cine: Cine, proxy_seg, segment_id: str, geometry: SliceGeometry) -> list[np.ndarray]:
    """Each frame's mask of a segment, (H, W) bool, read from the segmentation sequence."""
    seg_seq = _frame_segmentations(cine, proxy_seg)
    out = []
    for i in range(cine.num_frames):
        item = seg_seq.GetDataNodeAtValue(cine.sequence.GetNthIndexValue(i))
        vol = cine.sequence.GetNthDataNode(i)
        if item is None or item.GetSegmentation().GetSegment(segment_id) is None:
            out.append(np.zeros(geometry.shape, bool))
        else:
            out.append(segment_frame(item, segment_id, vol, geometry, 0))
    return out


def export_frame_masks_png(
    cine: Cine, proxy_seg, segment_id: str, geometry: SliceGeometry, folder: str | os.PathLike, prefix: str = "frame"
) -> list[Path]:
    """One PNG (0/255, frame pixels as displayed) per frame; files written atomically."""
    from PIL import Image

    from uniultra.checks import StagedFiles

    seg_seq = _frame_segmentations(cine, proxy_seg)
    if not any(seg_seq.GetNthDataNode(i).GetSegmentation().GetSegment(segment_id) is not None
               for i in range(seg_seq.GetNumberOfDataNodes())):
        raise InputError(f"segment '{segment_id}' is in no frame of '{proxy_seg.GetName()}': choose a segment")
    folder = output_folder(folder)
    masks = cine_frame_masks(cine, proxy_seg, segment_id, geometry)
    paths = [folder / f"{prefix}_{i:04d}.png" for i in range(len(masks))]
    with StagedFiles() as staged:  # every frame or none
        for p, m in zip(paths, masks):
            Image.fromarray((m * 255).astype(np.uint8)).save(staged.path(p), format="PNG")
    return paths


def _frame_segmentations(cine: Cine, proxy_seg):
    """The segmentation sequence of ``proxy_seg`` in the cine's browser, or an InputError."""
    if not isinstance(cine, Cine):
        raise InputError("no cine: select a sequence proxy volume (a cine loop) first")
    require_node(proxy_seg, "vtkMRMLSegmentationNode", "segmentation")
    seg_seq = cine.browser.GetSequenceNode(proxy_seg)
    if seg_seq is None:
        raise InputError(f"segmentation '{proxy_seg.GetName()}' has no per-frame masks in cine "
                         f"'{cine.proxy.GetName() if cine.proxy is not None else cine.sequence.GetName()}': "
                         "propagate or apply on the cine first")
    return seg_seq


def export_frame_masks_seg_nrrd(cine: Cine, proxy_seg, folder: str | os.PathLike, prefix: str = "frame") -> list[Path]:
    """One `.seg.nrrd` per frame (all segments, the frame's own geometry); every frame or none."""
    import shutil
    import tempfile

    seg_seq = _frame_segmentations(cine, proxy_seg)
    folder = output_folder(folder)
    paths = [folder / f"{prefix}_{i:04d}.seg.nrrd" for i in range(cine.num_frames)]
    stage = Path(tempfile.mkdtemp(prefix=".export.", dir=folder))
    try:
        for i, p in enumerate(paths):
            item = seg_seq.GetDataNodeAtValue(cine.sequence.GetNthIndexValue(i))
            if item is None:
                raise InputError(f"frame {i} of cine '{cine.sequence.GetName()}' has no segmentation item")
            save_segmentation(item, stage / p.name)
        for p in paths:
            os.replace(stage / p.name, p)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return paths
