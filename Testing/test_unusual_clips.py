"""Valid but unusual cine clips, volumes and frame lists through `uniultra propagate` and
`uniultra batch`: each works (right frame count, masks of the frame size, outputs named as
documented) or, when it cannot be used, is one line ``uniultra: error: ...`` naming the input and
what to do, exit status 2, no output.  Small synthetic files only; the tiny random model (fast)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from cli_errors import assert_one_clean_line, run
from cli_errors import grey as _grey
from PIL import Image

from uniultra.data.io import read_frames, write_seq_nrrd


def _masks(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def _dicom_cine(path, n=3, h=48, w=64):
    """A small multi-frame MONOCHROME2 DICOM (as an ultrasound cine), written without extension."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.stack([_grey(h, w, i) for i in range(n)]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------ propagate --clip
@pytest.mark.parametrize("kind", ["one.seq.nrrd", "two.seq.nrrd", "rgb.seq.nrrd", "anim.gif", "pages.tif",
                                  "t4.nii.gz", "vol.nii.gz"])
def test_unusual_clips_propagate_to_one_mask_per_frame(capsys, ckpt, tmp_path, kind):
    """1- and 2-frame sequences, a colour sequence, an animated GIF, a multi-page TIFF, a 4D NIfTI
    with a singleton slice axis and an anisotropic 3D NIfTI: one mask per frame, of the frame size
    (64x48), the key frame the last one, and a box partly outside the image clipped to it."""
    n = {"one.seq.nrrd": 1, "two.seq.nrrd": 2}.get(kind, 4)
    frames = [_grey(seed=i) for i in range(n)]
    path = tmp_path / kind
    if kind.endswith(".seq.nrrd"):
        write_seq_nrrd(path, [np.stack([f] * 3, -1) for f in frames] if kind == "rgb.seq.nrrd" else frames)
    elif kind in ("anim.gif", "pages.tif"):
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(path, save_all=True, append_images=ims[1:])
    else:
        a = np.stack(frames)[:, None] if kind == "t4.nii.gz" else np.stack(frames)  # [t, k=1, j, i] or [k, j, i]
        img = sitk.GetImageFromArray(a, isVector=False)
        img.SetSpacing((0.3, 0.5, 2.0, 1.0)[: img.GetDimension()])
        sitk.WriteImage(img, str(path))
    code, out, err = run(capsys, "propagate", "--clip", path, "--frame", n - 1, "--box", -10, 5, 40, 30,
                         "--model", ckpt, "--device", "cpu", "--out-dir", tmp_path / "out")
    assert code == 0, err
    masks = _masks(tmp_path / "out")
    assert list(masks) == [f"frame_{i:04d}.png" for i in range(n)]
    assert all(m.shape == (48, 64) for m in masks.values())
    assert f"{n} masks written" in out


@pytest.mark.parametrize("kind", ["c.seq.nrrd", "c.gif", "IM0001"])
def test_slice_axis_on_a_cine_is_refused_not_ignored(capsys, ckpt, tmp_path, kind):
    """--axis 1 on a cine (sequence, GIF, DICOM) was silently ignored: the frames were labelled
    in time order as if it had not been given.  It applies to 3D volumes only: one line."""
    frames = [_grey(seed=i) for i in range(3)]
    if kind == "c.seq.nrrd":
        write_seq_nrrd(tmp_path / kind, frames)
    elif kind == "c.gif":
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(tmp_path / kind, save_all=True, append_images=ims[1:])
    else:
        _dicom_cine(tmp_path / kind)
    code, _, err = run(capsys, "propagate", "--clip", tmp_path / kind, "--axis", 1, "--frame", 0, "--box", 5, 5, 40, 30,
                       "--model", ckpt, "--device", "cpu", "--out-dir", tmp_path / "out")
    assert_one_clean_line(code, err, f"slice axis 1 applies to 3D volumes, and '{tmp_path / kind}' is a cine")
    assert not (tmp_path / "out").exists()


def test_clip_folder_names_the_ways_to_label_it(capsys, ckpt, tmp_path):
    """A folder of frames given to --clip said "it is a folder; pass an image file": it names the
    --frames CSV and `uniultra batch`, which take one."""
    (tmp_path / "frames").mkdir()
    Image.fromarray(_grey()).save(tmp_path / "frames" / "0.png")
    code, _, err = run(capsys, "propagate", "--clip", tmp_path / "frames", "--frame", 0, "--box", 5, 5, 40, 30,
                       "--model", ckpt, "--device", "cpu", "--out-dir", tmp_path / "out")
    assert_one_clean_line(code, err, "is a folder")
    assert "--frames CSV" in err and "uniultra batch" in err
    assert not (tmp_path / "out").exists()


def test_clip_of_pages_of_two_sizes_names_the_clip(capsys, ckpt, tmp_path):
    """A multi-page TIFF whose pages differ in size said "frame 1 is (60, 80), frame 0 is (48, 64)"
    (height first, no file, after loading the model): one line naming the clip, width x height."""
    ims = [Image.fromarray(_grey(48, 64)), Image.fromarray(_grey(60, 80))]
    ims[0].save(tmp_path / "pages.tif", save_all=True, append_images=ims[1:])
    code, _, err = run(capsys, "propagate", "--clip", tmp_path / "pages.tif", "--frame", 0, "--box", 5, 5, 40, 30,
                       "--model", ckpt, "--device", "cpu", "--out-dir", tmp_path / "out")
    assert_one_clean_line(code, err, "pages.tif frame 1 is 80x60")
    assert "64x48" in err and "one size" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["clip", "csv"])
def test_key_box_outside_names_the_box_before_the_model_loads(capsys, tmp_path, where):
    """A key box wholly outside the frame said "box on frame 1 ..." (the frame's index, not the
    prompts CSV line or --box) after loading the model: one line naming it, before any loading
    (here the model does not even exist)."""
    write_seq_nrrd(tmp_path / "c.seq.nrrd", [_grey(seed=i) for i in range(2)])
    if where == "clip":
        argv = ["--clip", tmp_path / "c.seq.nrrd", "--frame", 1, "--box", 100, 100, 200, 200]
        expected = "--box (100, 100, 200, 200) lies outside the 64x48 image"
    else:
        for i in range(2):
            Image.fromarray(_grey(seed=i)).save(tmp_path / f"{i}.png")
        (tmp_path / "frames.csv").write_text("id,image\nfrâme a,0.png\nb,1.png\n", encoding="utf-8")
        (tmp_path / "prompts.csv").write_text("id,x0,y0,x1,y1\nb,100,100,200,200\n")
        argv = ["--frames", tmp_path / "frames.csv", "--prompts", tmp_path / "prompts.csv"]
        expected = "prompts.csv line 2: box (100, 100, 200, 200) lies outside the 64x48 image"
    code, _, err = run(capsys, "propagate", *argv, "--model", tmp_path / "missing.pt", "--device", "cpu",
                       "--out-dir", tmp_path / "out")
    assert_one_clean_line(code, err, expected)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ propagate --frames
def test_frames_csv_with_unicode_relative_and_absolute_paths(capsys, ckpt, tmp_path):
    d = tmp_path / "fr dir ü"
    (d / "sub ä").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_grey(seed=i)).save(d / "sub ä" / f"f {i} é.png")
    (d / "frames.csv").write_text(f"id,image\nfrâme 0,sub ä/f 0 é.png\nf1,sub ä/f 1 é.png\n"
                                  f"f2,{d / 'sub ä' / 'f 2 é.png'}\n", encoding="utf-8")
    (d / "prompts.csv").write_text("id,x0,y0,x1,y1\nf2,5,5,40,30\n", encoding="utf-8")
    code, _, err = run(capsys, "propagate", "--frames", d / "frames.csv", "--prompts", d / "prompts.csv",
                       "--model", ckpt, "--device", "cpu", "--out-dir", tmp_path / "out")
    assert code == 0, err
    masks = _masks(tmp_path / "out")
    assert sorted(masks) == ["f1.png", "f2.png", "frâme 0.png"]
    assert all(m.shape == (48, 64) for m in masks.values())


@pytest.mark.parametrize("image", ["missing.png", "cine.seq.nrrd"])
def test_frames_csv_row_with_an_unusable_image_names_the_line(capsys, ckpt, tmp_path, image):
    """A frames CSV row whose image is missing or is itself a cine said only "cannot read
    'missing.png'" / "'cine.seq.nrrd' is a sequence": in a long CSV, which row?  It names the line."""
    Image.fromarray(_grey()).save(tmp_path / "a.png")
    write_seq_nrrd(tmp_path / "cine.seq.nrrd", [_grey(seed=i) for i in range(2)])
    (tmp_path / "frames.csv").write_text(f"id,image\na,a.png\nb,{image}\n", encoding="utf-8")
    (tmp_path / "prompts.csv").write_text("id,x0,y0,x1,y1\na,5,5,40,30\n", encoding="utf-8")
    code, _, err = run(capsys, "propagate", "--frames", tmp_path / "frames.csv", "--prompts",
                       tmp_path / "prompts.csv", "--model", ckpt, "--device", "cpu", "--out-dir", tmp_path / "out")
    assert_one_clean_line(code, err, "frames.csv line 3: image")
    assert image in err
    assert not (tmp_path / "out").exists()


def test_frames_csv_of_two_sizes_names_the_line(capsys, ckpt, tmp_path):
    """Frames of different sizes in a frames CSV said "frame 1 is (60, 80), frame 0 is (48, 64)"
    after loading the model: one line naming the CSV line and image, width x height."""
    Image.fromarray(_grey(48, 64)).save(tmp_path / "a.png")
    Image.fromarray(_grey(60, 80)).save(tmp_path / "b.png")
    (tmp_path / "frames.csv").write_text("id,image\na,a.png\nb,b.png\n", encoding="utf-8")
    (tmp_path / "prompts.csv").write_text("id,x0,y0,x1,y1\na,5,5,40,30\n", encoding="utf-8")
    code, _, err = run(capsys, "propagate", "--frames", tmp_path / "frames.csv", "--prompts",
                       tmp_path / "prompts.csv", "--model", ckpt, "--device", "cpu", "--out-dir", tmp_path / "out")
    assert_one_clean_line(code, err, "frames.csv line 3: image")
    assert "b.png is 80x60" in err and "64x48" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ batch
def _batch(capsys, tmp_path, ckpt, manifest, *extra):
    return run(capsys, "batch", manifest, "--out-dir", tmp_path / "labels", "--model", ckpt, "--device", "cpu",
               *extra)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_batch_volume_keeps_its_anisotropic_spacing(capsys, ckpt, tmp_path, ext):
    """A NIfTI volume's spacing (0.3 x 0.5 mm, 2 mm slices) was written as 1 x 1 mm into the
    .seg.nrrd, .seq.nrrd and clip.json: the masks did not overlay the volume in Slicer.  Along
    numpy axis 1 the frames are i (0.3) by k (2.0) (a NRRD volume said 0.3 by 0.5)."""
    img = sitk.GetImageFromArray(np.stack([_grey(seed=i) for i in range(5)]))
    img.SetSpacing((0.3, 0.5, 2.0))
    sitk.WriteImage(img, str(tmp_path / f"vol{ext}"))
    (tmp_path / "clips.csv").write_text("name,clip,frame,structure,x0,y0,x1,y1,axis\n"
                                        f"k,vol{ext},4,A,5,5,40,30,0\nj,vol{ext},2,A,5,1,40,3,1\n")
    code, _, err = _batch(capsys, tmp_path, ckpt, tmp_path / "clips.csv")
    assert code == 0, err
    for name, spacing, frames in (("k", [0.3, 0.5], 5), ("j", [0.3, 2.0], 48)):
        meta = json.loads((tmp_path / "labels" / name / "clip.json").read_text())
        assert meta["frames"] == frames
        assert meta["spacing"] == spacing  # written as 6 significant digits, not 0.30000001192092896
        sp = sitk.ReadImage(str(tmp_path / "labels" / name / f"{name}.seq.nrrd")).GetSpacing()[:2]
        assert np.allclose(sp, spacing, atol=1e-6), sp  # the sequence: frame geometry
        seg = sitk.ReadImage(str(tmp_path / "labels" / name / f"{name}.seg.nrrd"))
        assert np.allclose(seg.GetSpacing(), (0.3, 0.5, 2.0), atol=1e-6)  # the segmentation: the volume's grid
        assert seg.GetSize() == (64, 48, 5)


def _oblique_volume(path, shape=(6, 7, 9)):
    """A small [k, j, i] volume with a rotated direction, an origin off zero and anisotropic spacing."""
    img = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8))
    img.SetSpacing((0.4, 0.7, 1.9))
    img.SetOrigin((-31.5, 12.25, 80.0))
    c, s = np.cos(0.5), np.sin(0.5)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array([[1.0, 0.0, 0.0], [0, 0, -1], [0, 1, 0]])
    img.SetDirection(tuple(rot.ravel()))
    sitk.WriteImage(img, str(path))
    return shape


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_batch_segmentation_of_a_volume_overlays_the_volume_in_slicer(tmp_path, axis):
    """Slices of an oblique NIfTI volume (origin off zero, rotated axes): the .seg.nrrd was written
    with origin 0 and frames as k whatever the axis, so in Slicer it lay away from the volume.  Now
    both are read with slicer-core and every segment voxel lands on the volume voxel it labels."""
    slicer = pytest.importorskip("slicer")
    import vtk
    from mrml_fixtures import mrml_context, read_file_into, read_segment_labelmap

    from uniultra.batch import _volume_geometry
    from uniultra.data.slicer_nrrd import write_segmentation_nrrd

    vol = tmp_path / "vol.nii.gz"
    shape = _oblique_volume(vol)
    frames = read_frames(vol, axis=axis)
    assert len(frames) == shape[axis]
    rng = np.random.default_rng(axis)
    masks = [rng.random(f.shape[:2]) < 0.3 for f in frames]  # structure 0, frame by frame
    expected = np.zeros(shape, bool)  # where each frame's mask lies in the volume's [k, j, i]
    for f, m in enumerate(masks):
        index = [slice(None)] * 3
        index[axis] = f
        expected[tuple(index)] = m
    geometry = _volume_geometry(vol, axis, frames)
    assert geometry is not None
    write_segmentation_nrrd(tmp_path / "v.seg.nrrd", [masks], ["A"], frames[0].shape[:2], volume=geometry)

    ctx = next(mrml_context())
    volume = read_file_into(ctx, slicer.vtkMRMLScalarVolumeNode(), slicer.vtkMRMLVolumeArchetypeStorageNode(), vol)
    seg = read_file_into(ctx, slicer.vtkMRMLSegmentationNode(), slicer.vtkMRMLSegmentationStorageNode(),
                         tmp_path / "v.seg.nrrd")
    lm, arr = read_segment_labelmap(seg, 0)
    e = lm.GetExtent()
    k, j, i = np.nonzero(arr)
    ijk = np.stack([i + e[0], j + e[2], k + e[4], np.ones_like(i)]).astype(float)
    m = vtk.vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)  # segment voxel -> RAS
    to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    volume.GetRASToIJKMatrix(m)
    to_vol = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    at = to_vol @ to_ras @ ijk
    assert np.allclose(at, np.round(at), atol=1e-3)  # on the volume's voxel centres
    got = np.zeros(shape, bool)
    vi, vj, vk = np.round(at[:3]).astype(int)
    got[vk, vj, vi] = True
    assert got.sum() == expected.sum() > 0
    assert np.array_equal(got, expected)


def test_batch_writes_the_volume_geometry_it_used(capsys, ckpt, tmp_path):
    """clip.json says on which grid the .seg.nrrd lies; a cine keeps the frame geometry (no volume)."""
    _oblique_volume(tmp_path / "vol.nii.gz")
    write_seq_nrrd(tmp_path / "cine.seq.nrrd", [_grey(seed=i) for i in range(2)])
    (tmp_path / "clips.csv").write_text("name,clip,frame,structure,x0,y0,x1,y1,axis\n"
                                        "v,vol.nii.gz,1,A,1,1,5,4,2\nc,cine.seq.nrrd,0,A,5,5,40,30,\n")
    code, _, err = _batch(capsys, tmp_path, ckpt, tmp_path / "clips.csv")
    assert code == 0, err
    meta = json.loads((tmp_path / "labels" / "v" / "clip.json").read_text())
    assert meta["volume"]["axis"] == 2 and np.allclose(meta["volume"]["origin"], (-31.5, 12.25, 80.0))
    seg = sitk.ReadImage(str(tmp_path / "labels" / "v" / "v.seg.nrrd"))
    src = sitk.ReadImage(str(tmp_path / "vol.nii.gz"))
    assert seg.GetSize() == src.GetSize()
    for a, b in ((seg.GetOrigin(), src.GetOrigin()), (seg.GetSpacing(), src.GetSpacing()),
                 (seg.GetDirection(), src.GetDirection())):
        assert np.allclose(a, b, atol=1e-5)
    assert json.loads((tmp_path / "labels" / "c" / "clip.json").read_text())["volume"] is None


def test_batch_takes_names_in_any_language(capsys, ckpt, tmp_path):
    """A clip file 'écho 1.seq.nrrd' (its output name taken from it) and a structure 'Gefäß' were
    refused as names "(letters, digits, ...)" although they are letters: they are used as is."""
    write_seq_nrrd(tmp_path / "écho 1.seq.nrrd", [_grey(seed=i) for i in range(2)])
    (tmp_path / "clips.csv").write_text("clip,frame,structure,x0,y0,x1,y1\nécho 1.seq.nrrd,0,Gefäß,5,5,40,30\n",
                                        encoding="utf-8")
    code, _, err = _batch(capsys, tmp_path, ckpt, tmp_path / "clips.csv", "--png")
    assert code == 0, err
    out = tmp_path / "labels" / "écho 1"
    assert (out / "écho 1.seg.nrrd").is_file()
    assert sorted(p.name for p in (out / "png" / "Gefäß").iterdir()) == ["frame_0000.png", "frame_0001.png"]
    assert "Segment0_Name:=Gefäß" in (out / "écho 1.seg.nrrd").read_bytes()[:4000].decode("utf-8", "replace")


def test_batch_names_that_leave_the_folder_are_still_refused(capsys, ckpt, tmp_path):
    write_seq_nrrd(tmp_path / "a.seq.nrrd", [_grey()])
    (tmp_path / "clips.csv").write_text("clip,frame,structure,x0,y0,x1,y1\na.seq.nrrd,0,B/C,5,5,40,30\n")
    code, _, err = _batch(capsys, tmp_path, ckpt, tmp_path / "clips.csv")
    assert_one_clean_line(code, err, "structure 'B/C' cannot be used as a file name")
    assert not (tmp_path / "labels").exists()


def test_batch_folder_of_clips_takes_a_dicom_without_extension(capsys, ckpt, tmp_path):
    """DICOM files from a PACS export have no extension ('IM0001'): a folder of clips skipped
    them silently, and a prompts row naming one said it "is not in" the folder."""
    clips = tmp_path / "clips"
    clips.mkdir()
    _dicom_cine(clips / "IM0001")
    write_seq_nrrd(clips / "b.seq.nrrd", [_grey()])
    (clips / "notes.txt").write_text("not a clip")
    (tmp_path / "prompts.csv").write_text("clip,frame,structure,x0,y0,x1,y1\n*,0,A,5,5,40,30\n")
    code, _, err = run(capsys, "batch", clips, "--prompts", tmp_path / "prompts.csv", "--out-dir",
                       tmp_path / "labels", "--model", ckpt, "--device", "cpu")
    assert code == 0, err
    meta = json.loads((tmp_path / "labels" / "IM0001" / "clip.json").read_text())
    assert (meta["frames"], meta["width"], meta["height"]) == (3, 64, 48)
    assert not (tmp_path / "labels" / "notes.txt").exists()


def test_batch_folder_of_clips_takes_a_multi_page_tiff(capsys, ckpt, tmp_path):
    """A cine saved as a multi-page TIFF in a folder of clips was skipped by a '*' row (taken only
    when a row named it); a one-page TIFF there is still not a clip."""
    clips = tmp_path / "clips"
    clips.mkdir()
    ims = [Image.fromarray(_grey(seed=i)) for i in range(4)]
    ims[0].save(clips / "loop.tif", save_all=True, append_images=ims[1:])
    ims[0].save(clips / "still.tif")
    write_seq_nrrd(clips / "b.seq.nrrd", [_grey()])
    (tmp_path / "prompts.csv").write_text("clip,frame,structure,x0,y0,x1,y1\n*,0,A,5,5,40,30\n")
    code, _, err = run(capsys, "batch", clips, "--prompts", tmp_path / "prompts.csv", "--out-dir",
                       tmp_path / "labels", "--model", ckpt, "--device", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "labels" / "loop" / "clip.json").read_text())["frames"] == 4
    assert sorted(p.name for p in (tmp_path / "labels").iterdir() if not p.name.startswith(".")) == [
        "b", "loop", "summary.csv", "summary.json"]


def test_batch_folder_of_frames_of_two_sizes_names_the_file(capsys, ckpt, tmp_path):
    """A folder of frames of two sizes failed with "frame 1 is 80x60, frame 0 is 64x48": the clip
    fails naming the odd file and what to do; the other clips are labelled."""
    (tmp_path / "mixed").mkdir()
    Image.fromarray(_grey(48, 64)).save(tmp_path / "mixed" / "f0.png")
    Image.fromarray(_grey(60, 80)).save(tmp_path / "mixed" / "f1.png")
    write_seq_nrrd(tmp_path / "ok.seq.nrrd", [_grey()])
    (tmp_path / "clips.csv").write_text("name,clip,frame,structure,x0,y0,x1,y1\nmixed,mixed,0,A,5,5,40,30\n"
                                        "ok,ok.seq.nrrd,0,A,5,5,40,30\n")
    code, _, err = _batch(capsys, tmp_path, ckpt, tmp_path / "clips.csv")
    assert code != 0
    assert "Traceback" not in err
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "labels" / "summary.csv", encoding="utf-8"))}
    assert rows["ok"]["status"] == "done" and rows["mixed"]["status"] == "failed"
    assert re.search(r"f1\.png is 80x60, but .*f0\.png is 64x48", rows["mixed"]["error"])
    assert "resize or crop" in rows["mixed"]["error"]
    assert not (tmp_path / "labels" / "mixed").exists()


def test_batch_save_frames_of_grey_and_colour_frames(capsys, ckpt, tmp_path):
    """A folder of frames saved partly grey, partly RGB (and 16-bit) labelled fine, but with
    --save-frames the clip failed with "ValueError: all input arrays must have the same shape":
    the frames sequence is written as colour."""
    g = _grey()
    (tmp_path / "mixed").mkdir()
    Image.fromarray(g).save(tmp_path / "mixed" / "f0.png")
    Image.fromarray(np.stack([g] * 3, -1)).save(tmp_path / "mixed" / "f1.png")
    Image.fromarray(g.astype(np.uint16) * 200).save(tmp_path / "mixed" / "f2.png")
    (tmp_path / "clips.csv").write_text("name,clip,frame,structure,x0,y0,x1,y1\nm,mixed,0,A,5,5,40,30\n")
    code, _, err = _batch(capsys, tmp_path, ckpt, tmp_path / "clips.csv", "--save-frames")
    assert code == 0, err
    saved = read_frames(tmp_path / "labels" / "m" / "m_frames.seq.nrrd")
    assert [f.shape for f in saved] == [(48, 64, 3)] * 3
    assert np.array_equal(saved[0][..., 2], g) and np.array_equal(saved[2][..., 0], g.astype(np.uint16) * 200)
