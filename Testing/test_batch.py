"""`uniultra batch`: manifests, per-clip outputs Slicer opens, resume, per-clip errors, shards and
concurrent workers sharing one output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import drifting_disc_frames

from uniultra.batch import (
    STATE_DIR,
    Claim,
    Options,
    parse_shard,
    read_manifest,
    run_batch,
    shard_jobs,
    write_summary,
)
from uniultra.cli import main
from uniultra.data.io import write_seq_nrrd
from uniultra.errors import Cancelled, InputError
from uniultra.inference import Predictor
from uniultra.models import build_model

REPO = Path(__file__).resolve().parents[1]
H, W = 40, 48


def _frames(n, seed):
    return drifting_disc_frames(n, seed, H, W)


@pytest.fixture
def clips(tmp_path):
    """Three good clips (a .seq.nrrd, a folder of PNG frames, a glob of PNGs) in tmp_path/clips."""
    d = tmp_path / "clips"
    d.mkdir()
    write_seq_nrrd(d / "a.seq.nrrd", _frames(5, 0))
    (d / "b").mkdir()
    for i, f in enumerate(_frames(4, 1)):
        Image.fromarray(f).save(d / "b" / f"img_{i + 1}.png")  # natural order: 1, 2, ... not 1, 10, 2
    for i, f in enumerate(_frames(3, 2)):
        Image.fromarray(f).save(d / f"c_{i:02d}.png")
    return d


def _manifest(tmp_path, rows: str, name="m.csv") -> Path:
    p = tmp_path / name
    p.write_text("name,clip,frame,structure,x0,y0,x1,y1,points\n" + rows)
    return p


GOOD = ("a,clips/a.seq.nrrd,0,disc,5,10,28,30,\n"
        "a,clips/a.seq.nrrd,2,background,30,2,46,12,\n"
        "b,clips/b,1,disc,6,10,28,30,15 20 1\n"
        "c,clips/c_*.png,0,disc,5,10,28,30,\n")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------------- manifest
def test_three_manifest_forms_give_the_same_jobs(tmp_path, clips):
    csv_jobs = read_manifest(_manifest(tmp_path, GOOD))
    assert [j.name for j in csv_jobs] == ["a", "b", "c"]
    assert list(csv_jobs[0].structures) == ["disc", "background"]
    assert csv_jobs[1].structures["disc"][0].points == [(15.0, 20.0, 1)]
    jl = tmp_path / "m.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"name": "a", "clip": "clips/a.seq.nrrd", "prompts": [
            {"frame": 0, "structure": "disc", "box": [5, 10, 28, 30]},
            {"frame": 2, "structure": "background", "box": [30, 2, 46, 12]}]},
        {"clip": "clips/b", "prompts": [{"frame": 1, "structure": "disc", "box": [6, 10, 28, 30],
                                         "points": [[15, 20, 1]]}]},
        {"name": "c", "clip": "clips/c_*.png", "prompts": [{"structure": "disc", "box": [5, 10, 28, 30]}]},
    ]) + "\n")
    jl_jobs = read_manifest(jl)
    assert [(j.name, j.fingerprint({})) for j in jl_jobs] == [(j.name, j.fingerprint({})) for j in csv_jobs]
    # a folder of clips + one prompts file; '*' rows apply to every clip
    (tmp_path / "p.csv").write_text("clip,frame,structure,x0,y0,x1,y1\n*,0,disc,5,10,28,30\n"
                                    "a.seq.nrrd,2,background,30,2,46,12\n")
    (clips / "c_00.png").rename(tmp_path / "moved.png")  # keep only clips: a.seq.nrrd and the folder b
    for p in clips.glob("c_*.png"):
        p.unlink()
    f_jobs = read_manifest(clips, tmp_path / "p.csv")
    assert [j.name for j in f_jobs] == ["a.seq.nrrd".removesuffix(".seq.nrrd"), "b"]
    assert list(f_jobs[0].structures) == ["disc", "background"] and list(f_jobs[1].structures) == ["disc"]


@pytest.mark.parametrize("body, message", [
    ("a,clips/a.seq.nrrd,0,disc,5,x,28,30,\n", "line 2: box value 'x': not a number"),
    ("a,clips/a.seq.nrrd,0,disc,5,inf,28,30,\n", "line 2: box value inf: give a finite number"),
    ("a,clips/a.seq.nrrd,1.5,disc,5,10,28,30,\n", "line 2: frame 1.5: give a whole number"),
    ("a,clips/a.seq.nrrd,0,disc,5,10,28,30,\nA,clips/b,0,disc,5,10,28,30,\n", "line 3: output name 'A' is already used"),
    ("../up,clips/a.seq.nrrd,0,disc,5,10,28,30,\n", "line 2: output name '../up'"),
    ("a,clips/a.seq.nrrd,0,dis/c,5,10,28,30,\n", "line 2: structure 'dis/c'"),
    (",clips/c_*.png,0,disc,5,10,28,30,\n", "line 2: clip 'clips/c_*.png' is a glob"),
    ("a,clips/a.seq.nrrd,-1,disc,5,10,28,30,\n", "line 2: frame -1"),
    ("a,clips/a.seq.nrrd,0,disc,28,10,28,30,\n", "line 2: box (28, 10, 28, 30) is empty"),
    ("a,clips/a.seq.nrrd,0,disc,,,,,\n", "line 2: no prompt"),
    ("a,clips/a.seq.nrrd,0,disc,5,10,28,30,1 2 7\n", "line 2: point label '7'"),
])
def test_bad_manifest_is_refused_before_any_work(capsys, ckpt, tmp_path, clips, body, message):
    code, _, err = run(capsys, "batch", _manifest(tmp_path, body), "--out-dir", tmp_path / "out", "--model", ckpt)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("uniultra: error:") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_manifest_files(capsys, ckpt, tmp_path):
    (tmp_path / "cols.csv").write_text("clip,x0,y0\na.dcm,1,2\n")
    (tmp_path / "bad.jsonl").write_text('{"clip": "a.dcm", "prompts": [{"box": [1, 2, 3, 4]}]}\n{"clip": \n')
    for m, msg in [(tmp_path / "cols.csv", "line 1: the header must have"), (tmp_path / "bad.jsonl", "line 2: not valid JSON"),
                   (tmp_path / "none.csv", "does not exist")]:
        code, _, err = run(capsys, "batch", m, "--out-dir", tmp_path / "out", "--model", ckpt)
        assert code == 2 and msg in err and err.count("\n") == 1, err
    (tmp_path / "ok.csv").write_text("clip,x0,y0,x1,y1\nclip.seq.nrrd,1,2,3,4\n")
    code, _, err = run(capsys, "batch", tmp_path / "ok.csv", "--out-dir", tmp_path / "out", "--model", tmp_path / "no.pt",
                       "--events", tmp_path / "ev.jsonl")
    assert code == 2 and "no.pt" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ev.jsonl").exists()
    with pytest.raises(InputError, match="--shard 2/2"):
        parse_shard("2/2")


def test_shard_partition_and_slurm_task_id(tmp_path, clips):
    assert parse_shard(None, {}) == (0, 1)
    assert parse_shard("1/3", {}) == (1, 3)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}
    assert parse_shard(None, env) == (2, 4)
    jobs = read_manifest(_manifest(tmp_path, GOOD))
    shares = [shard_jobs(jobs, k, 2) for k in range(2)]
    assert sorted(j.name for s in shares for j in s) == ["a", "b", "c"]  # disjoint, nothing lost
    assert [j.name for j in shares[0]] == ["a", "c"]


# ------------------------------------------------------------------------------------------- a run
def test_batch_run_outputs_errors_resume_and_redo(capsys, ckpt, tmp_path, clips):
    bad = ("d,clips/missing.dcm,0,disc,5,10,28,30,\n"      # unreadable
           "e,clips/a.seq.nrrd,9,disc,5,10,28,30,\n"       # key frame outside the clip
           "f,clips/b,0,disc,500,500,600,600,\n")         # box outside the image
    m = _manifest(tmp_path, GOOD + bad)
    out, ev = tmp_path / "out", tmp_path / "ev.jsonl"
    code, stdout, err = run(capsys, "batch", m, "--out-dir", out, "--model", ckpt, "--png", "--save-frames",
                            "--events", ev)
    assert code == 103, err  # 100 + 3 failed clips
    assert "3 clips labelled" in stdout and "missing.dcm" in err and "key frame 9" in err and "outside" in err
    # one staged unit per clip
    a = out / "a"
    assert sorted(p.name for p in a.iterdir()) == ["a.seg.nrrd", "a.seq.nrrd", "a_frames.seq.nrrd", "clip.json",
                                                   "frames.csv", "png"]
    meta = json.loads((a / "clip.json").read_text())
    assert meta["frames"] == 5 and [s["name"] for s in meta["structures"]] == ["disc", "background"]
    assert meta["encoded_frames"] == 5  # the two structures share each frame's embedding
    assert len((a / "frames.csv").read_text().splitlines()) == 1 + 2 * 5
    assert len(list((a / "png" / "disc").glob("*.png"))) == 5
    assert json.loads((out / "b" / "clip.json").read_text())["frames"] == 4
    assert not (out / "d").exists() and not list((out / STATE_DIR / "staging").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"] == {"clips": 6, "done": 3, "failed": 3, "todo": 0, "frames": 12,
                                "seconds": summary["total"]["seconds"]}
    by = {r["name"]: r for r in summary["clips"]}
    assert by["e"]["status"] == "failed" and "key frame 9 is outside the clip" in by["e"]["error"]
    names = [e["event"] for e in events(ev)]
    assert names[0] == "run_start" and names[-1] == "run_end" and names.count("clip_done") == 3
    assert names.count("clip_failed") == 3 and "clip_progress" in names and "run_progress" in names
    assert all(isinstance(e["time"], float) for e in events(ev))
    # rerun: done clips are skipped, failed ones retried
    stamp = (a / "clip.json").stat().st_mtime_ns
    code, stdout, _ = run(capsys, "batch", m, "--out-dir", out, "--model", ckpt, "--events", ev)
    assert code == 103 and "0 clips labelled, 3 already done, 3 failed" in stdout
    assert (a / "clip.json").stat().st_mtime_ns == stamp
    # fix the manifest: only the bad clips run
    code, stdout, _ = run(capsys, "batch", _manifest(tmp_path, GOOD), "--out-dir", out, "--model", ckpt)
    assert code == 0 and "0 clips labelled, 3 already done" in stdout
    # a changed prompt redoes that clip only; --redo redoes all
    changed = GOOD.replace("c,clips/c_*.png,0,disc,5,10,28,30", "c,clips/c_*.png,1,disc,5,10,28,30")
    code, stdout, _ = run(capsys, "batch", _manifest(tmp_path, changed), "--out-dir", out, "--model", ckpt)
    assert code == 0 and "1 clips labelled, 2 already done" in stdout
    code, stdout, _ = run(capsys, "batch", _manifest(tmp_path, changed), "--out-dir", out, "--model", ckpt, "--redo")
    assert code == 0 and "3 clips labelled, 0 already done" in stdout
    assert (a / "clip.json").stat().st_mtime_ns != stamp
    # the merge step alone
    code, stdout, _ = run(capsys, "batch", _manifest(tmp_path, changed), "--out-dir", out, "--summary")
    assert code == 0 and "3 of 3 clips done" in stdout


def test_wrong_frame_count_and_cancel_leave_no_clip(ckpt, tmp_path, clips):
    jobs = read_manifest(_manifest(tmp_path, GOOD))
    jobs[1].n_frames = 7
    out = tmp_path / "out"
    load = lambda model: Predictor(build_model(ckpt), "cpu")  # noqa: E731
    calls = []

    def cancel():  # cancel in the middle of the first clip
        calls.append(1)
        return len(calls) == 3

    with pytest.raises(Cancelled):
        run_batch(jobs, out, load, Options(), cancel=cancel, progress=False)
    assert not (out / "a").exists() and not list((out / STATE_DIR / "staging").iterdir())
    free = Claim(out, "a")
    assert free.acquire()  # released on the way out
    free.release()
    res = run_batch(jobs, out, load, Options(), progress=False)
    assert (res.done, res.failed) == (2, 1) and "n_frames 7" in res.failures[0][1]
    assert res.exit_status == 101
    assert write_summary(jobs, out)["done"] == 2


def test_without_a_model_the_bundled_default_labels(capsys, tmp_path, clips):
    """No --model and no model column: the bundled default (was: build_model(None) crashed)."""
    man = _manifest(tmp_path, "a,clips/a.seq.nrrd,0,disc,5,10,28,30,\n")
    code, out, err = run(capsys, "batch", man, "--out-dir", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "a" / "clip.json").read_text())
    assert meta["frames"] == 5 and meta["model"] == "default"


def test_outputs_open_in_slicer_as_named_segments(tmp_path, data_root):
    """Real carotid frames, the bundled model; the files are read back with slicer-core."""
    pytest.importorskip("slicer")
    sys.path.insert(0, str(REPO / "Testing"))
    import slicer
    from mrml_fixtures import mrml_context, read_file_into, read_segment_labelmap
    from vtk.util import numpy_support

    ids = sorted(p.stem for p in (data_root / "carotid" / "images").glob("202201121854340043VAS_*.png"))[:4]
    d = tmp_path / "frames"
    d.mkdir()
    for i in ids:
        (d / f"{i}.png").symlink_to(data_root / "carotid" / "images" / f"{i}.png")
    m = np.asarray(Image.open(data_root / "carotid" / "masks" / f"{ids[0]}.png")) > 0
    ys, xs = np.nonzero(m)
    box = f"{xs.min()},{ys.min()},{xs.max()},{ys.max()}"
    man = _manifest(tmp_path, f"clip1,frames,0,CCA,{box},\nclip1,frames,0,far wall,10,220,300,240,\n")
    jobs = read_manifest(man)
    run_batch(jobs, tmp_path / "out", lambda _: Predictor.from_name("uniultra-mini-us", "cpu"),
              Options(png=True), progress=False)
    out = tmp_path / "out" / "clip1"
    png = {s: np.stack([np.asarray(Image.open(out / "png" / s / f"frame_{f:04d}.png")) > 0 for f in range(4)])
           for s in ("CCA", "far wall")}
    assert png["CCA"].any() and png["CCA"].sum(axis=(1, 2)).min() > 0.5 * m.sum()
    ctx = next(mrml_context())
    seg = read_file_into(ctx, slicer.vtkMRMLSegmentationNode(), slicer.vtkMRMLSegmentationStorageNode(),
                         out / "clip1.seg.nrrd")
    s = seg.GetSegmentation()
    assert [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())] == ["CCA", "far wall"]
    for i, name in enumerate(("CCA", "far wall")):
        lm, arr = read_segment_labelmap(seg, i)
        e = lm.GetExtent()
        full = np.zeros(png[name].shape, bool)
        full[e[4]:e[5] + 1, e[2]:e[3] + 1, e[0]:e[1] + 1] = arr == s.GetNthSegment(i).GetLabelValue()
        assert np.array_equal(full, png[name]), name
    seq = slicer.vtkMRMLSequenceNode()
    ctx.scene.AddNode(seq)
    st = slicer.vtkMRMLVolumeSequenceStorageNode()
    ctx.scene.AddNode(st)  # (as Slicer's reader does: the labelmap class is created through the scene)
    st.SetFileName(str(out / "clip1.seq.nrrd"))
    assert st.ReadData(seq) and seq.GetNumberOfDataNodes() == 4
    assert seq.GetNthDataNode(0).GetClassName() == "vtkMRMLLabelMapVolumeNode"
    for f in range(4):
        lab = numpy_support.vtk_to_numpy(seq.GetNthDataNode(f).GetImageData().GetPointData().GetScalars())
        lab = lab.reshape(png["CCA"].shape[1:])
        assert np.array_equal(lab == 1, png["CCA"][f] & ~png["far wall"][f])
        assert np.array_equal(lab == 2, png["far wall"][f])


# ------------------------------------------------------------------------------------------- workers
def _worker(manifest, out, ckpt, *extra, events=None):
    cmd = [sys.executable, "-m", "uniultra.cli", "batch", str(manifest), "--out-dir", str(out), "--model", ckpt,
           "--device", "cpu", *extra]
    if events:
        cmd += ["--events", str(events)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _tree(d: Path) -> dict:
    """Relative path -> bytes of every output file that does not carry a time or a worker id."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and STATE_DIR not in p.parts and p.name not in ("clip.json", "summary.csv", "summary.json")}


def _many(tmp_path, clips, n=6) -> Path:
    rows = "".join(f"c{i},clips/{'a.seq.nrrd' if i % 2 else 'b'},0,disc,{5 + i},10,28,30,\n" for i in range(n))
    return _manifest(tmp_path, rows)


def test_two_workers_share_one_folder_and_match_one_process(ckpt, tmp_path, clips):
    """Two concurrent local worker processes without shards (they split the clips through the
    claims), then shards 0/2 and 1/2: the same bytes as one process, each clip labelled once."""
    man = _many(tmp_path, clips)
    jobs = read_manifest(man)
    one = tmp_path / "one"
    run_batch(jobs, one, lambda _: Predictor(build_model(ckpt), "cpu"), Options(), progress=False)
    two = tmp_path / "two"
    procs = [_worker(man, two, ckpt, events=tmp_path / f"ev{k}.jsonl") for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    done = [e["clip"] for k in range(2) for e in events(tmp_path / f"ev{k}.jsonl") if e["event"] == "clip_done"]
    assert sorted(done) == sorted(j.name for j in jobs)  # none twice, none lost
    assert _tree(two) == _tree(one)
    sharded = tmp_path / "sharded"  # (in this process, to keep the suite fast: the shares are what matter)
    for k in range(2):
        res = run_batch(jobs, sharded, lambda _: Predictor(build_model(ckpt), "cpu"), Options(), shard=(k, 2),
                        progress=False)
        assert res.done == 3
    assert _tree(sharded) == _tree(one)
    assert write_summary(jobs, sharded)["done"] == len(jobs)


@pytest.mark.slow
def test_a_worker_killed_mid_clip_loses_nothing(ckpt, tmp_path, clips):
    """SIGKILL during a clip: no half clip, the claim is free again, a rerun finishes the job."""
    man = _many(tmp_path, clips, n=4)
    out, ev = tmp_path / "out", tmp_path / "ev.jsonl"
    p = _worker(man, out, ckpt, events=ev)
    deadline = time.time() + 240
    while time.time() < deadline and not any(e["event"] == "clip_start" and e["clip"] == "c1" for e in events(ev)):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    assert not (out / "c1").exists()
    assert Claim(out, "c1").acquire()
    q = _worker(man, out, ckpt, events=ev)
    stdout, err = q.communicate(timeout=300)
    assert q.returncode == 0, err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith((".", "summary"))) == ["c0", "c1", "c2", "c3"]
    assert not list((out / STATE_DIR / "staging").iterdir())
