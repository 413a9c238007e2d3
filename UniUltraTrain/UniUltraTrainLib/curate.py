"""Curate: segmentations in the scene (or in files) -> the engine's uniform dataset layout.

The trainer reads ``<out>/images/<id>.png``, ``<out>/masks/<id>.png``, ``<out>/split.csv``
(``id,split,clip,frame``) and ``<out>/meta.json``.  This module cuts one 2D frame per labelled
slice (3D volume) or frame (cine) out of the scene, with the same geometry helpers that
UniUltraSegment uses to show a slice, so image and mask pixels come from the same voxel.

* 2D images (single-slice volumes) and colour images (RGB vector volumes): one frame.
* 3D scalar volumes (any direction matrix and spacing): the slices along the IJK axis closest
  to the chosen view's normal ("rotate to volume plane"), oriented as that view shows them.
* Cine loops: a segmentation sequence synchronised with an image sequence in a sequence
  browser (what UniUltraSegment's cine labelling creates): each frame's item.

Train/val split is by case (clip/volume/sequence), seeded: one case never straddles splits.
No Qt and no engine (torch) import: it runs in Slicer before the engine is installed.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from UniUltraSegmentLib.geometry import SliceGeometry, ijk_to_ras_of, slice_geometry, volume_array
from UniUltraSegmentLib.segments import segment_array

from uniultra.data.intensity import intensity_window, to_uint8
from uniultra.fileio import atomic_write, atomic_write_text

# Slicer's slice orientation presets (SliceToRAS rotation: columns are view x, view y, normal)
ORIENTATIONS = {
    "axial": np.array([[-1, 0, 0], [0, 1, 0], [0, 0, 1]], float),
    "sagittal": np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], float),
    "coronal": np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], float),
}
IMAGE_EXTS = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SEG_SUFFIXES = ("", "_seg", "-seg", " segmentation", "_segmentation", "-segmentation", "_label", "-label", "_mask")
OVERLAY_COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


# ------------------------------------------------------------------------------------ helpers
def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """8-bit grey (H, W) or RGB (H, W, 3) PNG, written atomically."""
    from PIL import Image

    a = np.ascontiguousarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"PNG '{path}' must be 8-bit, got {a.dtype}")
    return atomic_write(path, lambda tmp: Image.fromarray(a).save(tmp, format="PNG"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_text(path, text)


def safe_id(name: str) -> str:
    """A file-name-safe id: letters, digits, '-', '_' only."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_")
    return s or "case"


def count_objects(mask: np.ndarray) -> int:
    """8-connected components in a 2D mask (each becomes one box prompt in training)."""
    m = np.asarray(mask) > 0
    if not m.any():
        return 0
    from scipy import ndimage  # Slicer ships scipy

    return int(ndimage.label(m, structure=np.ones((3, 3), bool))[1])


# ------------------------------------------------------------------------------------ geometry
def volume_plane_geometry(volume_node, orientation: str = "axial", slice_to_ras=None) -> SliceGeometry:
    """How to cut a volume into 2D frames, as a slice view "rotated to the volume plane" shows it.

    With `slice_to_ras` (a slice node's SliceToRAS, aligned with the volume) the view's own
    geometry is used.  Otherwise the view normal snaps to the volume's IJK axis closest to the
    `orientation` preset's normal (a 2D image: its single-slice axis), and the in-plane axes to
    the IJK axes closest to the preset's x and -y, so a 3D volume with an oblique direction
    matrix is cut along its own voxel planes, never resampled.
    """
    if slice_to_ras is not None:
        return slice_geometry(volume_node, slice_to_ras)
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation '{orientation}' is not one of {', '.join(ORIENTATIONS)}")
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no image data: load an image first")
    dims = tuple(int(d) for d in image.GetDimensions())
    m = ijk_to_ras_of(volume_node)
    dirs = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)  # unit RAS direction of each IJK axis
    preset = ORIENTATIONS[orientation]
    flat = [a for a in range(3) if dims[a] == 1]
    if len(flat) >= 2:
        raise ValueError(f"volume '{volume_node.GetName()}' is a line of voxels {dims}: it has no 2D frames")
    axis = flat[0] if flat else int(np.argmax(np.abs(dirs.T @ preset[:, 2])))
    in_plane = [a for a in range(3) if a != axis]
    x_dots = [float(dirs[:, a] @ preset[:, 0]) for a in in_plane]
    col_axis = in_plane[int(np.argmax(np.abs(x_dots)))]
    row_axis = in_plane[0] if in_plane[1] == col_axis else in_plane[1]
    col_flip = float(dirs[:, col_axis] @ preset[:, 0]) < 0
    row_flip = float(dirs[:, row_axis] @ -preset[:, 1]) < 0
    return SliceGeometry(axis, 0, col_axis, row_axis, col_flip, row_flip, dims, m)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One case to export: a segmentation and the image it labels.

    kind: "2d", "rgb", "3d" or "cine".  For a cine, `seg_node` is the proxy segmentation of the
    browser and `volume_node` the proxy volume; frames are read from the sequences.
    """

    name: str
    seg_node: object
    volume_node: object
    kind: str
    browser: object = None
    image_sequence: object = None
    seg_sequence: object = None


def reference_volume(seg_node):
    """The volume a segmentation was made on (its reference image geometry), or None."""
    role = seg_node.GetReferenceImageGeometryReferenceRole()
    return seg_node.GetNodeReference(role)


def _volume_kind(volume_node) -> str:
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no image data: load an image first")
    dims = image.GetDimensions()
    if image.GetNumberOfScalarComponents() > 1:
        if min(dims) > 1:
            raise ValueError(f"colour volume '{volume_node.GetName()}' is 3D: only 2D colour images are supported")
        return "rgb"
    return "2d" if min(dims) == 1 else "3d"


def make_case(ctx, seg_node, volume_node=None, name: str | None = None) -> Case:
    """A Case for `seg_node`: a cine when it is a sequence proxy, else its (reference) volume."""
    browser = ctx.sequences_logic.GetFirstBrowserNodeForProxyNode(seg_node) if ctx.sequences_logic else None
    if browser is not None and browser.GetSequenceNode(seg_node) is not None:
        seg_seq = browser.GetSequenceNode(seg_node)
        image_seq = None
        if volume_node is not None and browser.GetSequenceNode(volume_node) is not None:
            image_seq = browser.GetSequenceNode(volume_node)
        else:
            import vtk

            col = vtk.vtkCollection()
            browser.GetSynchronizedSequenceNodes(col, True)
            for i in range(col.GetNumberOfItems()):
                s = col.GetItemAsObject(i)
                if s is not seg_seq and s.GetNumberOfDataNodes() and s.GetNthDataNode(0).IsA("vtkMRMLVolumeNode"):
                    image_seq = s
                    break
        if image_seq is None:
            raise ValueError(
                f"segmentation '{seg_node.GetName()}' is in sequence browser '{browser.GetName()}' "
                "but the browser has no image sequence: add the cine's volume sequence to the browser"
            )
        proxy = browser.GetProxyNode(image_seq)
        return Case(name or browser.GetName() or image_seq.GetName(), seg_node, proxy, "cine",
                    browser, image_seq, seg_seq)
    volume_node = volume_node or reference_volume(seg_node)
    if volume_node is None:
        raise ValueError(
            f"segmentation '{seg_node.GetName()}' has no source volume: choose the image it labels"
        )
    return Case(name or volume_node.GetName(), seg_node, volume_node, _volume_kind(volume_node))


def resolve_targets(seg_node, targets) -> dict[str, tuple[str, int]]:
    """{segment name: (segment id in `seg_node`, label value)} for the target segments.

    targets: a list of segment names/ids (labels 255 for one, 1..K for several, in order) or a
    mapping {name or id: label value}.  Segments missing from this case are skipped.
    """
    segmentation = seg_node.GetSegmentation()
    items = list(targets.items()) if isinstance(targets, Mapping) else None
    if items is None:
        names = list(targets)
        items = [(n, 255 if len(names) == 1 else i + 1) for i, n in enumerate(names)]
    out = {}
    for key, label in items:
        label = int(label)
        if not 1 <= label <= 255:
            raise ValueError(f"label value {label} of segment '{key}' must be 1..255")
        seg = segmentation.GetSegment(str(key))
        sid = str(key) if seg is not None else segmentation.GetSegmentIdBySegmentName(str(key))
        if not sid:
            continue
        out[segmentation.GetSegment(sid).GetName()] = (sid, label)
    return out


def label_names(seg_nodes: Iterable, targets) -> dict[int, str]:
    """{label value: segment name} as written to meta.json."""
    if isinstance(targets, Mapping):
        names = {}
        for key, label in targets.items():
            name = str(key)
            for s in seg_nodes:
                seg = s.GetSegmentation().GetSegment(str(key))
                if seg is not None:
                    name = seg.GetName()
                    break
            names[int(label)] = name
        return names
    t = list(targets)
    return {(255 if len(t) == 1 else i + 1): str(n) for i, n in enumerate(t)}


def segment_names(seg_node) -> list[str]:
    s = seg_node.GetSegmentation()
    return [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())]


# ------------------------------------------------------------------------------------ frames
@dataclass
class Frame:
    case: str
    index: int  # slice (3D) or frame (cine) index; 0 for a 2D image
    image: np.ndarray  # uint8 (H, W) or (H, W, 3)
    mask: np.ndarray  # uint8 (H, W): 0 background, label values
    objects: dict[str, int] = field(default_factory=dict)  # segment name -> connected components


def _label_frames(seg_node, volume_node, geometry: SliceGeometry, targets: dict[str, tuple[str, int]],
                  indices: Sequence[int] | None = None) -> dict[int, tuple[np.ndarray, dict[str, int]]]:
    """{slice index: (label frame, objects per segment)} for the slices with any target voxel."""
    n = geometry.dims[geometry.axis]
    per_segment = {}
    for name, (sid, label) in targets.items():
        arr = segment_array(seg_node, sid, volume_node)
        if arr.any():
            per_segment[name] = (arr, label)
    out = {}
    for k in indices if indices is not None else range(n):
        lab = None
        objects = {}
        for name, (arr, label) in per_segment.items():
            fr = geometry.frame_from_array(arr, k)
            if not fr.any():
                continue
            if lab is None:
                lab = np.zeros(fr.shape, np.uint8)
            lab[fr > 0] = label  # later targets win where segments overlap
            objects[name] = count_objects(fr)
        if lab is not None:
            out[k] = (lab, objects)
    return out


def case_frames(case: Case, targets, orientation: str = "axial", slice_to_ras=None) -> list[Frame]:
    """The labelled 2D frames of one case, image and mask cut with one geometry."""
    out: list[Frame] = []
    if case.kind == "cine":
        seq, seg_seq = case.image_sequence, case.seg_sequence
        window = None
        for i in range(seq.GetNumberOfDataNodes()):
            item = seg_seq.GetDataNodeAtValue(seq.GetNthIndexValue(i))
            if item is None:
                continue
            t = resolve_targets(item, targets)
            if not t:
                continue
            vol = seq.GetNthDataNode(i)
            geom = volume_plane_geometry(vol, orientation, slice_to_ras)
            labelled = _label_frames(item, vol, geom, t, [0])
            if 0 not in labelled:
                continue
            arr = volume_array(vol)
            if window is None and arr.dtype != np.uint8:
                window = intensity_window(np.stack([volume_array(seq.GetNthDataNode(j))
                                                    for j in range(seq.GetNumberOfDataNodes())]))
            lab, objects = labelled[0]
            out.append(Frame(case.name, i, to_uint8(geom.frame_from_array(arr, 0), window), lab, objects))
        return out
    t = resolve_targets(case.seg_node, targets)
    if not t:
        return out
    geom = volume_plane_geometry(case.volume_node, orientation, slice_to_ras)
    arr = volume_array(case.volume_node)
    window = intensity_window(arr) if arr.dtype != np.uint8 else None
    for k, (lab, objects) in sorted(_label_frames(case.seg_node, case.volume_node, geom, t).items()):
        out.append(Frame(case.name, k, to_uint8(geom.frame_from_array(arr, k), window), lab, objects))
    return out


# ------------------------------------------------------------------------------------ split
def split_cases(names: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> dict[str, str]:
    """{case: "train" | "val"}, seeded; at least one val case when there are two or more cases,
    and never all of them in val."""
    names = sorted(set(names))
    if len(names) < 2:
        return {n: "train" for n in names}
    order = names.copy()
    random.Random(seed).shuffle(order)
    n_val = min(len(names) - 1, max(1, int(round(val_fraction * len(names)))))
    val = set(order[:n_val])
    return {n: ("val" if n in val else "train") for n in names}


# ------------------------------------------------------------------------------------ export
@dataclass
class ExportResult:
    out: Path
    rows: list[dict]  # split.csv rows
    summary: list[dict]  # one per case + a total row
    labels: dict[int, str]
    preview: Path | None = None

    @property
    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for r in self.rows:
            c[r["split"]] = c.get(r["split"], 0) + 1
        return c


def _unique_names(cases: Sequence[Case]) -> None:
    seen: dict[str, int] = {}
    for c in cases:
        base = safe_id(c.name)
        n = seen.get(base, 0)
        seen[base] = n + 1
        c.name = base if n == 0 else f"{base}-{n + 1}"


def export_dataset(
    cases: Sequence[Case],
    targets,
    out: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    orientation: str = "axial",
    splits: Mapping[str, str] | None = None,
    preview: bool = True,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    source: str = "3D Slicer (UniUltraTrain)",
) -> ExportResult:
    """Write the labelled frames of `cases` as a uniform dataset in `out` (see the module doc).

    targets: segment names/ids (255 for one, 1..K for several) or {name or id: label}.
    splits: fixed {case: split} (default: seeded split by case).  Files already in `out/images`
    and `out/masks` with other ids are left alone; split.csv and meta.json describe this export.
    """
    cases = list(cases)
    if not cases:
        raise ValueError("nothing to export: choose at least one segmentation")
    if not targets:
        raise ValueError("no target segment: tick the segments to learn")
    _unique_names(cases)
    out = Path(out)
    frames_by_case: dict[str, list[Frame]] = {}
    for i, case in enumerate(cases):
        if cancel is not None and cancel():
            raise InterruptedError("export cancelled")
        frames_by_case[case.name] = case_frames(case, targets, orientation)
        if progress is not None:
            progress(i + 1, len(cases))
    labelled = [c for c in cases if frames_by_case[c.name]]
    if not labelled:
        raise ValueError(
            "none of the chosen segments has any labelled voxel: label some frames first, or tick other segments"
        )
    split_of = dict(splits) if splits is not None else split_cases([c.name for c in labelled], val_fraction, seed)
    rows = []
    for case in labelled:
        for fr in frames_by_case[case.name]:
            fid = f"{case.name}_{fr.index:04d}"
            write_png(out / "images" / f"{fid}.png", fr.image)
            write_png(out / "masks" / f"{fid}.png", fr.mask)
            rows.append({"id": fid, "split": split_of.get(case.name, "train"), "clip": case.name, "frame": fr.index})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "split", "clip", "frame"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(out / "split.csv", buf.getvalue())
    labels = label_names([c.seg_node for c in cases], targets)
    summary = summarize(cases, frames_by_case, split_of, labels)
    result = ExportResult(out, rows, summary, labels)
    meta = {
        "name": out.name,
        "source": source,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "count": result.counts,
        "cases": {c.name: {"kind": c.kind, "split": split_of.get(c.name, "train"),
                           "frames": len(frames_by_case[c.name])} for c in labelled},
        "split": f"by case, seed {seed}, val fraction {val_fraction}" if splits is None else "given",
        "orientation": orientation,
        "cine": "frames of one case share the clip column; frame is the slice or frame index",
    }
    write_text(out / "meta.json", json.dumps(meta, indent=2))
    if preview:
        all_frames = [fr for c in labelled for fr in frames_by_case[c.name]]
        result.preview = write_preview(out / "preview.png", all_frames, labels)
    return result


def summarize(cases: Sequence[Case], frames_by_case: Mapping[str, list[Frame]], split_of: Mapping[str, str],
              labels: Mapping[int, str]) -> list[dict]:
    """Rows for the summary table: case, kind, split, frames, objects per segment; then a total."""
    names = [labels[k] for k in sorted(labels)]
    rows = []
    total = {"case": "total", "kind": "", "split": "", "frames": 0, **{n: 0 for n in names}}
    for c in cases:
        frames = frames_by_case.get(c.name, [])
        row = {"case": c.name, "kind": c.kind, "split": split_of.get(c.name, "") if frames else "(no labels)",
               "frames": len(frames), **{n: 0 for n in names}}
        for fr in frames:
            for n, k in fr.objects.items():
                row[n] = row.get(n, 0) + k
        rows.append(row)
        for k in ("frames", *names):
            total[k] += row.get(k, 0)
    rows.append(total)
    return rows


def write_preview(path: str | os.PathLike, frames: Sequence[Frame], labels: Mapping[int, str] | None = None,
                  n: int = 8, tile: int = 160, columns: int = 4, alpha: float = 0.45) -> Path | None:
    """A grid of up to `n` frames (spread over the dataset) with coloured mask overlays, as PNG."""
    from PIL import Image

    if not frames:
        return None
    idx = np.unique(np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int))
    label_values = sorted(labels) if labels else [255]
    cols = min(columns, len(idx))
    rows = (len(idx) + cols - 1) // cols
    grid = Image.new("RGB", (cols * tile, rows * tile), (0, 0, 0))
    for j, i in enumerate(idx):
        fr = frames[i]
        img = fr.image if fr.image.ndim == 3 else np.repeat(fr.image[..., None], 3, axis=2)
        rgb = img.astype(np.float32)
        for c, value in enumerate(label_values):
            m = fr.mask == value
            if m.any():
                rgb[m] = (1 - alpha) * rgb[m] + alpha * np.array(OVERLAY_COLORS[c % len(OVERLAY_COLORS)], np.float32)
        im = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
        im.thumbnail((tile, tile), Image.Resampling.NEAREST)
        x, y = (j % cols) * tile, (j // cols) * tile
        grid.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


# ------------------------------------------------------------------------------------ folders
def find_pairs(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, segmentation) pairs in a folder: `<name>.seg.nrrd` with `<name>.<image ext>` (also
    `<name>_seg.seg.nrrd`, `<name> segmentation.seg.nrrd`, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder '{folder}' does not exist: choose a folder with .seg.nrrd files and images")
    pairs = []
    for seg in sorted(folder.glob("*.seg.nrrd")):
        stem = seg.name[: -len(".seg.nrrd")]
        image = None
        for suffix in SEG_SUFFIXES:
            if suffix and not stem.endswith(suffix):
                continue
            base = stem[: len(stem) - len(suffix)] if suffix else stem
            for ext in IMAGE_EXTS:
                cand = folder / f"{base}{ext}"
                if cand.is_file() and not cand.name.endswith(".seg.nrrd"):
                    image = cand
                    break
            if image is not None:
                break
        if image is not None:
            pairs.append((image, seg))
    return pairs


def load_volume_file(ctx, path: str | os.PathLike, name: str | None = None):
    """An image file into a scalar (grey) or vector (colour) volume node, read with SimpleITK.

    Geometry as Slicer loads it: ITK's LPS origin/direction converted to RAS.
    """
    import SimpleITK as sitk
    from UniUltraSegmentLib.geometry import volume_node

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"'{path}' could not be read as an image ({exc}): use NRRD, NIfTI, MHA or PNG") from exc
    if img.GetDimension() == 2:
        img = sitk.JoinSeries(img)
    arr = sitk.GetArrayFromImage(img)  # (K, J, I[, C])
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp == 4:
        arr = arr[..., :3]
        ncomp = 3
    direction = np.array(img.GetDirection(), float).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = lps_to_ras @ direction @ np.diag(img.GetSpacing())
    m[:3, 3] = lps_to_ras @ np.array(img.GetOrigin(), float)
    node = volume_node(arr, m, name or path.name.split(".")[0], rgb=ncomp > 1)
    ctx.scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def cases_from_folder(ctx, folder: str | os.PathLike) -> list[Case]:
    """Load every (image, .seg.nrrd) pair of a folder into the scene and make Cases of them."""
    from UniUltraSegmentLib.sequences import load_segmentation

    pairs = find_pairs(folder)
    if not pairs:
        raise ValueError(
            f"no '<name>.seg.nrrd' with a matching '<name>.nrrd/.nii.gz/.png' image in '{folder}'"
        )
    cases = []
    for image_path, seg_path in pairs:
        name = image_path.name.split(".")[0]
        vol = load_volume_file(ctx, image_path, name)
        seg = load_segmentation(ctx, seg_path, f"{name} segmentation")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
        cases.append(Case(name, seg, vol, _volume_kind(vol)))
    return cases
