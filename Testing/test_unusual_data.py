"""Valid but unusual data through the `uniultra` command and its readers: each works correctly
(right size, orientation, labels) or, when it cannot be used, is one line ``uniultra: error: ...``
naming it, exit status 2, no output.  Small synthetic files only; the tiny random model (fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from cli_errors import assert_one_clean_line, run
from cli_errors import grey as _grey
from PIL import Image

from uniultra.cli import main
from uniultra.data.datasets import UniformDataset, mask_instances
from uniultra.data.io import read_frames, read_image, read_mask
from uniultra.errors import InputError
from uniultra.inference.predictor import check_box


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "img ü.png"  # a space and a non-ASCII letter in the name
    Image.fromarray(_grey()).save(p)
    return p


def _mask(path):
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------------------ images
@pytest.mark.parametrize("ext", ["png", "nii.gz", "dcm"])
def test_empty_file_says_it_is_empty(capsys, ckpt, tmp_path, ext):
    """A 0-byte file (a copy that failed) said "UnidentifiedImageError: cannot identify image file"."""
    (tmp_path / f"e.{ext}").write_bytes(b"")
    code, _, err = run(capsys, "segment", "--image", tmp_path / f"e.{ext}", "--box", 1, 1, 5, 5, "--model", ckpt,
                       "--out", tmp_path / "m.png")
    assert_one_clean_line(code, err, "the file is empty (0 bytes)")
    assert f"e.{ext}" in err and not (tmp_path / "m.png").exists()


def test_exif_rotated_jpeg_is_read_as_viewers_show_it(capsys, ckpt, tmp_path):
    """A JPEG whose EXIF says 'rotate 90' (phones, some scanners): boxes are drawn on the upright
    image, so it is read upright and the mask has its size (it was the stored 64x48, sideways)."""
    stored = _grey(48, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    Image.fromarray(stored).save(tmp_path / "rot.JPG", exif=exif.tobytes(), quality=100)
    a = read_image(tmp_path / "rot.JPG")
    assert a.shape == (64, 48)
    assert np.abs(a.astype(int) - np.rot90(stored, -1)).mean() < 3  # JPEG: nearly equal
    code, _, err = run(capsys, "segment", "--image", tmp_path / "rot.JPG", "--box", 5, 30, 40, 60,
                       "--model", ckpt, "--device", "cpu", "--out", tmp_path / "m.png")
    assert code == 0, err
    assert _mask(tmp_path / "m.png").shape == (64, 48)


@pytest.mark.parametrize("shape", [(1, 48, 64), (48, 1, 64), (48, 64, 1)])
def test_one_slice_stored_as_a_volume_is_one_image(capsys, ckpt, tmp_path, shape):
    """A 2D image saved as a 3D volume with its single slice on any axis: it was refused as '3D volume
    ... save one slice' (for (H, 1, W) and (H, W, 1)), and --clip sliced it into 1-pixel frames."""
    vol = np.random.default_rng(0).random(shape).astype(np.float32)
    path = tmp_path / "one slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(path))
    flat = vol.reshape(48, 64)
    assert np.array_equal(read_image(path), flat)
    frames = read_frames(path)
    assert len(frames) == 1 and np.array_equal(frames[0], flat)
    code, _, err = run(capsys, "segment", "--image", path, "--box", 5, 5, 40, 30, "--model", ckpt,
                       "--device", "cpu", "--out", tmp_path / "m.png")
    assert code == 0, err
    assert _mask(tmp_path / "m.png").shape == (48, 64)


@pytest.mark.parametrize("ext", ["tif", "gif"])
def test_multi_page_file(capsys, ckpt, tmp_path, ext):
    """A multi-page TIFF/GIF was read as its first page, silently (segment used page 1, --clip
    said 'frames 0..0'): one image refuses it in one line, a clip reads every page."""
    pages = [Image.fromarray(_grey(seed=k)) for k in range(3)]
    path = tmp_path / f"cine.{ext}"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert len(read_frames(path)) == 3
    code, _, err = run(capsys, "segment", "--image", path, "--box", 5, 5, 40, 30, "--model", ckpt,
                       "--device", "cpu", "--out", tmp_path / "m.png")
    assert_one_clean_line(code, err, "is a multi-page file (3 pages)")
    assert not (tmp_path / "m.png").exists()
    code, _, err = run(capsys, "propagate", "--clip", path, "--frame", 2, "--box", 5, 5, 40, 30, "--model", ckpt,
                       "--device", "cpu", "--out-dir", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"frame_000{k}.png" for k in range(3)]


# ------------------------------------------------------------------------------ boxes
def test_reversed_box_is_the_same_box(capsys, ckpt, img, tmp_path):
    """Corners in either order (x1 < x0, y1 < y0) are one box (they were refused as 'empty')."""
    masks = []
    for k, box in enumerate([(5, 5, 40, 30), (40, 30, 5, 5), (40, 5, 5, 30)]):
        code, _, err = run(capsys, "segment", "--image", img, "--box", *box, "--model", ckpt, "--device", "cpu",
                           "--out", tmp_path / f"m{k}.png")
        assert code == 0, err
        masks.append(_mask(tmp_path / f"m{k}.png"))
    (tmp_path / "p.csv").write_text(f"id,image,x0,y0,x1,y1\na,{img.name},40,30,5,5\n", encoding="utf-8")
    code, _, err = run(capsys, "segment", "--prompts", tmp_path / "p.csv", "--out-dir", tmp_path / "out",
                       "--model", ckpt, "--device", "cpu")
    assert code == 0, err
    masks.append(_mask(tmp_path / "out" / "a.png"))
    assert all(np.array_equal(m, masks[0]) for m in masks)


@pytest.mark.parametrize("where", ["segment", "csv", "propagate"])
def test_zero_area_box_is_refused(capsys, ckpt, img, tmp_path, where):
    """A box of zero width or height (a click, not a box) gave an empty mask, silently."""
    box = (20, 5, 20, 30)
    if where == "segment":
        argv = ["segment", "--image", img, "--box", *box, "--out", tmp_path / "m.png"]
    elif where == "csv":
        (tmp_path / "p.csv").write_text(f"id,image,x0,y0,x1,y1\na,{img.name},{','.join(map(str, box))}\n")
        argv = ["segment", "--prompts", tmp_path / "p.csv", "--out-dir", tmp_path / "out"]
    else:
        argv = ["propagate", "--clip", img, "--frame", 0, "--box", *box, "--out-dir", tmp_path / "out"]
    code, _, err = run(capsys, *argv, "--model", ckpt, "--device", "cpu")
    assert_one_clean_line(code, err, "box (20, 5, 20, 30) is empty: it has zero width")
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "out").exists()


def test_box_partly_outside_is_clipped_wholly_outside_refused(capsys, ckpt, img, tmp_path):
    assert check_box((-20, -5, 30.4, 500), (48, 64)) == (0, 0, 30, 47)
    assert check_box((63.4, 0, 90, 10), (48, 64)) == (63, 0, 63, 10)  # 63.4 lies in the last pixel column
    assert check_box((90, 10, 63.4, 0), (48, 64)) == (63, 0, 63, 10)
    with pytest.raises(InputError, match="give finite numbers"):  # was a ValueError from round(nan)
        check_box((float("nan"), 0, 5, 5), (48, 64))
    code, _, err = run(capsys, "segment", "--image", img, "--box", 64.6, 5, 90, 30, "--model", ckpt,
                       "--device", "cpu", "--out", tmp_path / "m.png")
    assert_one_clean_line(code, err, "--box (64.6, 5, 90, 30) lies outside the 64x48 image")
    assert not (tmp_path / "m.png").exists()


# ------------------------------------------------------------------------------ masks
def _encodings():
    m = np.zeros((48, 64), np.uint8)
    m[10:30, 15:45] = 255
    m[35:45, 50:60] = 255
    return m, {
        "0-255.png": lambda p: Image.fromarray(m).save(p),
        "0-1.png": lambda p: Image.fromarray((m > 0).astype(np.uint8)).save(p),
        "bool.png": lambda p: Image.fromarray(m > 0).save(p),
        "16bit.png": lambda p: Image.fromarray((m > 0).astype(np.uint16) * 65535).save(p),
        "rgb.png": lambda p: Image.fromarray(np.dstack([m, 0 * m, 0 * m])).save(p),
        "palette.png": lambda p: Image.fromarray(m).convert("P").save(p),
        "0-255.jpg": lambda p: Image.fromarray(m).save(p, quality=75),
        "rgb.jpeg": lambda p: Image.fromarray(np.dstack([m, m, 0 * m])).save(p, quality=75),
    }


@pytest.mark.parametrize("name", list(_encodings()[1]))
def test_mask_encodings_mean_the_same_objects(tmp_path, name):
    """0/255, 0/1, bool, 16-bit, RGB, palette masks: the same two objects.  A JPEG mask (lossy) gave
    hundreds of 'objects', one per value that compression left along the edges."""
    m, enc = _encodings()
    enc[name](tmp_path / name)
    inst = mask_instances(read_mask(tmp_path / name))
    assert [t.box for t in inst] == [(15, 10, 44, 29), (50, 35, 59, 44)]
    if not name.endswith((".jpg", ".jpeg")):
        assert [t.area for t in inst] == [600, 100]


def test_dataset_with_unusual_masks_and_split_csv(tmp_path):
    """split.csv with a byte-order mark, Windows line ends, spaces and trailing blank lines; masks
    as 0/1, JPEG and upper-case extensions; an image with an empty mask."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    m, enc = _encodings()
    for rid, how in [("a", "0-1.png"), ("b", "0-255.jpg"), ("c", None)]:
        Image.fromarray(_grey()).save(root / "images" / f"{rid}.PNG")
        if how:
            enc[how](root / "masks" / f"{rid}{'.JPG' if how.endswith('jpg') else '.png'}")
        else:
            Image.fromarray(np.zeros((48, 64), np.uint8)).save(root / "masks" / "c.png")
    (root / "split.csv").write_bytes("\ufeffid , split\r\n a , test \r\nb,test\r\nc,test\r\n\r\n\r\n".encode())
    ds = UniformDataset(root, "test")
    assert [r.id for r in ds.records] == ["a", "b", "c"]
    assert [len(ds.instances(i)) for i in range(3)] == [2, 2, 0]


def test_split_names_match_without_regard_to_case(tmp_path):
    """A split.csv edited in a spreadsheet may say Test or TRAIN; those are the usual splits."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "images" / f"a{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / f"a{i}.png")
    (root / "split.csv").write_text("id,split\na0,Train\na1,TEST\na2,test\n")
    assert [r.id for r in UniformDataset(root, "test").records] == ["a1", "a2"]
    assert [r.id for r in UniformDataset(root, "TRAIN").records] == ["a0"]
    assert UniformDataset(root, None).split_names == {"train", "test"}


def test_a_slicer_sequence_is_not_one_image(tmp_path, capsys):
    """A .seq.nrrd cine given where one image is expected names propagate --clip (it said the file
    had 3 'components per pixel'); a one-frame sequence is that frame."""
    from uniultra.data.io import write_seq_nrrd

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (40, 50), dtype=np.uint8) for _ in range(3)]
    write_seq_nrrd(tmp_path / "c.seq.nrrd", frames)
    with pytest.raises(InputError, match=r"sequence \(cine\) of 3 frames.*propagate --clip"):
        read_image(tmp_path / "c.seq.nrrd")
    assert [np.array_equal(a, b) for a, b in zip(read_frames(tmp_path / "c.seq.nrrd"), frames)] == [True] * 3
    write_seq_nrrd(tmp_path / "one.seq.nrrd", frames[:1])
    assert np.array_equal(read_image(tmp_path / "one.seq.nrrd"), frames[0])
    rc = main(["segment", "--image", str(tmp_path / "c.seq.nrrd"), "--box", "5", "5", "30", "30",
               "--out", str(tmp_path / "m.png")])
    assert_one_clean_line(rc, capsys.readouterr().err, "propagate --clip")
    assert not (tmp_path / "m.png").exists()


def test_a_folder_without_split_csv_is_evaluated_whole(tmp_path, capsys):
    """images/ + masks/ without split.csv (someone's own data): evaluate scores every image;
    training asks for a split.csv in one line."""
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, ext in enumerate([".png", ".PNG", ".jpg"]):
        img = rng.integers(0, 255, (48, 64), dtype=np.uint8)
        m = np.zeros((48, 64), np.uint8)
        m[10:30, 15 + i:40 + i] = 255
        Image.fromarray(img).save(root / "images" / f"case {i}{ext}")
        Image.fromarray(m).save(root / "masks" / f"case {i}.png")
    (root / "images" / "notes.txt").write_text("not an image")
    ds = UniformDataset(root, "test")
    assert ds.unsplit and [r.id for r in ds.records] == ["case 0", "case 1", "case 2"]
    assert len(UniformDataset(root, None)) == 3
    with pytest.raises(InputError, match="no split.csv.*add split.csv"):
        UniformDataset(root, "train")
    rc = main(["evaluate", "--data", str(root), "--json", "--model", "uniultra-student-e8"])
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out)["datasets"]["mine"]["n_images"] == 3
    rc = main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--model", "uniultra-student-e8",
               "--steps", "1"])
    assert_one_clean_line(rc, capsys.readouterr().err, "no split.csv")
    (root / "images" / "case 0.jpg").write_bytes((root / "images" / "case 2.jpg").read_bytes())
    with pytest.raises(InputError, match="two images named 'case 0'"):
        UniformDataset(root, "test")
