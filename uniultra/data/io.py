"""Image, frame and mask file I/O.

Readers
-------
* :func:`read_image` -- one 2D image: PNG/JPG/TIFF/BMP (PIL), NRRD/NIfTI/MHA/MHD (SimpleITK; a
  3D file with a single slice is squeezed), single-frame DICOM (pydicom, colour converted to RGB).
* :func:`read_frames` -- a list of 2D frames from
  - multi-frame DICOM (:mod:`uniultra.data.dicom`: palette colour through its LUT, YBR converted
    to RGB, MONOCHROME1 inverted),
  - a Slicer sequence ``.seq.nrrd`` (the NRRD axis whose kind is ``list`` is the frame axis; a
    ``vector``/``RGB-color`` axis is the colour axis),
  - a 3D volume (``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha``, ...) sliced along ``axis`` of the numpy
    array that SimpleITK returns (default ``axis=0``: ITK's slowest axis ``k``, i.e. one frame per
    slice index k; each frame is the ``(j, i)`` plane),
  - any 2D image (a one-frame list).
Returned arrays are ``(H, W)`` grey or ``(H, W, 3)`` uint8 RGB in the file's own dtype.

Writers (atomic: temporary file in the target folder, then ``os.replace``; a failure leaves no
partial file): :func:`write_mask_png`, :func:`overlay_png`, :func:`write_seq_nrrd`.

Every failure to read is a :class:`uniultra.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import bz2
import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from uniultra.checks import readable_file
from uniultra.data.dicom import read_dicom_cine
from uniultra.data.intensity import to_uint8_rgb
from uniultra.errors import InputError
from uniultra.fileio import atomic_write  # noqa: F401  (re-exported: uniultra.data.io.atomic_write)

PIL_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
ITK_EXT = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".hdr", ".img")
DICOM_EXT = (".dcm", ".dicom", ".ima")
SUPPORTED = "PNG, JPG, TIFF, BMP, NRRD, NIfTI, MHA or DICOM"


def _ext(path: Path) -> str:
    name = path.name.lower()
    for e in (".nii.gz", ".seq.nrrd", ".seg.nrrd"):
        if name.endswith(e):
            return e
    return path.suffix.lower()


def _check_file(path) -> Path:
    return readable_file(path, folder_hint="pass an image file")


def _is_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# PIL
def _read_pil(p: Path, pages: bool = False):
    """One image (``pages``: every page of a multi-page TIFF/GIF, as a list), turned upright as its
    EXIF orientation says (as viewers show it, so that boxes drawn on it and masks line up)."""
    try:
        with Image.open(p) as im:
            n = getattr(im, "n_frames", 1)
            if n > 1 and not pages:
                raise InputError(
                    f"'{p}' is a multi-page file ({n} pages), not one image: give it to `uniultra propagate "
                    f"--clip` or `uniultra batch` (in Python: read_frames), or save one page"
                )
            out = []
            for k in range(n):
                im.seek(k)
                out.append(_pil_array(ImageOps.exif_transpose(im)))
    except InputError:
        raise
    except Exception as e:  # PIL raises many types
        raise InputError(f"cannot read image '{p}': {type(e).__name__}: {e}; is it a valid image file?") from e
    return out if pages else out[0]


def _pil_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "LA":
        im = im.getchannel(0)
    elif mode == "PA":
        im = im.convert("RGB")
    a = np.array(im)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------------
# SimpleITK
def read_itk(path) -> tuple[np.ndarray, dict]:
    """Read any SimpleITK-supported file -> (numpy array in ITK ``[k, j, i(, c)]`` order, info)."""
    import SimpleITK as sitk

    p = _check_file(path)
    try:
        img = sitk.ReadImage(str(p))
    except Exception as e:
        raise InputError(f"cannot read '{p}': {str(e).strip().splitlines()[-1] if str(e).strip() else e}; "
                         f"is it a valid NRRD/NIfTI/MHA file?") from e
    a = sitk.GetArrayFromImage(img)
    if a.dtype.kind == "f" and _ext(p) in (".nii", ".nii.gz"):
        bad = _nifti_nonfinite(p)
        if bad is not None:  # ITK reads NaN/infinity in NIfTI as 0; keep them, as for NRRD
            a = a.copy()
            if bad.size == a.size:
                a.reshape(-1)[bad.reshape(-1)] = np.nan
            else:
                a[...] = np.nan
    info = {
        "spacing": tuple(img.GetSpacing()),
        "origin": tuple(img.GetOrigin()),
        "direction": tuple(img.GetDirection()),
        "components": img.GetNumberOfComponentsPerPixel(),
    }
    return a, info


def _nifti_nonfinite(p: Path) -> np.ndarray | None:
    """Where a float NIfTI-1/2 file holds NaN or infinity (a bool array in file order), or None
    when it holds none (or the header is not one this reads: ITK's values stand then)."""
    import struct

    try:
        with (gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb")) as f:
            head = f.read(540)
            for end in "<>":
                size = struct.unpack(end + "i", head[:4])[0]
                if size in (348, 540):
                    break
            else:
                return None
            if size == 348:
                dims = struct.unpack(end + "8h", head[40:56])
                code = struct.unpack(end + "h", head[70:72])[0]
                offset = int(struct.unpack(end + "f", head[108:112])[0])
            else:
                code = struct.unpack(end + "h", head[12:14])[0]
                dims = struct.unpack(end + "8q", head[16:80])
                offset = struct.unpack(end + "q", head[168:176])[0]
            dtype = {16: "f4", 64: "f8"}.get(code)
            if dtype is None or not 1 <= dims[0] <= 7:
                return None
            n = int(np.prod([max(1, d) for d in dims[1: dims[0] + 1]]))
            f.seek(max(offset, size))
            raw = np.frombuffer(f.read(n * int(dtype[1])), dtype=end + dtype)
    except (OSError, EOFError, struct.error, ValueError):
        return None
    bad = ~np.isfinite(raw)
    return bad if bad.any() else None


# ---------------------------------------------------------------------------------------------
# DICOM
def _dicom_frames_array(p: Path) -> np.ndarray:
    """Decoded pixel data of a DICOM file as ``[N, H, W(, 3)]`` (:mod:`uniultra.data.dicom`)."""
    return read_dicom_cine(p).frames


# ---------------------------------------------------------------------------------------------
# Minimal NRRD reader / writer (for Slicer .seq.nrrd with a "list" axis)
_NRRD_TYPES = {
    "signed char": "i1", "int8": "i1", "int8_t": "i1",
    "uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1",
    "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2", "int16": "i2",
    "int16_t": "i2",
    "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2", "uint16": "u2", "uint16_t": "u2",
    "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
    "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4",
    "longlong": "i8", "long long": "i8", "long long int": "i8", "signed long long": "i8",
    "signed long long int": "i8", "int64": "i8", "int64_t": "i8",
    "ulonglong": "u8", "unsigned long long": "u8", "unsigned long long int": "u8", "uint64": "u8",
    "uint64_t": "u8",
    "float": "f4", "double": "f8",
}


def read_nrrd_header(path) -> tuple[dict, int]:
    """Parse an attached-data NRRD header -> (fields with lower-case keys, data byte offset)."""
    p = _check_file(path)
    fields: dict[str, str] = {}
    with open(p, "rb") as f:
        magic = f.readline()
        if not magic.startswith(b"NRRD"):
            raise InputError(f"cannot read '{p}': not a NRRD file (no NRRD magic); check the file")
        while True:
            line = f.readline()
            if not line:
                break
            s = line.decode("latin-1").rstrip("\r\n")
            if s == "":
                break
            if s.startswith("#"):
                continue
            if ":=" in s:
                k, v = s.split(":=", 1)
                fields["kv:" + k.strip()] = v
            elif ": " in s:
                k, v = s.split(": ", 1)
                fields[k.strip().lower()] = v.strip()
        offset = f.tell()
    return fields, offset


def read_nrrd(path) -> tuple[np.ndarray, dict]:
    """Read an attached-data NRRD -> (array in NRRD axis order reversed, i.e. C order with the
    slowest axis first, header fields).  ``fields['kinds']`` lists kinds fastest-first (as NRRD)."""
    p = _check_file(path)
    fields, offset = read_nrrd_header(p)
    if "data file" in fields or "datafile" in fields:
        raise InputError(f"cannot read '{p}': detached NRRD data is not supported; save as a single .nrrd file")
    try:
        dt = np.dtype(_NRRD_TYPES[fields["type"].lower()])
        sizes = [int(s) for s in fields["sizes"].split()]
    except KeyError as e:
        raise InputError(f"cannot read '{p}': NRRD header lacks or has an unknown {e}; check the file") from e
    endian = fields.get("endian", "little").lower()
    if dt.itemsize > 1:
        dt = dt.newbyteorder("<" if endian == "little" else ">")
    enc = fields.get("encoding", "raw").lower()
    with open(p, "rb") as f:
        f.seek(offset)
        raw = f.read()
    try:
        if enc in ("gzip", "gz"):
            raw = gzip.decompress(raw)
        elif enc in ("bzip2", "bz2"):
            raw = bz2.decompress(raw)
        elif enc in ("text", "txt", "ascii"):
            arr = np.array(raw.split(), dtype=np.float64).astype(dt)
            raw = arr.tobytes()
        elif enc != "raw":
            raise InputError(f"cannot read '{p}': NRRD encoding '{enc}' is not supported; save as raw or gzip")
    except (OSError, EOFError, ValueError) as e:
        raise InputError(f"cannot read '{p}': its NRRD data is damaged ({e}); re-export the file") from e
    n = int(np.prod(sizes))
    if len(raw) < n * dt.itemsize:
        raise InputError(f"cannot read '{p}': NRRD data is truncated; re-export the file")
    a = np.frombuffer(raw[: n * dt.itemsize], dtype=dt).reshape(sizes[::-1])
    return a.astype(dt.newbyteorder("="), copy=True), fields


_COLOUR_KINDS = {"rgb-color", "3-color", "rgba-color", "4-color", "vector", "covariant-vector",
                 "normal", "3-vector", "4-vector", "hsv-color", "xyz-color"}


def _nrrd_has_list_axis(p: Path) -> bool:
    try:
        fields, _ = read_nrrd_header(p)
    except Exception:  # not our minimal reader's kind of NRRD: ITK reads it below
        return False
    return "list" in fields.get("kinds", "").lower().split()


def _frames_from_nrrd(p: Path, axis: int) -> list[np.ndarray] | None:
    """Frames of a NRRD with a ``list`` axis (Slicer sequence); None when it has none."""
    fields, _ = read_nrrd_header(p)
    kinds = fields.get("kinds", "").split()
    lower = [k.lower() for k in kinds]
    if "list" not in lower:
        return None
    a, _ = read_nrrd(p)
    nd = a.ndim
    # numpy axis of NRRD axis i is nd-1-i
    list_ax = nd - 1 - lower.index("list")
    colour_ax = None
    for i, k in enumerate(lower):
        if k in _COLOUR_KINDS and a.shape[nd - 1 - i] in (1, 3, 4):
            colour_ax = nd - 1 - i
            break
    order = [list_ax] + [d for d in range(nd) if d not in (list_ax, colour_ax)]
    if colour_ax is not None:
        order.append(colour_ax)
    a = np.transpose(a, order)  # [N, spatial..., (C)]
    spatial = a.shape[1: nd - (1 if colour_ax is not None else 0)]
    # drop singleton spatial axes (a 2D sequence is stored as 3D with one slice)
    keep = [i + 1 for i, s in enumerate(spatial) if s != 1]
    if len(keep) > 2:
        raise InputError(
            f"cannot read '{p}' as 2D frames: each sequence item is a 3D volume {tuple(spatial)}; "
            f"use a 2D (single-slice) sequence"
        )
    sq = tuple(i + 1 for i, s in enumerate(spatial) if s == 1)
    a = a.squeeze(axis=sq) if sq else a
    if a.ndim == 2:
        a = a[:, :, None]
    if colour_ax is not None and a.shape[-1] == 4:
        a = a[..., :3]
    if colour_ax is not None and a.shape[-1] == 1:
        a = a[..., 0]
    return [np.ascontiguousarray(f) for f in a]


def write_seq_nrrd(path, frames: Sequence[np.ndarray], spacing=(1.0, 1.0)) -> Path:
    """Write 2D frames as a Slicer-style sequence NRRD (``kinds: [RGB-color] domain domain domain list``,
    gzip), atomically.  Frames are ``(H, W)`` or ``(H, W, 3)`` of one dtype and shape."""
    arr = np.stack([np.asarray(f) for f in frames])  # [N, H, W(, 3)]
    rgb = arr.ndim == 4
    tname = {"u1": "uint8", "i1": "int8", "u2": "uint16", "i2": "int16", "u4": "uint32", "i4": "int32",
             "i8": "int64", "u8": "uint64", "f4": "float", "f8": "double"}.get(arr.dtype.str[1:])
    if tname is None:
        raise InputError(f"cannot write '{path}': frames of dtype {arr.dtype} are not supported; use an integer or float type")
    n, h, w = arr.shape[:3]
    data = arr[:, None]  # [N, k=1, H, W(, 3)] -> NRRD fastest-first: (c) i j k list
    sizes = ([3] if rgb else []) + [w, h, 1, n]
    kinds = (["RGB-color"] if rgb else []) + ["domain", "domain", "domain", "list"]
    sx, sy = float(spacing[0]), float(spacing[1])
    dirs = (["none"] if rgb else []) + [f"({sx},0,0)", f"(0,{sy},0)", "(0,0,1)", "none"]
    header = (
        "NRRD0004\n"
        f"type: {tname}\ndimension: {len(sizes)}\nspace: left-posterior-superior\n"
        f"sizes: {' '.join(map(str, sizes))}\nspace directions: {' '.join(dirs)}\n"
        f"kinds: {' '.join(kinds)}\nendian: little\nencoding: gzip\nspace origin: (0,0,0)\n"
    )
    payload = gzip.compress(np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"))).tobytes(), 6)

    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header.encode("latin-1") + b"\n" + payload)

    return atomic_write(path, _w)


# ---------------------------------------------------------------------------------------------
def read_image(path) -> np.ndarray:
    """Read one 2D image -> ``(H, W)`` or ``(H, W, 3)`` array (file dtype; alpha dropped)."""
    p = _check_file(path)
    ext = _ext(p)
    if ext in DICOM_EXT or (ext not in PIL_EXT + ITK_EXT + (".seq.nrrd", ".seg.nrrd") and _is_dicom(p)):
        a = _dicom_frames_array(p)
        if a.shape[0] != 1:
            raise InputError(
                f"'{p}' is a multi-frame DICOM ({a.shape[0]} frames), not one image: give it to "
                f"`uniultra propagate --clip` or `uniultra batch` (in Python: read_frames), or save one frame"
            )
        return a[0]
    if ext in PIL_EXT:
        return _read_pil(p)
    if ext in (".nrrd", ".seq.nrrd", ".nhdr") and _nrrd_has_list_axis(p):  # a Slicer sequence (cine)
        frames = _frames_from_nrrd(p, 0)
        if frames is not None and len(frames) != 1:
            raise InputError(
                f"'{p}' is a sequence (cine) of {len(frames)} frames, not one image: give it to "
                f"`uniultra propagate --clip` or `uniultra batch` (in Python: read_frames), or save one frame"
            )
        if frames:
            return frames[0]
    if ext in ITK_EXT or ext in (".seq.nrrd", ".seg.nrrd"):
        a, info = read_itk(p)
        if info["components"] > 1:
            a = a if a.shape[-1] != 4 else a[..., :3]
            spatial = a.shape[:-1]
        else:
            spatial = a.shape
        if len(spatial) == 3 and 1 in spatial:  # one slice stored as a volume: (1, H, W), (H, 1, W), (H, W, 1)
            a = a.squeeze(axis=spatial.index(1))
        elif len(spatial) > 2:
            raise InputError(
                f"'{p}' is a 3D volume or clip of shape {tuple(spatial)}, not one image: give it to "
                f"`uniultra propagate --clip` or `uniultra batch` (in Python: read_frames), or save one slice"
            )
        if a.ndim == 3 and a.shape[2] not in (1, 3):
            raise InputError(f"'{p}' has {a.shape[2]} components per pixel; use a grey or RGB image")
        return np.ascontiguousarray(a)
    # unknown extension: try PIL
    try:
        return _read_pil(p)
    except InputError:
        pass
    raise InputError(f"cannot read image '{p}': unsupported file type '{ext or p.name}'; use {SUPPORTED}")


def _cine(p: Path, frames: list[np.ndarray], axis: int) -> list[np.ndarray]:
    """``frames`` of a cine or 2D image, refused when a slice axis other than 0 was asked for:
    it applies to 3D volumes only (ignoring it would label the frames as they are, silently)."""
    if axis != 0:
        raise InputError(f"slice axis {axis} applies to 3D volumes, and '{p}' is a cine or 2D image "
                         f"({len(frames)} frame(s) in time order): leave the axis out")
    return frames


def read_frames(path, axis: int = 0) -> list[np.ndarray]:
    """Read a cine / volume file -> list of 2D frames (see the module doc for the rules).

    ``axis`` applies to 3D volumes only: the numpy axis of SimpleITK's ``[k, j, i]`` array to
    slice along (0 = k, the default)."""
    p = _check_file(path)
    ext = _ext(p)
    if ext in DICOM_EXT or (ext not in PIL_EXT + ITK_EXT + (".seq.nrrd",) and _is_dicom(p)):
        a = _dicom_frames_array(p)
        return _cine(p, [np.ascontiguousarray(f) for f in a], axis)
    if ext in PIL_EXT:
        return _cine(p, _read_pil(p, pages=True), axis)
    if ext in (".nrrd", ".seq.nrrd", ".nhdr"):
        try:
            frames = _frames_from_nrrd(p, axis)
        except InputError:
            raise
        except Exception:
            frames = None
        if frames is not None:
            return _cine(p, frames, axis)
    if ext in ITK_EXT or ext in (".seq.nrrd", ".seg.nrrd"):
        a, info = read_itk(p)
        comp = info["components"] > 1
        spatial_nd = a.ndim - (1 if comp else 0)
        four_d = spatial_nd == 4
        if four_d:  # e.g. 4D NIfTI [t, k, j, i]: frames over t of single-slice volumes
            if a.shape[1] == 1:
                a = a[:, 0]
                spatial_nd = 3
            else:
                raise InputError(f"cannot read '{p}' as 2D frames: it is a 4D volume {a.shape}; use a 3D volume")
        if spatial_nd == 2:
            frames = _cine(p, [a], axis)
        elif four_d:
            frames = _cine(p, list(a), axis)
        else:
            if not -3 <= axis < 3:
                raise InputError(f"slice axis {axis} is invalid for '{p}'; use 0, 1 or 2")
            flat = [d for d in range(3) if a.shape[d] == 1 and d != axis % 3]
            if flat and a.shape[axis] > 1:  # one slice stored as a volume, e.g. (H, 1, W): slicing
                frames = [a.squeeze(axis=flat[0])]  # along `axis` would give 1-pixel-thin frames
            else:
                frames = [np.take(a, i, axis=axis) for i in range(a.shape[axis])]
        if comp:
            frames = [f[..., :3] if f.shape[-1] == 4 else f for f in frames]
        return [np.ascontiguousarray(f) for f in frames]
    return _cine(p, [read_image(p)], axis)


# ---------------------------------------------------------------------------------------------
# Writers
def _save_png(img: Image.Image, path) -> Path:
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def write_mask_png(path, mask: np.ndarray) -> Path:
    """Write a 2D mask as an 8-bit PNG with values 0/255 (non-zero -> 255), atomically."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise InputError(f"mask for '{path}' has shape {tuple(m.shape)}; pass a 2D (H, W) mask")
    return _save_png(Image.fromarray(np.where(m != 0, 255, 0).astype(np.uint8)), path)


PALETTE = [(255, 64, 64), (64, 200, 255), (255, 200, 0), (0, 220, 120), (200, 90, 255), (255, 140, 0),
           (0, 160, 255), (255, 80, 200)]


def render_overlay(image: np.ndarray, masks: Sequence[np.ndarray] | np.ndarray, boxes=None, points=None,
                   labels=None, alpha: float = 0.4, colors=None) -> np.ndarray:
    """Render masks (translucent fill + contour), boxes and points on an image -> uint8 RGB."""
    from scipy import ndimage as ndi

    rgb = to_uint8_rgb(image).astype(np.float32)
    h, w = rgb.shape[:2]
    ms = [] if masks is None else list(np.asarray(masks)[None] if np.ndim(masks) == 2 else masks)
    colors = colors or PALETTE
    for i, m in enumerate(ms):
        m = np.asarray(m).astype(bool)
        if m.shape != (h, w):
            raise InputError(f"overlay mask {i} has shape {m.shape}, image is {(h, w)}; pass masks at image size")
        c = np.array(colors[i % len(colors)], np.float32)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * c
        edge = m & ~ndi.binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)
        rgb[edge] = c
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for i, b in enumerate([] if boxes is None else boxes):
        if b is None:
            continue
        x0, y0, x1, y1 = (float(v) for v in b)
        d.rectangle([x0, y0, x1, y1], outline=(255, 255, 0) if len(ms) <= 1 else colors[i % len(colors)],
                    width=max(1, round(min(h, w) / 200)))
    if points is not None and len(points):
        pts = np.asarray(points, dtype=float).reshape(-1, 2)
        lab = np.ones(len(pts), int) if labels is None else np.asarray(labels).reshape(-1)
        r = max(2, round(min(h, w) / 100))
        for (x, y), lb in zip(pts, lab):
            col = (0, 255, 0) if lb > 0 else (255, 0, 0)
            d.ellipse([x - r, y - r, x + r, y + r], fill=col, outline=(0, 0, 0))
    return np.array(im)


def overlay_png(path, image: np.ndarray, masks, boxes=None, points=None, labels=None, alpha: float = 0.4) -> Path:
    """Write an overlay PNG (coloured translucent masks, contours, boxes, points; positive points
    green, negative red), atomically."""
    return _save_png(Image.fromarray(render_overlay(image, masks, boxes, points, labels, alpha)), path)


def read_mask(path) -> np.ndarray:
    """Read a label/mask image -> integer ``(H, W)`` array (RGB masks: any non-zero channel -> 255).
    A JPEG mask is lossy (its edges and background hold values that are no label): it is read as
    one label, 255 where it is at least half its maximum."""
    a = read_image(path)
    lossy = _ext(Path(path)) in (".jpg", ".jpeg")
    if a.ndim == 3:
        a = a.max(axis=2) if lossy else np.where(a.max(axis=2) > 0, 255, 0).astype(np.uint8)
    if lossy:
        a = np.where((a.astype(np.float64) * 2 >= a.max()) & (a > 0), 255, 0).astype(np.uint8)
    return a
