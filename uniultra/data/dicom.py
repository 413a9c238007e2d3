"""DICOM images and cine loops -> frames as displayed: the one DICOM reader of the project.

Torch-free (numpy + pydicom): the CLI/engine (:func:`uniultra.data.io.read_frames`,
:func:`~uniultra.data.io.read_image`) and the Slicer module (``UniUltraSegmentLib.sequences``)
both read DICOM through :func:`read_dicom_cine`, so one file reaches the model as the same pixels
from the command line and from Slicer.

Decoding rules:

* PALETTE COLOR: the LUT is applied; 16-bit LUT entries (descriptor's third value > 8, or values
  above 255) are scaled to 8 bit (``>> 8``).
* YBR_*: converted to RGB (pydicom 3's decoder does YBR_FULL/YBR_FULL_422 itself; the other YBR
  forms, and everything under pydicom 2, whose Pillow handler keeps JPEG data in YCbCr, are
  converted here).
* MONOCHROME1 (display-inverted grey): flipped within the data's own range, ``max + min - x``,
  so the values keep their range and dtype.
* Frames are ``[N, H, W]`` grey or ``[N, H, W, 3]`` RGB in the decoded dtype.
* Pixel spacing (mm, x then y) from PixelSpacing or the first ultrasound region (cm -> mm);
  frame time (s) from FrameTime (ms) or CineRate.

Slicer 5.10 bundles pydicom 2.4.4 and 5.12 bundles 3.0.2, so both are supported.
Every failure is a :class:`uniultra.errors.InputError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uniultra.errors import InputError


@dataclass
class DicomCine:
    frames: np.ndarray  # (N, H, W) or (N, H, W, 3)
    spacing: tuple[float, float] = (1.0, 1.0)  # mm (x, y)
    frame_time_s: float = 0.0
    description: str = ""
    meta: dict = field(default_factory=dict)


def _decode(ds, p: Path):
    """-> (array, frames, samples per pixel, photometric interpretation after decoding, apply_color_lut,
    convert_color_space) under pydicom 3 (``pydicom.pixels``) or pydicom 2."""
    try:
        from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_color_lut, convert_color_space

        arr = ds.pixel_array
        nframes = int(ds.get("NumberOfFrames") or 1)
        spp = int(ds.get("SamplesPerPixel") or 1)
        pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if pi in ("YBR_FULL", "YBR_FULL_422") and spp == 3:
            arr, pi = convert_color_space(arr, "YBR_FULL", "RGB"), "RGB"
        return arr, nframes, spp, pi, apply_color_lut, convert_color_space
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    arr, meta = decoder.as_array(ds, as_rgb=True)
    nframes = int(meta.get("number_of_frames") or ds.get("NumberOfFrames") or 1)
    spp = int(meta.get("samples_per_pixel") or ds.get("SamplesPerPixel") or 1)
    pi = str(meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation", "MONOCHROME2"))
    return arr, nframes, spp, pi, apply_color_lut, convert_color_space


def _frames(ds, p: Path) -> np.ndarray:
    try:
        arr, nframes, spp, pi, apply_color_lut, convert_color_space = _decode(ds, p)
    except Exception as e:
        raise InputError(
            f"cannot decode DICOM '{p}' (transfer syntax "
            f"{getattr(ds.file_meta, 'TransferSyntaxUID', '?')}): {e}; install a decoder plugin (e.g. pylibjpeg) "
            f"or convert the file"
        ) from e
    if nframes == 1:
        arr = arr[None]
    if spp == 1 and arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if pi == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as e:
            raise InputError(f"cannot apply the colour palette of DICOM '{p}': {e}; the file may be damaged") from e
        desc = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(desc[2]) if desc is not None and len(desc) > 2 else 8
        if bits > 8 or rgb.max() > 255:
            rgb = (rgb.astype(np.uint32) >> 8).astype(np.uint8)
        arr = rgb.astype(np.uint8)
    elif pi.startswith("YBR") and spp == 3:
        src = "YBR_FULL" if pi in ("YBR_FULL", "YBR_FULL_422") else pi
        try:
            arr = convert_color_space(arr, src, "RGB")
        except Exception:
            arr = convert_color_space(arr, "YBR_FULL", "RGB")
    elif pi.startswith("MONOCHROME1"):  # display-inverted grey: flip within the data's own range
        dt = arr.dtype
        wide = arr.astype(np.float64 if dt.kind == "f" else np.int64)
        arr = (wide.max() + wide.min() - wide).astype(dt)
    return np.ascontiguousarray(arr)


def _spacing(ds) -> tuple[float, float]:
    if "PixelSpacing" in ds:
        row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
        return (col_sp, row_sp)
    if "SequenceOfUltrasoundRegions" in ds and len(ds.SequenceOfUltrasoundRegions):
        region = ds.SequenceOfUltrasoundRegions[0]
        dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
        # units code 3 = cm
        if dx and dy and region.get("PhysicalUnitsXDirection") == 3 and region.get("PhysicalUnitsYDirection") == 3:
            return (abs(float(dx)) * 10.0, abs(float(dy)) * 10.0)
    return (1.0, 1.0)


def read_dicom_cine(path: str | os.PathLike) -> DicomCine:
    """A single- or multi-frame DICOM file -> frames as displayed, spacing, frame time (rules in
    the module doc)."""
    p = Path(path)
    try:
        import pydicom

        ds = pydicom.dcmread(str(p))
    except Exception as e:
        raise InputError(f"cannot read DICOM '{p}': {e}; is it a DICOM file?") from e
    if "PixelData" not in ds:
        raise InputError(f"cannot read DICOM '{p}': it holds no image (no Pixel Data); pick an image series file")
    frames = _frames(ds, p)
    frame_time = float(ds.get("FrameTime", 0) or 0) / 1000.0
    if not frame_time and ds.get("CineRate"):
        frame_time = 1.0 / float(ds.CineRate)
    desc = str(ds.get("SeriesDescription", "") or ds.get("StudyDescription", "") or p.stem)
    return DicomCine(frames, _spacing(ds), frame_time, desc,
                     {"photometric": str(ds.get("PhotometricInterpretation", ""))})
