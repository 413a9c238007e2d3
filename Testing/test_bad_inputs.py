"""Adversarial inputs through the real `uniultra` command, in-process: for each bad input, exit
status 2, exactly one line ``uniultra: error: ...`` naming the input, no traceback, and nothing
new left behind in the working folder.  Tiny random models only (fast)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from cli_errors import assert_one_clean_line
from PIL import Image

from uniultra.cli import main
from uniultra.models import build_model

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory, ckpt):
    d = tmp_path_factory.mktemp("bad_ckpts")
    good = torch.load(ckpt, map_location="cpu", weights_only=False)
    torch.save({"model": good["model"], "uniultra": {}}, d / "no_meta.pt")             # KeyError
    torch.save({"model": good["model"], "uniultra": {"arch": 5, "image_size": 64}}, d / "arch_int.pt")  # TypeError
    torch.save({"model": good["model"], "uniultra": "text"}, d / "meta_text.pt")       # AttributeError
    torch.save({"model": good["model"], "uniultra": {**good["uniultra"], "image_size": "big"}}, d / "size.pt")
    torch.save([1, 2, 3], d / "list.pt")
    (d / "text.pt").write_text("not a checkpoint")
    return d


def _png(path, h=48, w=64, seed=0):
    a = (np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path)
    return path


def _dataset(root, split_csv: str | bytes = "id,split\na,test\nb,test\n", masks=True):
    """Two 64x48 images a, b; masks with a rectangle (``masks="empty"``: all zero; False: none)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, rid in enumerate(("a", "b")):
        _png(root / "images" / f"{rid}.png", seed=i)
        if masks:
            m = np.zeros((48, 64), np.uint8)
            if masks != "empty":
                m[10:30, 15:45] = 1
            Image.fromarray(m).save(root / "masks" / f"{rid}.png")
    if isinstance(split_csv, bytes):
        (root / "split.csv").write_bytes(split_csv)
    else:
        (root / "split.csv").write_text(split_csv, encoding="utf-8")
    return root


@pytest.fixture
def work(tmp_path, ckpt, bad_ckpts):
    """A folder with an image, a prompts CSV, frames, datasets; every case runs against it."""
    w = tmp_path
    _png(w / "img.png")
    (w / "dir").mkdir()
    (w / "file.txt").write_text("x")
    (w / "frames.csv").write_text("id,image\nf0,img.png\nf1,img.png\n")
    (w / "prompts_ok.csv").write_text("id,x0,y0,x1,y1\nf0,5,5,30,30\n")
    _dataset(w / "ds")
    _dataset(w / "nomask", masks=False)
    _dataset(w / "latin", b"id,split\n" + "é,test\n".encode("latin-1"))
    _dataset(w / "header", "name,split\na,test\n")
    _dataset(w / "frame", "id,split,clip,frame\na,test,c1,zero\nb,test,c1,1\n")
    _dataset(w / "empty", "id,split\na,train\nb,train\n", masks="empty")
    _dataset(w / "tr", "id,split\na,train\nb,val\n")
    _dataset(w / "emptytest", masks="empty")
    # bad pixels: NaN in NIfTI (ITK reads it as 0) and NRRD, a 1x1 image, a NaN volume
    nan = np.random.default_rng(0).random((48, 64)).astype(np.float32) * 100
    nan[5, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(w / "nan.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(w / "nan.nrrd"))
    vol = np.stack([np.ones_like(nan), nan, np.ones_like(nan)])
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(w / "nanvol.nii.gz"))
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(w / "one.png")
    for name, split in (("nands", "id,split\na,test\nb,test\n"), ("nantr", "id,split\na,train\nb,val\n")):
        _dataset(w / name, split)
        (w / name / "images" / "a.png").unlink()
        sitk.WriteImage(sitk.GetImageFromArray(nan), str(w / name / "images" / "a.nii.gz"))
    _dataset(w / "tinyds", "id,split\na,test\nb,test\n")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(w / "tinyds" / "images" / "b.png")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(w / "tinyds" / "masks" / "b.png")
    # outputs that would replace inputs: a frame named like its mask, a clip in the output folder,
    # a folder of frames where batch would put that clip's output folder
    (w / "frames_self.csv").write_text("id,image\nimg,img.png\nf1,img.png\n")
    (w / "prompts_self.csv").write_text("id,x0,y0,x1,y1\nimg,5,5,30,30\n")
    (w / "clipdir").mkdir()
    _png(w / "clipdir" / "frame_0000.png")
    (w / "clips" / "a").mkdir(parents=True)
    for k in range(2):
        _png(w / "clips" / "a" / f"{k}.png", seed=k)
    (w / "oldrun").mkdir()
    (w / "oldrun" / "last.pt").write_bytes(b"an earlier run")
    (w / "bad.yaml").write_text("lr: [1, 2\n  epochs: : x\n")
    (w / "bprompts.csv").write_text("clip,frame,structure,x0,y0,x1,y1\n*,0,obj,5,5,30,30\n")
    (w / "dec.onnx").mkdir()  # a folder where the decoder of --out enc.onnx would go: enc.decoder.onnx
    (w / "enc.decoder.onnx").mkdir()
    return {"w": w, "ckpt": ckpt, "bad": bad_ckpts}


def _csv(w, name, text: str | bytes):
    p = w / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


LONG = "a" * 300

# (id, argv with {w} = work folder, {m} = tiny model, {bad} = bad checkpoints, text the error must hold,
#  optional setup(w) writing extra inputs)
SEG = ["segment", "--image", "{w}/img.png", "--model", "{m}", "--device", "cpu"]
SEG_BOX = SEG + ["--box", "5", "5", "30", "30"]
PROP = ["propagate", "--frames", "{w}/frames.csv", "--prompts", "{w}/prompts_ok.csv", "--model", "{m}"]
EVAL = ["evaluate", "--model", "{m}", "--device", "cpu"]
TRAIN = ["train", "--data", "{w}/tr", "--out", "{w}/run", "--model", "uniultra-student-e8", "--image-size", "64"]
DISTILL = ["distill", "--data", "{w}/tr", "--out", "{w}/run", "--teacher", "{m}", "--student", "uniultra-student-e8"]
CASES = [
    # numbers: boxes and points
    ("box-nan", SEG + ["--box", "nan", "5", "30", "30", "--out", "{w}/m.png"], "--box"),
    ("box-inf", SEG + ["--box", "5", "5", "inf", "30", "--out", "{w}/m.png"], "--box"),
    ("box-neg-inf", SEG + ["--box", "-inf", "5", "30", "30", "--out", "{w}/m.png"], "--box"),
    ("box-neg-exp", SEG + ["--box", "-1e3", "-1e3", "-5e2", "-5e2", "--out", "{w}/m.png"], "outside"),
    ("box-three", SEG + ["--box", "5", "5", "30", "--out", "{w}/m.png"], "--box"),
    ("box-text", SEG + ["--box", "a", "5", "30", "30", "--out", "{w}/m.png"], "--box"),
    ("box-empty", SEG + ["--box", "30", "5", "30", "30", "--out", "{w}/m.png"], "empty"),
    ("box-outside", SEG + ["--box", "500", "500", "600", "600", "--out", "{w}/m.png"], "outside"),
    ("point-nan", SEG + ["--point", "nan", "5", "1", "--out", "{w}/m.png"], "--point"),
    ("point-inf", SEG + ["--point", "5", "inf", "1", "--out", "{w}/m.png"], "--point"),
    ("point-neg-inf", SEG + ["--point", "-inf", "5", "1", "--out", "{w}/m.png"], "--point"),
    ("point-label", SEG + ["--point", "5", "5", "2", "--out", "{w}/m.png"], "label"),
    ("point-text", SEG + ["--point", "5", "y", "1", "--out", "{w}/m.png"], "--point"),
    ("no-prompt", SEG + ["--out", "{w}/m.png"], "no prompt"),
    # output paths
    ("out-is-dir", SEG_BOX + ["--out", "{w}/dir"], "--out"),
    ("out-under-file", SEG_BOX + ["--out", "{w}/file.txt/m.png"], "file.txt"),
    ("out-name-too-long", SEG_BOX + ["--out", "{w}/" + LONG + ".png"], "too long"),
    ("out-dir-name-too-long", SEG_BOX + ["--out", "{w}/" + LONG + "/m.png"], "too long"),
    ("out-is-image", SEG_BOX + ["--out", "{w}/img.png"], "input"),
    ("overlay-is-dir", SEG_BOX + ["--out", "{w}/m.png", "--overlay", "{w}/dir"], "--overlay"),
    ("overlay-is-out", SEG_BOX + ["--out", "{w}/m.png", "--overlay", "{w}/m.png"], "--overlay"),
    ("overlay-is-image", SEG_BOX + ["--out", "{w}/m.png", "--overlay", "{w}/img.png"], "--overlay"),
    ("overlay-under-file", SEG_BOX + ["--out", "{w}/m.png", "--overlay", "{w}/file.txt/o.png"], "file.txt"),
    # input images
    ("image-missing", ["segment", "--image", "{w}/nope.png", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                       "--model", "{m}"], "nope.png"),
    ("image-is-dir", ["segment", "--image", "{w}/dir", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                      "--model", "{m}"], "dir"),
    ("image-is-text", ["segment", "--image", "{w}/file.txt", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                       "--model", "{m}"], "file.txt"),
    # bad pixels: every message names the file, the CSV line or the frame
    ("image-nan-nifti", ["segment", "--image", "{w}/nan.nii.gz", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                         "--model", "{m}"], "nan.nii.gz contains NaN"),
    ("image-nan-nrrd", ["segment", "--image", "{w}/nan.nrrd", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                        "--model", "{m}"], "nan.nrrd contains NaN"),
    ("image-1x1", ["segment", "--image", "{w}/one.png", "--box", "0", "0", "0", "0", "--out", "{w}/m.png",
                   "--model", "{m}"], "one.png is 1x1"),
    ("csv-image-1x1", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na,img.png,5,5,30,30\nb,one.png,0,0,0,0\n",
                       "--out-dir", "{w}/out", "--model", "{m}"], "line 3: image"),
    ("csv-image-nan", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na,nan.nii.gz,5,5,30,30\n",
                       "--out-dir", "{w}/out", "--model", "{m}"], "line 2: image"),
    ("clip-nan-nifti", ["propagate", "--clip", "{w}/nanvol.nii.gz", "--frame", "0", "--box", "5", "5", "30", "30",
                        "--out-dir", "{w}/out", "--model", "{m}"], "nanvol.nii.gz frame 1 contains NaN"),
    ("frames-nan", ["propagate", "--frames", "@id,image\nf0,img.png\nf1,nan.nrrd\n", "--prompts",
                    "{w}/prompts_ok.csv", "--out-dir", "{w}/out", "--model", "{m}"], "line 3: image"),
    ("eval-nan-nifti", EVAL + ["--data", "{w}/nands"], "a.nii.gz"),
    ("eval-1x1", EVAL + ["--data", "{w}/tinyds"], "b.png"),
    ("train-nan-nifti", ["train", "--data", "{w}/nantr", "--out", "{w}/run", "--model", "uniultra-student-e8",
                         "--image-size", "64", "--device", "cpu"], "a.nii.gz"),
    # outputs that would overwrite inputs
    ("prop-mask-over-frame", ["propagate", "--frames", "{w}/frames_self.csv", "--prompts", "{w}/prompts_self.csv",
                              "--out-dir", "{w}", "--model", "{m}"], "img.png"),
    ("prop-mask-over-clip", ["propagate", "--clip", "{w}/clipdir/frame_0000.png", "--frame", "0", "--box", "5", "5",
                             "30", "30", "--out-dir", "{w}/clipdir", "--model", "{m}"], "frame_0000.png"),
    ("batch-out-over-frames", ["batch", "{w}/clips", "--prompts", "{w}/bprompts.csv", "--out-dir", "{w}/clips",
                               "--model", "{m}"], "replace the input"),
    # checkpoints and models
    ("ckpt-no-meta", ["segment", "--image", "{w}/img.png", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                      "--model", "{bad}/no_meta.pt"], "no_meta.pt"),
    ("ckpt-arch-int", ["segment", "--image", "{w}/img.png", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                       "--model", "{bad}/arch_int.pt"], "arch_int.pt"),
    ("ckpt-meta-text", ["segment", "--image", "{w}/img.png", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                        "--model", "{bad}/meta_text.pt"], "meta_text.pt"),
    ("ckpt-size-text", ["segment", "--image", "{w}/img.png", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                        "--model", "{bad}/size.pt"], "size.pt"),
    ("ckpt-list", ["segment", "--image", "{w}/img.png", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                   "--model", "{bad}/list.pt"], "list.pt"),
    ("ckpt-text", ["segment", "--image", "{w}/img.png", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                   "--model", "{bad}/text.pt"], "text.pt"),
    ("ckpt-missing", ["segment", "--image", "{w}/img.png", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                      "--model", "{w}/none.pt"], "none.pt"),
    ("model-unknown", ["segment", "--image", "{w}/img.png", "--box", "1", "1", "5", "5", "--out", "{w}/m.png",
                       "--model", "no-such-model"], "no-such-model"),
    ("device-bogus", SEG_BOX + ["--out", "{w}/m.png", "--device", "tpu"], "tpu"),
    # batch segmentation CSVs
    ("csv-nan", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na,img.png,nan,5,30,30\n", "--out-dir", "{w}/out",
                 "--model", "{m}"], "line 2"),
    ("csv-inf", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na,img.png,5,5,inf,30\n", "--out-dir", "{w}/out",
                 "--model", "{m}"], "line 2"),
    ("csv-text", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na,img.png,x,5,30,30\n", "--out-dir", "{w}/out",
                  "--model", "{m}"], "line 2"),
    ("csv-id-slash", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na/b,img.png,5,5,30,30\n", "--out-dir",
                      "{w}/out", "--model", "{m}"], "line 2"),
    ("csv-id-long", ["segment", "--prompts", f"@id,image,x0,y0,x1,y1\n{LONG},img.png,5,5,30,30\n", "--out-dir",
                     "{w}/out", "--model", "{m}"], "line 2"),
    ("csv-id-nul", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na\0b,img.png,5,5,30,30\n", "--out-dir",
                    "{w}/out", "--model", "{m}"], "prompts.csv"),
    ("csv-id-dup", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na,img.png,5,5,30,30\na,img.png,5,5,30,30\n",
                    "--out-dir", "{w}/out", "--model", "{m}"], "twice"),
    ("csv-header", ["segment", "--prompts", "@name,image,x0,y0,x1,y1\na,img.png,5,5,30,30\n", "--out-dir",
                    "{w}/out", "--model", "{m}"], "lacks column"),
    ("csv-empty", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\n", "--out-dir", "{w}/out", "--model", "{m}"],
     "no rows"),
    ("csv-latin1", ["segment", "--prompts", b"@id,image,x0,y0,x1,y1\n\xe9,img.png,5,5,30,30\n", "--out-dir",
                    "{w}/out", "--model", "{m}"], "UTF-8"),
    ("csv-missing", ["segment", "--prompts", "{w}/none.csv", "--out-dir", "{w}/out", "--model", "{m}"], "none.csv"),
    ("csv-image-missing", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na,gone.png,5,5,30,30\n", "--out-dir",
                           "{w}/out", "--model", "{m}"], "gone.png"),
    ("outdir-is-file", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na,img.png,5,5,30,30\n", "--out-dir",
                        "{w}/file.txt", "--model", "{m}"], "--out-dir"),
    ("outdir-overwrites-image", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\nimg,img.png,5,5,30,30\n",
                                 "--out-dir", "{w}", "--model", "{m}"], "overwrite"),
    ("outdir-long", ["segment", "--prompts", "@id,image,x0,y0,x1,y1\na,img.png,5,5,30,30\n", "--out-dir",
                     "{w}/" + LONG, "--model", "{m}"], "too long"),
    # propagation
    ("margin-nan", PROP + ["--margin", "nan", "--out-dir", "{w}/out"], "--margin"),
    ("margin-negative", PROP + ["--margin", "-1", "--out-dir", "{w}/out"], "--margin"),
    ("margin-neg-exp", PROP + ["--margin", "-1e1", "--out-dir", "{w}/out"], "--margin"),
    ("anchor-big", PROP + ["--anchor", "2", "--out-dir", "{w}/out"], "--anchor"),
    ("anchor-neg-inf", PROP + ["--anchor", "-inf", "--out-dir", "{w}/out"], "--anchor"),
    ("prop-outdir-file", PROP + ["--out-dir", "{w}/file.txt"], "--out-dir"),
    ("prop-outdir-under-file", PROP + ["--out-dir", "{w}/file.txt/out"], "file.txt"),
    ("prop-clip-missing", ["propagate", "--clip", "{w}/none.nrrd", "--frame", "0", "--box", "1", "1", "5", "5",
                           "--out-dir", "{w}/out", "--model", "{m}"], "none.nrrd"),
    ("prop-frame-id", ["propagate", "--frames", "{w}/frames.csv", "--prompts", "@id,x0,y0,x1,y1\nf9,5,5,30,30\n",
                       "--out-dir", "{w}/out", "--model", "{m}"], "f9"),
    ("prop-prompt-nan", ["propagate", "--frames", "{w}/frames.csv", "--prompts",
                         "@id,x0,y0,x1,y1\nf0,5,nan,30,30\n", "--out-dir", "{w}/out", "--model", "{m}"], "y0"),
    # export
    ("export-out-dir", ["export", "--model", "{m}", "--out", "{w}/dir"], "--out"),
    ("export-under-file", ["export", "--model", "{m}", "--out", "{w}/file.txt/e.onnx"], "file.txt"),
    ("export-long", ["export", "--model", "{m}", "--out", "{w}/" + LONG + ".onnx"], "too long"),
    ("export-decoder-dir", ["export", "--model", "{m}", "--out", "{w}/enc.onnx"], "decoder"),
    ("export-format", ["export", "--model", "{m}", "--format", "tflite", "--out", "{w}/e.onnx"], "onnx"),
    ("export-over-model", ["export", "--model", "{m}", "--out", "{m}"], "input"),
    # evaluation
    ("limit-negative", EVAL + ["--data", "{w}/ds", "--limit", "-3"], "--limit"),
    ("limit-zero", EVAL + ["--data", "{w}/ds", "--limit", "0"], "--limit"),
    ("limit-fraction", EVAL + ["--data", "{w}/ds", "--limit", "1.5"], "--limit"),
    ("jitter-nan", EVAL + ["--data", "{w}/ds", "--jitter", "nan"], "--jitter"),
    ("jitter-negative", EVAL + ["--data", "{w}/ds", "--jitter", "-0.1"], "--jitter"),
    ("split-unknown", EVAL + ["--data", "{w}/ds", "--split", "nosuch"], "--split"),
    ("clips-without-clips", EVAL + ["--data", "{w}/ds", "--clips"], "clips"),
    ("eval-no-masks", EVAL + ["--data", "{w}/nomask"], "mask"),
    ("eval-all-masks-empty", EVAL + ["--data", "{w}/emptytest"], "every mask"),
    ("split-latin1", EVAL + ["--data", "{w}/latin"], "UTF-8"),
    ("split-header", EVAL + ["--data", "{w}/header"], "id"),
    ("split-frame", EVAL + ["--data", "{w}/frame"], "frame"),
    ("eval-data-missing", EVAL + ["--data", "{w}/none"], "none"),
    ("eval-outdir-file", EVAL + ["--data", "{w}/ds", "--out-dir", "{w}/file.txt"], "--out-dir"),
    # training (validated before anything is written)
    ("lr-nan", ["train", "--data", "{w}/ds", "--out", "{w}/run", "--model", "uniultra-student-e8", "--lr", "nan"],
     "--lr"),
    ("lr-neg-inf", ["train", "--data", "{w}/ds", "--out", "{w}/run", "--model", "uniultra-student-e8", "--lr",
                    "-inf"], "--lr"),
    ("train-data-missing", ["train", "--data", "{w}/none", "--out", "{w}/run", "--model", "uniultra-student-e8"],
     "none"),
    ("register-space", TRAIN + ["--register", "my model"], "--register"),
    ("register-slash", TRAIN + ["--register", "../x"], "--register"),
    ("register-shipped", TRAIN + ["--register", "uniultra-mini-us"], "shipped"),
    ("num-workers-negative", TRAIN + ["--num-workers", "-1"], "--num-workers"),
    ("gamma-nan", TRAIN + ["--gamma", "nan"], "--gamma"),
    ("jitter-override-nan", TRAIN + ["jitter=nan"], "--jitter"),
    ("weight-decay-negative", TRAIN + ["--weight-decay", "-1e-2"], "--weight-decay"),
    ("grad-clip-inf", TRAIN + ["--grad-clip", "inf"], "--grad-clip"),
    ("time-limit-negative", TRAIN + ["--time-limit", "-5"], "--time-limit"),
    ("data-weights-nan", TRAIN + ["--data-weights", "nan"], "--data-weights"),
    ("data-weights-zero", TRAIN + ["--data-weights", "0"], "--data-weights"),
    ("warmup-negative", TRAIN + ["--warmup", "-3"], "--warmup"),
    ("max-instances-zero", TRAIN + ["--max-instances", "0"], "--max-instances"),
    ("train-out-is-file", TRAIN + ["--out", "{w}/file.txt"], "--out"),
    ("train-events-under-file", TRAIN + ["--events", "{w}/file.txt/ev.jsonl"], "--events"),
    ("distill-out-under-file", DISTILL + ["--out", "{w}/file.txt/run"], "file.txt"),
    ("distill-over-a-run", DISTILL + ["--out", "{w}/oldrun"], "already holds a run"),
    ("train-over-a-run", TRAIN + ["--out", "{w}/oldrun"], "already holds a run"),
    ("seed-negative", TRAIN + ["--seed", "-1"], "--seed"),
    ("loss-weights-nan", TRAIN + ["--loss-weights", "dice=nan,focal=1"], "--loss-weights"),
    ("config-bad-yaml", TRAIN + ["--config", "{w}/bad.yaml"], "line 2"),
    ("recipe-bad-yaml", ["recipe", "run", "{w}/bad.yaml"], "line 2"),
    ("eval-seed-negative", EVAL + ["--data", "{w}/ds", "--seed", "-1"], "--seed"),
    ("train-empty-masks", ["train", "--data", "{w}/empty", "--out", "{w}/run", "--model", "uniultra-student-e8",
                           "--image-size", "64", "--device", "cpu"], "empty"),
    ("distill-lr-nan", DISTILL + ["--lr", "nan"], "--lr"),
    ("distill-num-workers", DISTILL + ["--num-workers", "-2"], "--num-workers"),
    ("distill-register", DISTILL + ["--register", "a b"], "--register"),
    ("distill-finetune-lr", DISTILL + ["--finetune-lr", "-1"], "--finetune-lr"),
    ("distill-empty-masks-finetune", ["distill", "--data", "{w}/empty", "--out", "{w}/run", "--teacher", "{m}",
                                      "--student", "uniultra-student-e8", "--finetune-steps", "1",
                                      "--device", "cpu"], "empty"),
    # batch (same number checks)
    ("batch-margin-nan", ["batch", "{w}/dir", "--out-dir", "{w}/bout", "--margin", "nan"], "--margin"),
    ("batch-anchor-neg", ["batch", "{w}/dir", "--out-dir", "{w}/bout", "--anchor", "-1e1"], "--anchor"),
    ("batch-cache-neg", ["batch", "{w}/dir", "--out-dir", "{w}/bout", "--cache-mb", "-5"], "--cache-mb"),
    # usage
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("info-size-text", ["info", "uniultra-mini", "--image-size", "big"], "--image-size"),
    ("segment-unknown-option", SEG_BOX + ["--out", "{w}/m.png", "--bogus"], "--bogus"),
]


def _snapshot(root):
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _expand(argv, work):
    out = []
    for a in argv:
        if isinstance(a, bytes) or (isinstance(a, str) and a.startswith("@")):
            out.append(str(_csv(work["w"], "prompts.csv", a[1:])))  # inline CSV contents
        else:
            out.append(a.replace("{w}", str(work["w"])).replace("{m}", str(work["ckpt"]))
                       .replace("{bad}", str(work["bad"])))
    return out


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(capsys, work, argv, message, monkeypatch):
    monkeypatch.setenv("UNIULTRA_HOME", str(work["w"].parent / "home"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _expand(argv, work)
    before = _snapshot(work["w"])
    code = main(argv)
    assert_one_clean_line(code, capsys.readouterr().err, message)
    assert _snapshot(work["w"]) == before, "new files were left behind"


@pytest.mark.skipif(ROOT, reason="root may write anywhere")
def test_out_in_read_only_folder(capsys, work):
    ro = work["w"] / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code = main(_expand(SEG_BOX + ["--out", "{w}/ro/m.png"], work))
        err = capsys.readouterr().err
        assert code == 2 and "permission" in err and err.count("\n") == 1
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o700)


def test_mask_and_overlay_are_one_unit(capsys, work, monkeypatch):
    """A failure while writing the second file leaves neither."""
    import uniultra.data.io as io

    def broken(path, mask):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(io, "write_mask_png", broken)
    before = _snapshot(work["w"])
    code = main(_expand(SEG_BOX + ["--out", "{w}/m.png", "--overlay", "{w}/o.png"], work))
    err = capsys.readouterr().err
    assert code == 2 and "disk is full" in err and "Traceback" not in err
    assert _snapshot(work["w"]) == before


def test_bom_csvs_simply_work(capsys, work):
    w = work["w"]
    p = _csv(w, "p.csv", "\ufeffid,image,x0,y0,x1,y1\na,img.png,5,5,30,30\n")
    assert main(["segment", "--prompts", str(p), "--out-dir", str(w / "out"), "--model", str(work["ckpt"])]) == 0
    assert (w / "out" / "a.png").is_file()
    capsys.readouterr()
    (w / "ds" / "split.csv").write_text("\ufeffid,split\na,test\nb,test\n", encoding="utf-8")
    code = main(["evaluate", "--model", str(work["ckpt"]), "--data", str(w / "ds"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["datasets"]["ds"]["n_images"] == 2


def test_negative_numbers_parse(capsys, work):
    """`-1e1` is a number, not an option: the box is then refused for lying outside the image."""
    code = main(_expand(SEG + ["--box", "-1e3", "-5e2", "-1E2", "-inf", "--out", "{w}/m.png"], work))
    err = capsys.readouterr().err
    assert code == 2 and "--box" in err and "finite" in err  # -inf reached the number check
    code = main(_expand(SEG + ["--box", "-1e3", "-5e2", "-1E2", "-1.5e1", "--out", "{w}/m.png"], work))
    err = capsys.readouterr().err
    assert code == 2 and "outside" in err


def test_a_bug_shows_a_traceback_and_says_so(capsys, monkeypatch):
    import uniultra.cli as cli

    def boom(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "cmd_models", boom)
    code = main(["models"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "bug" in err.splitlines()[-1]


def test_malformed_user_registry_entry_is_skipped(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIULTRA_HOME", str(tmp_path))
    reg = tmp_path / "models" / "registered"
    reg.mkdir(parents=True)
    (reg / "bad.json").write_text(json.dumps({"name": "bad", "arch": "x", "image_size": "big"}))
    (reg / "list.json").write_text("[1, 2]")
    (reg / "ok.json").write_text(json.dumps({"name": "mine", "arch": "uniultra-student-e8", "image_size": 64,
                                             "file": "mine.pt"}))
    code = main(["models"])
    out = capsys.readouterr()
    assert code == 0 and "mine" in out.out and "bad.json" in out.err and "list.json" in out.err
    code = main(["info", "bad"])
    assert code == 2 and "unknown model" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "distill"])
@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_resume_from_a_damaged_last_pt(capsys, work, monkeypatch, command, damage):
    """A cut-short or foreign last.pt is one line naming it; the temporary file a killed run left
    while writing a checkpoint is removed on resume; nothing else in the run folder changes."""
    monkeypatch.setenv("UNIULTRA_HOME", str(work["w"].parent / "home"))
    run = work["w"] / "run"
    run.mkdir()
    buf = io.BytesIO()
    torch.save({"trainable": {"w": torch.zeros(1000)}, "optimizer": {}}, buf)
    data = buf.getvalue()
    (run / "last.pt").write_bytes(data[: len(data) // 2] if damage == "truncated" else data)
    (run / ".last.pt.k1l2m3.tmp").write_bytes(data[:64])  # SIGKILL during atomic_torch_save
    (run / "config.json").write_text("{}")
    old_events = '{"event": "start", "step": 0}\n'
    (run / "events.jsonl").write_text(old_events)
    argv = (TRAIN if command == "train" else DISTILL + ["--image-size", "64"]) + ["--resume", "--device", "cpu"]
    before = _snapshot(work["w"]) - {"run/.last.pt.k1l2m3.tmp"}
    code = main(_expand(argv, work))
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith("uniultra: error: --resume: ") and "last.pt" in errors[0], err
    assert ("damaged" if damage == "truncated" else "not a resume state") in errors[0]
    assert _snapshot(work["w"]) == before
    assert (run / "config.json").read_text() == "{}"
    assert (run / "events.jsonl").read_text().startswith(old_events)  # the run's log only grows


@pytest.mark.parametrize("older", [False, True], ids=["new", "over-older-files"])
def test_onnx_export_is_one_unit(capsys, work, monkeypatch, older):
    """The decoder's move fails (after the encoder's succeeded): neither new file is left, files
    of an earlier export are as they were, no temporary file stays."""
    import uniultra.checks as checks

    w = work["w"]
    enc, dec = w / "x.onnx", w / "x.decoder.onnx"
    if older:
        enc.write_text("old encoder")
        dec.write_text("old decoder")
    real = os.replace

    def replace(src, dst):  # moving the new decoder in fails (putting the older one back works)
        if str(dst) == str(dec) and ".tmp" in str(src):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    def export(module, args, path, **kw):  # the staging is under test, not torch's exporter (test_cli has a real one)
        Path(path).write_bytes(b"onnx" * 500)

    monkeypatch.setattr(torch.onnx, "export", export)
    monkeypatch.setattr(checks.os, "replace", replace)
    before = _snapshot(w)
    code = main(["export", "--model", str(work["ckpt"]), "--out", str(enc)])
    err = capsys.readouterr().err
    assert code == 2 and "disk is full" in err and "Traceback" not in err, err
    assert _snapshot(w) == before
    if older:
        assert enc.read_text() == "old encoder" and dec.read_text() == "old decoder"
    monkeypatch.setattr(checks.os, "replace", real)
    assert main(["export", "--model", str(work["ckpt"]), "--out", str(enc)]) == 0  # and it works otherwise
    assert enc.stat().st_size > 1000 and dec.stat().st_size > 1000
    assert _snapshot(w) == before | {"x.onnx", "x.decoder.onnx"}


def test_a_batch_without_objects_trains_on():
    """Some masks of a dataset may be empty (a dataset with all-empty masks is refused): a batch
    drawn only from empty ones gives a zero loss that backpropagates, not a reshape error."""
    from uniultra.training.config import LossWeights
    from uniultra.training.tasks import _LossModule, batch_layout

    torch.manual_seed(0)
    model = build_model("uniultra-student-e8", image_size=64)
    b = 2
    batch = {"image": torch.rand(b, 3, 64, 64), "masks": torch.zeros(b, 1, 16, 16), "boxes": torch.zeros(b, 1, 4),
             "has_box": torch.zeros(b, 1, dtype=torch.bool), "point_coords": torch.zeros(b, 1, 1, 2),
             "point_labels": torch.full((b, 1, 1), -1), "valid": torch.zeros(b, 1, dtype=torch.bool)}
    loss, parts = _LossModule(model, LossWeights(), False)(batch, batch_layout(batch))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)
