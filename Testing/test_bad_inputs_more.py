"""More adversarial inputs through the real `uniultra` command (see test_bad_inputs.py for the
conventions): each bad input is exit status 2, one line ``uniultra: error: ...`` naming it, no
traceback, nothing new or changed in the working folder.  Plus the silently wrong results these
inputs used to give (a mask PNG under a .jpg name, /dev/null replaced by a file, events appended
to the manifest, a duplicate split.csv row counted twice).  Tiny random models only (fast)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_errors import assert_one_clean_line
from PIL import Image

from uniultra.cli import main


def _png(path, h=48, w=64, seed=0):
    a = (np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path)
    return path


def _dataset(root, split_csv="id,split\na,test\nb,test\n", meta: str | bytes | None = None):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, rid in enumerate(("a", "b")):
        _png(root / "images" / f"{rid}.png", seed=i)
        m = np.zeros((48, 64), np.uint8)
        m[10:30, 15:45] = 255
        Image.fromarray(m).save(root / "masks" / f"{rid}.png")
    (root / "split.csv").write_text(split_csv, encoding="utf-8")
    if meta is not None:
        (root / "meta.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    return root


@pytest.fixture
def work(tmp_path, ckpt, monkeypatch):
    monkeypatch.setenv("UNIULTRA_HOME", str(tmp_path.parent / f"{tmp_path.name}-home"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    w = tmp_path
    _png(w / "img.png")
    (w / "prompts.csv").write_text("id,image,x0,y0,x1,y1\na,img.png,5,5,30,30\n")
    (w / "noimage.csv").write_text("id,image,x0,y0,x1,y1\na,,5,5,30,30\n")
    (w / "newline.csv").write_text('id,image,x0,y0,x1,y1\n"a\nb",img.png,5,5,30,30\n')
    (w / "frames.csv").write_text("id,image\nf0,img.png\nf1,img.png\n")
    (w / "frames_noimage.csv").write_text("id,image\nf0,\nf1,img.png\n")
    (w / "fprompts.csv").write_text("id,x0,y0,x1,y1\nf0,5,5,30,30\n")
    (w / "manifest.csv").write_text("clip,frame,structure,x0,y0,x1,y1\nimg.png,0,obj,5,5,30,30\n")
    (w / "old.txt").write_text("my notes\n")
    (w / "vol.nrrd").write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 4\nencoding: raw\n\n"
                                 + bytes(range(256)))  # a 3D volume of 8 x 8 x 4
    os.mkfifo(w / "pipe.png")
    _dataset(w / "ds")
    _dataset(w / "dup", "id,split\na,test\na,test\nb,test\n")
    _dataset(w / "leak", "id,split\na,train\nb,test\na,test\n")
    _dataset(w / "star", "id,split\n*,test\n")
    _dataset(w / "escape", "id,split\n../../img,test\n")
    _dataset(w / "badmeta", meta="{not json")
    _dataset(w / "binmeta", meta=b"\x80\x81 binary")
    return {"w": w, "ckpt": ckpt}


SEG = ["segment", "--image", "{w}/img.png", "--box", "5", "5", "30", "30", "--model", "{m}", "--device", "cpu"]
BATCH_SEG = ["segment", "--prompts", "{w}/prompts.csv", "--out-dir", "{w}/out", "--model", "{m}"]
PROP = ["propagate", "--frames", "{w}/frames.csv", "--prompts", "{w}/fprompts.csv", "--out-dir", "{w}/out",
        "--model", "{m}"]
EVAL = ["evaluate", "--model", "{m}", "--device", "cpu"]
TRAIN = ["train", "--data", "{w}/ds", "--out", "{w}/run", "--model", "uniultra-student-e8", "--image-size", "64",
         "--device", "cpu", "--steps", "1"]
CACHE = ["cache-embeddings", "--data", "{w}/ds", "--cache", "{w}/cache", "--model", "{m}"]

CASES = [
    # the mask is PNG: a name that says otherwise held PNG data (m.jpg, m.nrrd), '-' made a file named '-'
    ("out-jpg", SEG + ["--out", "{w}/m.jpg"], "ending in .png"),
    # a negative shard was taken for an option ("expected one argument"); now its own check answers
    ("batch-shard-negative", ["batch", "{w}/manifest.csv", "--out-dir", "{w}/bout", "--shard", "-1/2"],
     "--shard -1/2: expected K/N"),
    # a folder given as the recipe: say so (it said "file not found")
    ("recipe-folder", ["recipe", "show", "{w}"], "is a folder; give a recipe file"),
    # an unknown option is reported by its sub-command, whose --help lists the right ones
    ("train-unknown-option", TRAIN + ["--bogus"], "train: unrecognized arguments: --bogus (see `uniultra train --help`)"),
    ("evaluate-unknown-option", EVAL + ["--data", "{w}/ds", "--bogus"], "see `uniultra evaluate --help`"),
    # the ONNX encoder under another name (e.txt) looked like something else
    ("export-out-txt", ["export", "--model", "{m}", "--out", "{w}/e.txt"], "ending in .onnx"),
    # a clip or volume given as one image: the message names the commands that take it
    ("segment-volume", ["segment", "--image", "{w}/vol.nrrd", "--box", "1", "1", "5", "5", "--model", "{m}",
                        "--out", "{w}/m.png"], "uniultra propagate --clip"),
    ("out-nrrd", SEG + ["--out", "{w}/m.nrrd"], "ending in .png"),
    ("out-dash", SEG + ["--out", "-"], "standard output"),
    ("overlay-tif", SEG + ["--out", "{w}/m.png", "--overlay", "{w}/o.tif"], "--overlay"),
    # a FIFO (or /dev/null) was replaced by a regular file
    ("out-fifo", SEG + ["--out", "{w}/pipe.png"], "not a regular file"),
    # options the chosen mode silently ignored
    ("prompts-with-image", BATCH_SEG + ["--image", "{w}/img.png"], "--image cannot be combined"),
    ("prompts-with-box-out", BATCH_SEG + ["--box", "1", "1", "4", "4", "--out", "{w}/x.png"], "--box, --out"),
    ("single-with-out-dir", SEG + ["--out-dir", "{w}/out"], "--out-dir is for --prompts"),
    ("clip-with-frames", ["propagate", "--clip", "{w}/img.png", "--frame", "0", "--box", "5", "5", "30", "30",
                          "--frames", "{w}/frames.csv", "--out-dir", "{w}/out", "--model", "{m}"], "--frames"),
    ("frames-with-frame-0", PROP + ["--frame", "0"], "--frame cannot"),
    ("frames-with-box", PROP + ["--box", "5", "5", "30", "30"], "--box cannot"),
    # an empty image cell was "cannot read '.': it is a folder" (no line); a line break in an id
    ("csv-empty-image", ["segment", "--prompts", "{w}/noimage.csv", "--out-dir", "{w}/out", "--model", "{m}"],
     "noimage.csv line 2: the image column is empty"),
    ("frames-empty-image", ["propagate", "--frames", "{w}/frames_noimage.csv", "--prompts", "{w}/fprompts.csv",
                            "--out-dir", "{w}/out", "--model", "{m}"], "frames_noimage.csv line 2"),
    ("csv-id-newline", ["segment", "--prompts", "{w}/newline.csv", "--out-dir", "{w}/out", "--model", "{m}"],
     "newline.csv line 2"),
    # split.csv: duplicates counted twice (or leaked train into test), ids as glob patterns or paths
    ("split-duplicate", EVAL + ["--data", "{w}/dup"], "line 3: id 'a' appears twice"),
    ("split-train-test-leak", EVAL + ["--data", "{w}/leak"], "line 4: id 'a' appears twice"),
    ("split-id-star", EVAL + ["--data", "{w}/star"], "'*' is missing"),
    ("split-id-escapes", EVAL + ["--data", "{w}/escape"], "must be a file name"),
    ("train-split-duplicate", TRAIN[:2] + ["{w}/dup"] + TRAIN[3:], "appears twice"),
    # a damaged meta.json was a traceback
    ("meta-json-bad", EVAL + ["--data", "{w}/badmeta"], "meta.json: not valid JSON"),
    ("meta-json-binary", EVAL + ["--data", "{w}/binmeta"], "meta.json: not valid JSON"),
    # evaluation results written into the dataset
    ("eval-out-in-images", EVAL + ["--data", "{w}/ds", "--out-dir", "{w}/ds/images"], "dataset folder"),
    ("eval-out-beside-ds", EVAL + ["--data", "{w}/ds", "--out-dir", "{w}"], "dataset folder"),
    # events appended to an input
    ("batch-events-manifest", ["batch", "{w}/manifest.csv", "--out-dir", "{w}/bout", "--model", "{m}",
                               "--events", "{w}/manifest.csv"], "--events"),
    ("batch-events-not-a-log", ["batch", "{w}/manifest.csv", "--out-dir", "{w}/bout", "--model", "{m}",
                                "--events", "{w}/old.txt"], "not a JSON-lines event log"),
    ("train-events-split-csv", TRAIN + ["--events", "{w}/ds/split.csv"], "not a JSON-lines event log"),
    # sizes: 100000 was OOM-killed, 0 silently meant "the default"
    ("info-size-huge", ["info", "uniultra-student-e8", "--image-size", "100000"], "--image-size 100000"),
    ("info-size-zero", ["info", "uniultra-student-e8", "--image-size", "0"], "--image-size 0"),
    ("train-size-huge", TRAIN + ["--image-size", "8192"], "--image-size"),
    # adapter block 999 wrapped silently onto block 3
    ("adapter-block-out-of-range", TRAIN + ["--peft", "adapter", "--adapter-blocks", "999"], "adapter blocks [999]"),
    ("override-unknown-key", TRAIN + ["bogus=1"], "unknown key 'bogus'"),
    # cache-embeddings: --threads -1 was a traceback, 0 ignored; a wrong --split cached nothing and exited 0
    ("cache-threads-negative", CACHE + ["--threads", "-1"], "--threads"),
    ("cache-threads-zero", CACHE + ["--threads", "0"], "--threads"),
    ("cache-max-images-zero", CACHE + ["--max-images", "0"], "--max-images"),
    ("cache-split-unknown", CACHE + ["--split", "nosuch"], "--split nosuch"),
    ("cache-into-file", CACHE[:4] + ["{w}/img.png"] + CACHE[5:], "--cache"),
]


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def _expand(argv, work):
    return [a.replace("{w}", str(work["w"])).replace("{m}", str(work["ckpt"])) for a in argv]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(capsys, work, argv, message):
    argv = _expand(argv, work)
    before = _snapshot(work["w"])
    code = main(argv)
    assert_one_clean_line(code, capsys.readouterr().err, message)
    assert _snapshot(work["w"]) == before, "files were left behind or changed"


def test_dev_null_is_never_replaced(tmp_path):
    """check_output_file refuses an existing device: `--out /dev/null` (as root) used to replace
    /dev/null with a regular file."""
    from uniultra.checks import check_output_file
    from uniultra.errors import InputError

    with pytest.raises(InputError, match="not a regular file"):
        check_output_file("/dev/null", "--out")
    assert not Path("/dev/null").is_file()


def test_events_log_is_appended_to(tmp_path):
    """An existing event log (or an empty file) is still accepted: runs append to it."""
    from uniultra.checks import check_events_file

    log = tmp_path / "ev.jsonl"
    log.write_text(json.dumps({"event": "run_start", "time": 1}) + "\n")
    assert check_events_file(log) == log
    (tmp_path / "empty.jsonl").write_text("")
    check_events_file(tmp_path / "empty.jsonl")
    check_events_file(tmp_path / "new.jsonl")


def test_batch_segment_honours_refine(capsys, work, monkeypatch):
    """--refine with --prompts used to be ignored silently."""
    from uniultra.inference import Predictor

    seen = []
    real = Predictor.predict

    def spy(self, *a, **kw):
        seen.append(kw.get("refine", False))
        return real(self, *a, **kw)

    monkeypatch.setattr(Predictor, "predict", spy)
    code = main(_expand(BATCH_SEG + ["--refine"], work))
    assert code == 0, capsys.readouterr().err
    assert seen == [True]


def test_uppercase_png_and_negative_adapter_block_still_work(capsys, work):
    code = main(_expand(SEG + ["--out", "{w}/M.PNG"], work))
    assert code == 0, capsys.readouterr().err
    assert (work["w"] / "M.PNG").is_file()
    from uniultra.models import build_model

    m = build_model("uniultra-student-e8", image_size=64, peft="adapter", peft_options={"blocks": [-1, 0]})
    assert m.param_report()["trainable_params"] > 0
