"""The `uniultra` command: outputs, JSON keys, and every bad input -> one line, exit 2, no output."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from uniultra.cli import main

SIZE = 64


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(0)
    a = (rng.random((48, 64)) * 255).astype(np.uint8)
    p = tmp_path / "img.png"
    Image.fromarray(a).save(p)
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_writes_mask_and_overlay(capsys, ckpt, image, tmp_path):
    code, out, err = run(capsys, "segment", "--image", image, "--box", 5, 5, 40, 30, "--point", 20, 20, 1,
                         "--model", ckpt, "--device", "cpu", "--out", tmp_path / "m.png",
                         "--overlay", tmp_path / "o.png")
    assert code == 0, err
    m = np.asarray(Image.open(tmp_path / "m.png"))
    assert m.shape == (48, 64) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    assert Image.open(tmp_path / "o.png").size == (64, 48)


def test_segment_batch(capsys, ckpt, image, tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text(f"id,image,x0,y0,x1,y1\na,{image.name},5,5,40,30\nb,{image},10,10,20,20\n")
    code, _, err = run(capsys, "segment", "--prompts", csv, "--out-dir", tmp_path / "out", "--model", ckpt)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert np.asarray(Image.open(tmp_path / "out" / "a.png")).shape == (48, 64)


@pytest.mark.parametrize("rows, message", [
    ("a,img.png,5,5,40,30\nb,missing.png,1,1,5,5\n", "missing.png"),
    ("a,img.png,40,5,40,30\n", "is empty: it has zero width"),
    ("a,img.png,500,500,600,600\n", "outside"),
    ("a,img.png,x,5,40,30\n", "four numbers"),
    ("a,img.png,5,5,40,30\na,img.png,5,5,40,30\n", "twice"),
])
def test_segment_batch_bad_rows_write_nothing(capsys, ckpt, image, tmp_path, rows, message):
    csv = tmp_path / "prompts.csv"
    csv.write_text("id,image,x0,y0,x1,y1\n" + rows)
    code, out, err = run(capsys, "segment", "--prompts", csv, "--out-dir", tmp_path / "out", "--model", ckpt)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("argv, message", [
    (["--image", "nope.png", "--box", 1, 1, 5, 5], "nope.png"),
    (["--image", "{img}", "--box", 30, 5, 30, 20], "empty"),
    (["--image", "{img}", "--point", 500, 5, 1], "outside"),
    (["--image", "{img}", "--point", 5, 5, 7], "label"),
    (["--image", "{img}"], "no prompt"),
    (["--image", "{img}", "--box", 1, 1, 5, 5, "--model", "no-such-model"], "unknown model"),
    (["--image", "{img}", "--box", 1, 1, 5, 5, "--model", "sam2.1-hiera-large"], "dl.fbaipublicfiles.com"),
    (["--image", "{img}", "--box", 1, 1, 5, 5, "--device", "cuda"], "cuda"),
    (["--image", "{img}", "--box", 1, 1, 5, 5, "--box-prior", -1], "--box-prior"),
    (["--image", "{img}", "--box", 1, 1, 5, 5, "--box-prior", "nan"], "--box-prior"),
])
def test_segment_bad_inputs(capsys, ckpt, image, tmp_path, argv, message, monkeypatch):
    monkeypatch.setenv("UNIULTRA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [str(image) if a == "{img}" else a for a in argv]
    if "--model" not in argv:
        argv += ["--model", ckpt]
    out_png = tmp_path / "m.png"
    code, _, err = run(capsys, "segment", *argv, "--out", out_png)
    assert code == 2, err
    assert message in err and "Traceback" not in err and err.startswith("uniultra: error:")
    assert not out_png.exists()


def test_box_prior_option_overrides_the_models_own(capsys, ckpt, image, tmp_path):
    """--box-prior W: with a weight far above the logits the mask is the box's inscribed ellipse."""
    from uniultra.data.io import read_mask
    from uniultra.evaluation.metrics import baseline_mask, dice

    box = (6, 8, 50, 40)
    code, _, err = run(capsys, "segment", "--image", image, "--box", *box, "--model", ckpt, "--device", "cpu",
                       "--box-prior", 1e4, "--out", tmp_path / "m.png")
    assert code == 0, err
    m = read_mask(tmp_path / "m.png") > 0
    assert dice(m, baseline_mask([box], m.shape, "ellipse")) > 0.9


def test_propagate_logs_progress_when_stderr_is_not_a_terminal(capsys, ckpt, tmp_path, monkeypatch):
    """In a job's log (no terminal) propagation printed nothing until it ended; now a line
    'propagate: N/M frames (... frames/s, ETA ...)' now and then (every 10 s; here every call)."""
    from uniultra import cli
    from uniultra.data.io import write_seq_nrrd

    monkeypatch.setattr(cli, "LOG_EVERY_S", 0.0)
    rng = np.random.default_rng(2)
    clip = write_seq_nrrd(tmp_path / "clip.seq.nrrd", [(rng.random((40, 50)) * 255).astype(np.uint8)
                                                        for _ in range(5)])
    code, out, err = run(capsys, "propagate", "--clip", clip, "--frame", 0, "--box", 5, 5, 30, 30,
                         "--out-dir", tmp_path / "out", "--model", ckpt)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("propagate: ")]
    assert lines and all(re.fullmatch(r"propagate: \d/5 frames \([\d.]+ frames/s, ETA \d+ s\)", ln) for ln in lines)
    assert "5 masks written" in out


def test_truncated_model_file(capsys, ckpt, image, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(ckpt, "rb").read()[:1000])
    code, _, err = run(capsys, "segment", "--image", image, "--box", 1, 1, 5, 5, "--model", bad,
                       "--out", tmp_path / "m.png")
    assert code == 2 and "truncated" in err


def test_propagate_frames_and_clip(capsys, ckpt, tmp_path):
    rng = np.random.default_rng(1)
    lines = ["id,image"]
    frames = []
    for i in range(4):
        a = (rng.random((40, 50)) * 255).astype(np.uint8)
        frames.append(a)
        Image.fromarray(a).save(tmp_path / f"f{i}.png")
        lines.append(f"f{i},f{i}.png")
    (tmp_path / "frames.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "prompts.csv").write_text("id,x0,y0,x1,y1\nf1,5,5,30,30\n")
    code, _, err = run(capsys, "propagate", "--frames", tmp_path / "frames.csv", "--prompts",
                       tmp_path / "prompts.csv", "--out-dir", tmp_path / "out", "--model", ckpt)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"f{i}.png" for i in range(4)]
    from uniultra.data.io import write_seq_nrrd

    clip = write_seq_nrrd(tmp_path / "clip.seq.nrrd", frames)
    code, _, err = run(capsys, "propagate", "--clip", clip, "--frame", 0, "--box", 5, 5, 30, 30,
                       "--out-dir", tmp_path / "out2", "--model", ckpt)
    assert code == 0, err
    assert len(list((tmp_path / "out2").iterdir())) == 4
    code, _, err = run(capsys, "propagate", "--clip", clip, "--frame", 0, "--box", 5, 5, 30, 30,
                       "--motion", "none", "--out-dir", tmp_path / "out2b", "--model", ckpt)
    assert code == 0, err
    code, _, err = run(capsys, "propagate", "--clip", clip, "--frame", 0, "--box", 5, 5, 30, 30,
                       "--motion", "flow", "--out-dir", tmp_path / "out2c", "--model", ckpt)
    assert code == 2 and "'flow'" in err and "ncc" in err and not (tmp_path / "out2c").exists()
    (tmp_path / "prompts.csv").write_text("id,x0,y0,x1,y1\nf9,5,5,30,30\n")
    code, _, err = run(capsys, "propagate", "--frames", tmp_path / "frames.csv", "--prompts",
                       tmp_path / "prompts.csv", "--out-dir", tmp_path / "out3", "--model", ckpt)
    assert code == 2 and "f9" in err and not (tmp_path / "out3").exists()
    code, _, err = run(capsys, "propagate", "--clip", clip, "--frame", 7, "--box", 5, 5, 30, 30,
                       "--out-dir", tmp_path / "out4", "--model", ckpt)
    assert code == 2 and "outside the clip" in err


def test_propagate_real_dicom(capsys, ckpt, data_root, tmp_path):
    dcm = data_root / "dicom" / "US-PAL-8-10x-echo.dcm"
    code, _, err = run(capsys, "propagate", "--clip", dcm, "--frame", 3, "--box", 200, 150, 400, 300,
                       "--out-dir", tmp_path / "out", "--model", ckpt)
    assert code == 0, err
    assert len(list((tmp_path / "out").iterdir())) == 10


def test_info_json_keys(capsys):
    code, out, _ = run(capsys, "info", "uniultra-mini", "--json", "--image-size", 256)
    assert code == 0
    r = json.loads(out)
    for key in ("total_params", "trainable_params", "trainable_share", "updated_params", "encoder_params",
                "encoder_gflops"):
        assert key in r
    assert round(r["encoder_params"] / 1e6, 2) == 0.86 and r["encoder_gflops"] > 0


def test_models_lists_registry(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "sam2.1-hiera-large" in out and "uniultra-mini-us" in out
    marked = [line.split()[0] for line in out.splitlines() if line.endswith("(default)")]
    assert marked == ["uniultra-mini-us6pr"]  # exactly one row says it is the default
    code, out, _ = run(capsys, "models", "--json")
    assert [r["name"] for r in json.loads(out) if r["default"]] == ["uniultra-mini-us6pr"]


def test_export_onnx(capsys, ckpt, tmp_path):
    code, out, err = run(capsys, "export", "--model", ckpt, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert code == 0, err
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.decoder.onnx").is_file()
    code, _, err = run(capsys, "export", "--model", ckpt, "--format", "tflite", "--out", tmp_path / "x")
    assert code == 2 and "onnx" in err


def test_evaluate_json_and_overlays(capsys, ckpt, data_root, tmp_path):
    code, out, err = run(capsys, "evaluate", "--model", ckpt, "--data", data_root / "ddti", "--limit", 3,
                         "--json", "--out-dir", tmp_path / "ev")
    assert code == 0, err
    d = json.loads(out)["datasets"]["ddti"]
    assert d["n_images"] == 3 and d["ellipse_dice"] > 0.5
    with open(tmp_path / "ev" / "ddti" / "per_image.csv", newline="") as f:
        per_image = list(csv.DictReader(f))
    assert len(per_image) == 3  # the summary is the mean of the rows written
    assert d["dice"] == pytest.approx(sum(float(r["dice"]) for r in per_image) / 3, abs=1e-9)
    assert list((tmp_path / "ev" / "ddti").glob("worst_1_*.png"))


def test_training_commands_when_their_import_fails(monkeypatch, capsys):
    """A missing optional dependency leaves `uniultra train` as one clear line (exit 2); an import
    error inside the training package itself is a bug and is not turned into 'invalid choice'."""
    import builtins
    import sys

    from uniultra import cli

    real_import = builtins.__import__

    def failing(missing):
        def imp(name, globals=None, locals=None, fromlist=(), level=0):
            if name == "uniultra.training" and fromlist and "cli_commands" in fromlist:
                raise ImportError(f"No module named '{missing}'", name=missing)
            return real_import(name, globals, locals, fromlist, level)
        return imp

    monkeypatch.delitem(sys.modules, "uniultra.training.cli_commands", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing("torch"))
    assert cli.main(["train", "--data", "x", "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uniultra train needs torch" in err[0] and "make setup" in err[0]
    monkeypatch.setattr(builtins, "__import__", failing("uniultra.training.tasks"))
    with pytest.raises(ImportError, match="uniultra.training.tasks"):
        cli.build_parser()


def test_evaluate_several_data_folders(capsys, ckpt, data_root, tmp_path):
    """--data takes several folders (listed or repeated): each is scored, one merged result; before,
    a repeated --data silently kept only the last folder."""
    code, out, err = run(capsys, "evaluate", "--model", ckpt, "--data", data_root / "ddti", "--data",
                         data_root / "busi", "--limit", 2, "--json", "--out-dir", tmp_path / "ev")
    assert code == 0, err
    assert set(json.loads(out)["datasets"]) == {"ddti", "busi"}
    assert set(json.loads((tmp_path / "ev" / "summary.json").read_text())["datasets"]) == {"ddti", "busi"}
    assert (tmp_path / "ev" / "ddti" / "per_image.csv").is_file() and (tmp_path / "ev" / "busi" / "per_image.csv").is_file()
    # the same folder twice is scored once
    code, out, err = run(capsys, "evaluate", "--model", ckpt, "--data", data_root / "ddti", data_root / "ddti",
                         "--limit", 2, "--json")
    assert code == 0, err
    assert list(json.loads(out)["datasets"]) == ["ddti"]
    # two different folders with one name would overwrite each other's results: refused
    twin = tmp_path / "other" / "ddti"
    twin.mkdir(parents=True)
    (twin / "split.csv").write_text("id,split\n")
    code, out, err = run(capsys, "evaluate", "--model", ckpt, "--data", data_root / "ddti", twin, "--limit", 2)
    assert code == 2 and "two datasets are named 'ddti'" in err and len(err.strip().splitlines()) == 1


def test_evaluate_embed_cache_with_a_trained_encoder(capsys, ckpt, data_root, tmp_path):
    """Evaluation trains nothing, so it caches the embeddings of any model, also one whose encoder
    was trained (the CH-Adapter teacher of a GPU run was refused before): the same scores with
    the cache, filled on the first run and read on the second."""
    args = ["evaluate", "--model", ckpt, "--data", data_root / "ddti", "--limit", 2, "--json"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    ref = json.loads(out)["datasets"]["ddti"]["dice"]
    for _ in range(2):
        code, out, err = run(capsys, *args, "--embed-cache", tmp_path / "cache")
        assert code == 0, err
        assert json.loads(out)["datasets"]["ddti"]["dice"] == pytest.approx(ref, abs=1e-3)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2  # one embedding per image
