"""Open an ultrasound file into an MRML scene with the project's own readers (no trame, no Qt).

slicer-core has no PNG/JPEG reader (its archetype storage node fails with "Failed to instantiate
a file reader"), so every format goes through UniUltra's readers:

* PNG/JPEG/TIFF/BMP and single-frame DICOM: `uniultra.data.io.read_image` -> one single-slice
  volume, laid out as Slicer lays out a loaded 2D image (`sequences.volume_from_frame`);
* multi-frame DICOM (cine): `sequences.load_dicom_cine` -> a sequence + browser;
* `.seq.nrrd`: `sequences.load_sequence_file` -> a sequence + browser;
* NRRD/NIfTI/MHA volumes: `uniultra.data.io.read_itk` (SimpleITK) -> a volume node whose
  IJKToRAS is the file's LPS geometry converted to RAS, as Slicer's own volume reader does.

Every failure is a `uniultra.errors.InputError` with one line that names the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXT = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
DICOM_EXT = (".dcm", ".dicom")
CINE_EXT = (".seq.nrrd",)
SUPPORTED_EXT = IMAGE_EXT + VOLUME_EXT + DICOM_EXT + CINE_EXT


def extension(name: str) -> str:
    """The lower-case extension, with the double ones (.nii.gz, .seq.nrrd, .seg.nrrd) kept whole."""
    low = name.lower()
    for e in (".nii.gz", ".seq.nrrd", ".seg.nrrd"):
        if low.endswith(e):
            return e
    return Path(low).suffix


def is_supported(name: str) -> bool:
    return extension(name) in SUPPORTED_EXT


@dataclass
class Loaded:
    """What was opened: the volume shown in the views and, for a cine, its sequence browser."""

    volume: object  # the source volume node (the cine's proxy for a cine)
    cine: object | None  # sequences.Cine or None
    kind: str  # "image" | "volume" | "cine"
    name: str

    @property
    def frame_count(self) -> int:
        """Frames of a cine, slices of a volume along K, 1 for an image."""
        if self.cine is not None:
            return self.cine.num_frames
        return self.volume.GetImageData().GetDimensions()[2]


def _engine():
    from UniUltraSegmentLib.engine import _add_source_tree_engine

    _add_source_tree_engine()


def _add_volume(ctx, node):
    ctx.scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None and hasattr(display, "AutoWindowLevelOn"):
        display.AutoWindowLevelOn()
    return node


def _volume_from_itk(path: Path, name: str):
    """A scalar or RGB volume node from a SimpleITK-readable file, geometry LPS -> RAS."""
    from UniUltraSegmentLib.geometry import volume_node

    from uniultra.data.io import read_itk
    from uniultra.errors import InputError

    arr, info = read_itk(path)
    ncomp = int(info["components"])
    dim = len(info["spacing"])
    if ncomp not in (1, 3, 4):
        raise InputError(f"cannot open '{path}': {ncomp} components per voxel; use a grey or RGB image")
    if ncomp == 4:
        arr = arr[..., :3]
        ncomp = 3
    spatial = arr.shape[:-1] if ncomp > 1 else arr.shape
    if dim == 2 or len(spatial) == 2:
        arr = arr[None]
        spatial = (1, *spatial)
    if len(spatial) != 3:
        raise InputError(f"cannot open '{path}': {len(spatial)}-D data; open a 2D image or a 3D volume")
    spacing = list(info["spacing"]) + [1.0] * (3 - dim)
    origin = list(info["origin"]) + [0.0] * (3 - dim)
    d = np.array(info["direction"], float).reshape(dim, dim)
    direction = np.eye(3)
    direction[:dim, :dim] = d
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction @ np.diag(spacing)
    ijk_to_lps[:3, 3] = origin
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps
    return volume_node(arr, ijk_to_ras, name, rgb=ncomp == 3)


def open_file(ctx, path: str | Path, name: str | None = None) -> Loaded:
    """Open `path` (an existing file, checked by the caller) into `ctx.scene`."""
    _engine()
    from UniUltraSegmentLib import sequences

    from uniultra.errors import InputError

    path = Path(path)
    ext = extension(path.name)
    name = name or (path.name[: -len(ext)] if ext else path.name)
    if ext not in SUPPORTED_EXT:
        raise InputError(f"cannot open '{path.name}': unsupported file type '{ext or path.name}'; "
                         f"use {', '.join(SUPPORTED_EXT)}")
    try:
        if ext in CINE_EXT:
            cine = sequences.load_sequence_file(ctx, path, name)
            return Loaded(cine.proxy, cine, "cine", name)
        if ext in DICOM_EXT:
            d = sequences.read_dicom_cine(path)
            if len(d.frames) > 1:
                cine = sequences.create_cine(ctx, d.frames, d.spacing, d.frame_time_s, name)
                return Loaded(cine.proxy, cine, "cine", name)
            node = _add_volume(ctx, sequences.volume_from_frame(d.frames[0], d.spacing, name))
            return Loaded(node, None, "image", name)
        if ext in IMAGE_EXT:
            from uniultra.data.io import read_image

            frame = read_image(path)
            if frame.ndim == 3 and frame.shape[2] == 1:
                frame = frame[..., 0]
            node = _add_volume(ctx, sequences.volume_from_frame(frame, (1.0, 1.0), name))
            return Loaded(node, None, "image", name)
        node = _add_volume(ctx, _volume_from_itk(path, name))
        kind = "image" if node.GetImageData().GetDimensions()[2] == 1 else "volume"
        return Loaded(node, None, kind, name)
    except InputError:
        raise
    except ValueError as exc:  # the Slicer-side loaders' one-line errors
        raise InputError(str(exc)) from None
