"""Image / frame readers on real files, writers' atomicity, InputError messages."""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from uniultra.data import io as uio
from uniultra.data.io import overlay_png, read_frames, read_image, write_mask_png, write_seq_nrrd
from uniultra.errors import InputError


def test_read_real_png(dataset_root):
    p = next((dataset_root("busi") / "images").glob("*.png"))
    a = read_image(p)
    assert a.dtype == np.uint8 and a.ndim == 2 and max(a.shape) <= 384


def test_pil_modes(tmp_path):
    g16 = (np.arange(200 * 3, dtype=np.uint16).reshape(20, 30) * 50)
    Image.fromarray(g16).save(tmp_path / "a.tif")
    a = read_image(tmp_path / "a.tif")
    assert a.dtype == np.uint16 and np.array_equal(a, g16)
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 1] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    assert read_image(tmp_path / "b.png").shape == (5, 6, 3)
    Image.fromarray(rgba[..., :3]).save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg").shape == (5, 6, 3)
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "d.bmp")
    assert read_image(tmp_path / "d.bmp").shape == (5, 6, 3)


def test_itk_formats_and_volume_slicing(tmp_path):
    vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # [k, j, i]
    for name in ("v.nrrd", "v.nii.gz", "v.mha"):
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / name))
        frames = read_frames(tmp_path / name)
        assert len(frames) == 4 and np.array_equal(frames[2], vol[2])
        assert np.array_equal(read_frames(tmp_path / name, axis=2)[1], vol[:, :, 1])
        with pytest.raises(InputError, match="3D volume"):
            read_image(tmp_path / name)
    sitk.WriteImage(sitk.GetImageFromArray(vol[:1]), str(tmp_path / "one.nrrd"))
    assert np.array_equal(read_image(tmp_path / "one.nrrd"), vol[0])
    sitk.WriteImage(sitk.GetImageFromArray(vol[0]), str(tmp_path / "two.nii"))
    assert np.array_equal(read_image(tmp_path / "two.nii"), vol[0])


def test_palette_dicom_frames(echo_dicom):
    frames = read_frames(echo_dicom)
    assert len(frames) == 10
    f = frames[0]
    assert f.shape == (430, 600, 3) and f.dtype == np.uint8
    assert f.max() > 200  # 16-bit LUT scaled to 8 bits, not clipped/empty
    assert not np.array_equal(f[..., 0], f[..., 2])  # colour content survives the palette
    with pytest.raises(InputError, match="multi-frame"):
        read_image(echo_dicom)


def test_ybr_dicom_frames():
    from pydicom import examples

    p = examples.get_path("ybr_color")
    frames = read_frames(p)
    assert len(frames) == 30 and frames[0].shape == (240, 320, 3) and frames[0].dtype == np.uint8
    # pydicom's own RGB conversion agrees (our frames are RGB, not YBR)
    ref = pydicom.dcmread(p).pixel_array  # pydicom 3 returns RGB for JPEG YBR by default
    assert np.abs(frames[5].astype(int) - ref[5].astype(int)).max() <= 1


def test_single_frame_dicom(tmp_path):
    from pydicom import examples

    ds = examples.ct
    a = read_image(examples.get_path("ct"))
    assert a.shape == (ds.Rows, ds.Columns) and np.array_equal(a, ds.pixel_array)
    # no extension: detected by the DICM magic
    (tmp_path / "IMG0001").write_bytes(open(examples.get_path("ct"), "rb").read())
    assert read_image(tmp_path / "IMG0001").shape == a.shape
    assert len(read_frames(tmp_path / "IMG0001")) == 1


@pytest.mark.parametrize("rgb", [False, True])
def test_seq_nrrd_round_trip(tmp_path, rgb):
    rng = np.random.default_rng(1)
    shape = (12, 17, 3) if rgb else (12, 17)
    frames = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(5)]
    p = write_seq_nrrd(tmp_path / "c.seq.nrrd", frames)
    got = read_frames(p)
    assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(frames, got))


def test_seq_nrrd_slicer_style_list_first(tmp_path):
    """Slicer may also store the list axis first (fastest); the parser follows the 'list' kind."""
    arr = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(4, 5, 3)  # numpy [j, i, list]
    hdr = ("NRRD0004\ntype: uint16\ndimension: 4\nspace: left-posterior-superior\nsizes: 3 5 4 1\n"
           "space directions: none (1,0,0) (0,1,0) (0,0,1)\nkinds: list domain domain domain\n"
           "endian: little\nencoding: raw\nspace origin: (0,0,0)\n\n")
    p = tmp_path / "s.seq.nrrd"
    p.write_bytes(hdr.encode() + arr.astype("<u2").tobytes())
    frames = read_frames(p)
    assert len(frames) == 3 and frames[1].shape == (4, 5) and np.array_equal(frames[1], arr[:, :, 1])


def test_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="bad.dcm"):
        read_frames(tmp_path / "bad.dcm")
    (tmp_path / "bad.nrrd").write_bytes(b"garbage")
    with pytest.raises(InputError, match="bad.nrrd"):
        read_frames(tmp_path / "bad.nrrd")
    (tmp_path / "x.weird").write_bytes(b"??")
    with pytest.raises(InputError, match="unsupported"):
        read_image(tmp_path / "x.weird")
    with pytest.raises(InputError, match="folder"):
        read_image(tmp_path)
    assert issubclass(InputError, ValueError)


def test_write_mask_png(tmp_path):
    m = np.zeros((7, 9), bool)
    m[2:4, 3:6] = True
    p = write_mask_png(tmp_path / "sub" / "m.png", m)
    a = np.array(Image.open(p))
    assert a.dtype == np.uint8 and set(np.unique(a)) == {0, 255} and np.array_equal(a == 255, m)
    assert [f.name for f in (tmp_path / "sub").iterdir()] == ["m.png"]


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    dest = tmp_path / "m.png"
    write_mask_png(dest, np.ones((4, 4), bool))
    before = dest.read_bytes()

    def boom(self, fp, *a, **k):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        write_mask_png(dest, np.zeros((4, 4), bool))
    with pytest.raises(OSError):
        overlay_png(tmp_path / "o.png", np.zeros((4, 4), np.uint8), [np.ones((4, 4), bool)])
    assert dest.read_bytes() == before  # old file untouched
    assert sorted(os.listdir(tmp_path)) == ["m.png"]  # no temp or partial files


def test_overlay_png(tmp_path):
    img = np.linspace(0, 1000, 40 * 50).reshape(40, 50).astype(np.float32)
    m = np.zeros((40, 50), bool)
    m[10:30, 10:30] = True
    p = overlay_png(tmp_path / "o.png", img, [m], boxes=[(10, 10, 29, 29)], points=[(20, 20), (40, 5)], labels=[1, 0])
    a = np.array(Image.open(p))
    assert a.shape == (40, 50, 3)
    assert tuple(a[20, 20]) == (0, 255, 0) and tuple(a[5, 40]) == (255, 0, 0)
    assert a[15, 15, 0] > a[15, 15, 1]  # red-tinted inside the mask
    with pytest.raises(InputError, match="shape"):
        uio.render_overlay(img, [np.zeros((3, 3), bool)])


def test_monochrome1_inverted(tmp_path):
    from pydicom import examples

    ds = pydicom.dcmread(examples.get_path("ct"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    a, b = read_image(tmp_path / "m1.dcm").astype(int), ds.pixel_array.astype(int)
    assert (a + b == b.max() + b.min()).all()
