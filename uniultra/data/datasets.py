"""Datasets: the uniform folder layout, instances, weighted mixing and a torch training dataset.

Uniform layout (the shared data's README, ``../shared/data/README.md`` beside the checkout)::

    <root>/images/<id>.png   <root>/masks/<id>.png   <root>/split.csv (id,split[,clip,frame])
    <root>/meta.json

A folder with images/ and masks/ but no split.csv (a user's own data) is a dataset whose every
image is a test image: ``uniultra evaluate`` scores it; training asks for a split.csv.

Instances: one per 8-connected component per non-zero label value (255 is a label like any
other), optionally dropping components smaller than ``min_area_frac`` of the image
(SAM-UNet drops < 0.153%: ``min_area_frac=0.00153``).
"""

from __future__ import annotations

import csv
import glob
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from uniultra.checks import image_array
from uniultra.data import prompts as P
from uniultra.data.io import read_image, read_mask
from uniultra.data.transforms import (
    box_to_model,
    image_to_model_coords,
    normalize_tensor,
    resize_chw,
    resize_mask,
)
from uniultra.errors import InputError

SAM_UNET_MIN_AREA = 0.00153
SPECK_OF_LARGEST = 0.01  # see mask_instances(drop_specks=True)
SPECK_OF_IMAGE = 0.001
_EIGHT = np.ones((3, 3), bool)


@dataclass
class Record:
    id: str
    image: Path
    mask: Path | None
    split: str
    clip: str | None = None
    frame: int | None = None


@dataclass
class Instance:
    mask: np.ndarray  # bool (H, W)
    label: int
    box: tuple[int, int, int, int]  # inclusive pixel box
    area: int


def mask_instances(label_map: np.ndarray, min_area_frac: float = 0.0, connectivity: int = 8,
                   drop_specks: bool = True) -> list[Instance]:
    """Split a label map into instances: one per connected component per non-zero label value,
    ordered by label then by component (scan order).  Components with area < ``min_area_frac *
    H * W`` are dropped.

    ``drop_specks``: a component smaller than both ``SPECK_OF_LARGEST`` of the largest component
    of the same label and ``SPECK_OF_IMAGE`` of the image is annotation noise, not an object anyone
    would box (CAMUS: resizing a multi-label mask leaves ~90 one-to-fifty-pixel slivers of one
    label along the border of two others, next to three structures of 650+ pixels); it gets no
    prompt.  It stays in the ground truth (``label_map != 0``) that Dice is measured against."""
    lm = np.asarray(label_map)
    if lm.ndim == 3:
        lm = np.where(lm.max(axis=2) > 0, 255, 0)
    if lm.dtype == np.bool_:
        lm = lm.astype(np.uint8)
    h, w = lm.shape
    min_area = min_area_frac * h * w
    struct = _EIGHT if connectivity == 8 else None
    out: list[Instance] = []
    for v in np.unique(lm):
        if v == 0:
            continue
        lab, n = ndi.label(lm == v, structure=struct)
        if n == 0:
            continue
        areas = np.bincount(lab.ravel(), minlength=n + 1)
        speck = min(SPECK_OF_LARGEST * areas[1:].max(), SPECK_OF_IMAGE * h * w) if drop_specks else 0
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl is None or areas[i] < min_area or areas[i] == 0 or areas[i] < speck:
                continue
            m = lab == i
            box = (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1)
            out.append(Instance(m, int(v), tuple(int(b) for b in box), int(areas[i])))
    return out


class UniformDataset:
    """Records of one dataset in the uniform layout.

    ``split``: ``"train" | "val" | "test"``, a list of them, or ``None``/``"all"`` for everything.
    ``records[i]`` is a :class:`Record`; :meth:`load` reads the image and its label map;
    :meth:`instances` the :class:`Instance` list; :meth:`clips` groups cine frames by clip."""

    def __init__(self, root, split: str | Sequence[str] | None = "train", min_area_frac: float = 0.0,
                 max_images: int | None = None):
        self.root = Path(root)
        self.name = self.root.name
        self.min_area_frac = float(min_area_frac)
        csv_path = self.root / "split.csv"
        # split names are matched without regard to case ("Test" in a spreadsheet is the test split)
        splits = (None if split in (None, "all")
                  else {str(x).lower() for x in ([split] if isinstance(split, str) else split)})
        # a folder of images/ and masks/ without split.csv (a user's own data): every image is a test image
        self.unsplit = not csv_path.is_file()
        if self.unsplit:
            rows = _unsplit_rows(self.root)
            if splits is not None and splits - {"test"}:
                raise InputError(f"'{self.root}' has no split.csv, so all its images are test images (for "
                                 f"`uniultra evaluate`); to use it as {'/'.join(sorted(splits - {'test'}))} data, "
                                 "add split.csv with rows id,split (train, val or test)")
        else:
            rows = _read_split_csv(csv_path)
        self.split = split
        self.records: list[Record] = []
        self.split_names: set[str] = set()
        seen: dict[str, int] = {}
        for line, row in rows:
            if "split" in row:
                row["split"] = row["split"].lower()
            self.split_names.add(row.get("split", ""))
            rid = row["id"]
            if rid and rid in seen:  # the same image counted twice, or in two splits (train/test leakage)
                raise InputError(f"{csv_path} line {line}: id '{rid}' appears twice (also line {seen[rid]}); "
                                 "give each image one row")
            seen[rid] = line
            if rid and ("/" in rid or "\\" in rid or rid in (".", "..") or "\0" in rid):
                raise InputError(f"{csv_path} line {line}: id {rid[:60]!r} must be a file name in images/ "
                                 "(no / or \\), without its extension")
            if splits is not None and row.get("split") not in splits:
                continue
            if not rid:
                raise InputError(f"{csv_path} line {line}: empty id; give every row an id")
            img = self._find(self.root / "images", rid)
            if img is None:
                raise InputError(f"{csv_path} line {line}: image for id '{rid}' is missing in "
                                 f"'{self.root / 'images'}'; fix split.csv or add it")
            msk = self._find(self.root / "masks", rid)
            clip = row.get("clip") or None
            frame = row.get("frame") or None
            if frame is not None:
                try:
                    frame = int(frame)
                except ValueError:
                    raise InputError(f"{csv_path} line {line}: frame {frame!r} must be a whole number "
                                     "(the frame's index in its clip)") from None
            self.records.append(Record(rid, img, msk, row.get("split", ""), clip, frame))
        meta = self.root / "meta.json"
        try:
            self.meta = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise InputError(f"{meta}: not valid JSON ({str(e).splitlines()[0][:80]}); fix or remove it") from None
        if max_images is not None:
            self.records = spread(self.records, max_images)


    @staticmethod
    def _find(folder: Path, rid: str) -> Path | None:
        p = folder / f"{rid}.png"
        if p.is_file():
            return p
        hits = sorted(folder.glob(f"{glob.escape(rid)}.*"))  # an id is a name, not a pattern ('*')
        return hits[0] if hits else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.records[i]
        img = image_array(read_image(r.image), f"image '{r.image}'")
        if r.mask is None:
            return img, np.zeros(img.shape[:2], np.uint8)
        m = read_mask(r.mask)
        if m.shape != img.shape[:2]:
            raise InputError(f"mask '{r.mask}' has shape {m.shape} but its image is {img.shape[:2]}; fix the mask")
        return img, m

    def instances(self, i: int, label_map: np.ndarray | None = None) -> list[Instance]:
        if label_map is None:
            label_map = self.load(i)[1]
        return mask_instances(label_map, self.min_area_frac)

    def clips(self) -> dict[str, list[int]]:
        """clip -> record indices sorted by frame (records without a clip are left out)."""
        out: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            if r.clip is not None:
                out.setdefault(r.clip, []).append(i)
        for k in out:
            out[k].sort(key=lambda j: (self.records[j].frame if self.records[j].frame is not None else 0))
        return out


def _unsplit_rows(root: Path) -> list[tuple[int, dict]]:
    """(0, {"id", "split": "test"}) for every image file in ``root/images`` of a folder without
    split.csv; an error when there is no such folder or two files share a name."""
    from uniultra.data.io import DICOM_EXT, ITK_EXT, PIL_EXT

    folder = root / "images"
    if not folder.is_dir():
        raise InputError(f"'{root}' is not a dataset folder (no split.csv, no images/); pass a folder with "
                         "images/ and masks/ (and split.csv to say which images are train, val or test)")
    exts = PIL_EXT + ITK_EXT + DICOM_EXT
    ids: dict[str, str] = {}
    for f in sorted(folder.iterdir()):
        name = f.name
        ext = next((e for e in sorted(exts, key=len, reverse=True) if name.lower().endswith(e)), None)
        if not f.is_file() or name.startswith(".") or ext is None:
            continue
        rid = name[: -len(ext)]
        if rid in ids:
            raise InputError(f"'{folder}' holds two images named {rid!r} ({ids[rid]}, {name}); keep one")
        ids[rid] = name
    if not ids:
        raise InputError(f"'{folder}' holds no images ({', '.join(PIL_EXT + ITK_EXT)} or DICOM files)")
    return [(0, {"id": rid, "split": "test"}) for rid in ids]


def _read_split_csv(path: Path) -> list[tuple[int, dict]]:
    """(line, row) of a dataset's split.csv: header id[,split,clip,frame...]; a UTF-8 byte-order
    mark (as spreadsheet programs save) is fine, stray spaces around names and values too."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if "id" not in header:
                raise InputError(f"{path} line 1: the header {','.join(header) or '(empty)'} lacks 'id'; "
                                 "it must be id,split (optionally clip,frame)")
            rows = []
            for line, vals in enumerate(reader, start=2):
                if not any(v.strip() for v in vals):
                    continue
                if len(vals) > len(header):
                    raise InputError(f"{path} line {line}: {len(vals)} values but {len(header)} columns in the header")
                rows.append((line, {h: v.strip() for h, v in zip(header, vals)}))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; save it as UTF-8 (CSV UTF-8 in spreadsheet programs)") from None
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV file ({e})") from None
    return rows


def spread(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced over their order (so that near-duplicate
    neighbours, such as consecutive cine frames, are thinned first); all of them if fewer."""
    if int(n) != n or n < 1:
        raise InputError(f"max images {n!r} must be a whole number of at least 1")
    if len(items) <= n:
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, int(n)).round().astype(int))
    return [items[i] for i in idx]


def find_datasets(root) -> list[Path]:
    """``root`` itself when it is a dataset (split.csv, or images/ and masks/ without one), else its
    sub-folders that are (sorted)."""
    root = Path(root)

    def is_dataset(p: Path) -> bool:
        return (p / "split.csv").is_file() or ((p / "images").is_dir() and (p / "masks").is_dir())

    if is_dataset(root):
        return [root]
    found = sorted(p for p in root.iterdir() if is_dataset(p)) if root.is_dir() else []
    if not found:
        raise InputError(f"no dataset found in '{root}' (no images/ and masks/, nor split.csv, there or in its "
                         "sub-folders); check the path")
    return found


# ---------------------------------------------------------------------------------------------
class Combined(torch.utils.data.ConcatDataset):
    """Concatenation with per-dataset sampling weights.  ``sample_weights`` gives each item the
    weight ``w_d / len(d)`` so that dataset d is drawn with probability ``w_d / sum(w)``."""

    def __init__(self, datasets, weights=None):
        super().__init__(datasets)
        w = np.ones(len(datasets)) if weights is None else np.asarray(weights, np.float64)
        if len(w) != len(datasets) or (w < 0).any() or w.sum() <= 0:
            raise InputError("dataset weights must be one non-negative number per dataset, not all zero")
        self.weights = w / w.sum()
        per = [np.full(len(d), wd / max(len(d), 1)) for d, wd in zip(datasets, self.weights)]
        self.sample_weights = np.concatenate(per) if per else np.zeros(0)


def combine(datasets, weights=None) -> Combined:
    """Weighted mixture of datasets (see :class:`Combined`)."""
    return Combined(list(datasets), weights)


class PromptSegDataset(torch.utils.data.Dataset):
    """Fixed-size training samples with simulated prompts.

    Each item is a dict of tensors (default-collatable):

    * ``image`` ``[3, S, S]`` float32 ImageNet-normalised,
    * ``masks`` ``[N, M, M]`` float32 0/1 GT per instance (``M = S // mask_div``, default S/4),
    * ``boxes`` ``[N, 4]`` model-space boxes (zeros where the prompt has no box), ``has_box`` ``[N]``,
    * ``point_coords`` ``[N, P, 2]`` model space, ``point_labels`` ``[N, P]`` (1/0, -1 = padding),
    * ``valid`` ``[N]`` bool (padding rows are False), ``index`` the source index.

    ``N = max_instances`` (instances drawn at random without replacement when there are more),
    ``P = n_pos + n_neg`` (at least 1).  Randomness is seeded by ``(seed, epoch, index)``; call
    :meth:`set_epoch` each epoch.  ``augment=True`` wraps ``source`` in the training augmentation
    (:class:`uniultra.data.augment.AugmentedSource` with ``aug_options``, salted by the epoch).
    ``source``: a :class:`UniformDataset` or any object with ``__len__`` and ``load(i) -> (image, label_map)``.
    """

    def __init__(self, source, size: int = 1024, mask_div: int = 4, max_instances: int = 1,
                 prompt: str = "mixed", jitter: float = 0.05, shift_px: float = 0, n_pos: int = 1, n_neg: int = 0,
                 augment: bool = False, min_area_frac: float = 0.0, seed: int = 0, aug_options: dict | None = None):
        if prompt not in P.PROMPT_KINDS:
            raise InputError(f"unknown prompt kind '{prompt}'; use one of {', '.join(P.PROMPT_KINDS)}")
        self.source, self.size, self.mask_div = source, int(size), int(mask_div)
        self.max_instances, self.prompt, self.jitter, self.shift_px = int(max_instances), prompt, jitter, shift_px
        self.n_pos, self.n_neg, self.augment = int(n_pos), int(n_neg), bool(augment)
        self.min_area_frac = float(min_area_frac)
        self.seed, self.epoch = int(seed), 0
        self.aug_options = aug_options or {}
        if self.augment:
            from uniultra.data.augment import AugmentedSource

            self.source = AugmentedSource(source, self.seed, size=self.size, **self.aug_options)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.augment:
            self.source.salt = self.epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        from uniultra.data.transforms import scale_intensity

        image, lab = self.source.load(i)
        img = scale_intensity(image)
        h, w = lab.shape
        inst = mask_instances(lab, self.min_area_frac)
        if len(inst) > self.max_instances:
            pick = rng.choice(len(inst), self.max_instances, replace=False)
            inst = [inst[k] for k in sorted(pick)]
        S, M = self.size, self.size // self.mask_div
        N, Pn = self.max_instances, max(1, self.n_pos + self.n_neg)
        x = normalize_tensor(resize_chw(torch.from_numpy(img).permute(2, 0, 1).contiguous(), S))
        masks = torch.zeros(N, M, M)
        boxes = torch.zeros(N, 4)
        has_box = torch.zeros(N, dtype=torch.bool)
        pc = torch.zeros(N, Pn, 2)
        pl = torch.full((N, Pn), -1, dtype=torch.long)
        valid = torch.zeros(N, dtype=torch.bool)
        union = np.any(np.stack([t.mask for t in inst]), 0) if inst else None
        for k, t in enumerate(inst):
            pr = P.simulate_prompt(t.mask, rng, self.prompt, self.jitter, self.shift_px, self.n_pos, self.n_neg,
                                   avoid=union)
            masks[k] = resize_mask(t.mask, M)
            if pr.box is not None:
                boxes[k] = torch.as_tensor(box_to_model(pr.box, (h, w), S), dtype=torch.float32)
                has_box[k] = True
            if len(pr.points):
                n = min(len(pr.points), Pn)
                pc[k, :n] = torch.as_tensor(image_to_model_coords(pr.points[:n], (h, w), S), dtype=torch.float32)
                pl[k, :n] = torch.as_tensor(pr.labels[:n])
            valid[k] = True
        return {"image": x, "masks": masks, "boxes": boxes, "has_box": has_box, "point_coords": pc,
                "point_labels": pl, "valid": valid, "index": int(i)}


def stable_seed(*parts) -> int:
    """A process-independent integer from strings/ints (for per-item seeding)."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode())
