"""The Segment module's cine batch labeling (UniUltraSegmentLib/batch.py) on the real Slicer core:
a manifest written from the scene's labelled key frames, the real `uniultra batch` launched as the
panel launches it (progress from its events, cancel, resume), and results loaded back as
segmentation sequences."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest
from mrml_fixtures import AXIAL, mrml_context, slice_to_ras
from synthetic import drifting_disc_frames
from UniUltraSegmentLib import batch
from UniUltraSegmentLib.geometry import slice_geometry, volume_array
from UniUltraSegmentLib.segments import SegmentEditor, segment_array
from UniUltraSegmentLib.sequences import (
    create_cine,
    ensure_segmentation_sequence,
    get_or_add_segment_in_all,
    write_cine_masks,
)

from uniultra.data.io import read_frames

pytestmark = pytest.mark.mrml
ctx = pytest.fixture(mrml_context)
H, W = 40, 48
RUN_TIMEOUT = 900  # a loaded 2-core machine needs tens of seconds to start torch in the subprocess
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two cores shared with other jobs: no spinning thread pool


def _frames(n, seed, rgb=False):
    return drifting_disc_frames(n, seed, H, W, rgb)


def _box(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def _labelled_cine(ctx, name, n, seed, key: dict, rgb=False, spacing=(0.3, 0.2)):
    """A cine in the scene with its per-frame segmentation; key = {segment name: {frame: mask}}."""
    cine = create_cine(ctx, _frames(n, seed, rgb), spacing=spacing, name=name)
    geom = slice_geometry(cine.proxy, slice_to_ras(AXIAL, 0.0))
    names = list(key)
    seg, sid = ensure_segmentation_sequence(ctx, cine, segment_name=names[0])
    editor = SegmentEditor(ctx)
    for s in names:
        sid = get_or_add_segment_in_all(cine.browser.GetSequenceNode(seg), seg, s)
        editor.configure(seg, cine.proxy, sid)
        write_cine_masks(ctx, editor, cine, seg, sid, geom, key[s], mode="add")
    return cine, seg


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------- scene -> manifest
def test_manifest_from_the_scene(ctx, tmp_path):
    two = _box(5, 12, 20, 27) | _box(30, 3, 33, 6)  # two pieces on one frame: two boxes
    a, _ = _labelled_cine(ctx, "carotid a", 6, 1, {"CCA": {0: _box(6, 11, 24, 29), 4: two},
                                                   "jugular/vein (IJV)": {2: _box(28, 2, 40, 9)}})
    b, _ = _labelled_cine(ctx, "carotid a", 4, 2, {"CCA": {1: _box(3, 4, 9, 10)}}, rgb=True)  # same name
    create_cine(ctx, _frames(3, 3), name="unlabelled")
    out = tmp_path / "labels"
    m = batch.write_scene_manifest(ctx, out)
    assert m.path == out / batch.SLICER_DIR / "manifest.csv"
    assert [c.name for c in m.clips] == ["carotid a", "carotid a_2"]
    assert [n for n, _ in m.skipped] == ["unlabelled"] and "no per-frame segmentation" in m.skipped[0][1]
    rows = [(r["name"], r["frame"], r["structure"], tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1")))
            for r in _rows(m.path)]
    assert sorted(rows) == sorted([
        ("carotid a", "0", "CCA", (6, 11, 24, 29)), ("carotid a", "4", "CCA", (5, 12, 20, 27)),
        ("carotid a", "4", "CCA", (30, 3, 33, 6)), ("carotid a", "2", "jugular_vein _IJV_", (28, 2, 40, 9)),
        ("carotid a_2", "1", "CCA", (3, 4, 9, 10))])
    # the engine reads the manifest, and the frames it will label are exactly the scene's
    jobs = batch.BatchSettings(str(m.path), str(out)).check()
    assert [j.name for j in jobs] == ["carotid a", "carotid a_2"]
    assert sorted(jobs[0].structures) == ["CCA", "jugular_vein _IJV_"]  # names the runner can use as folders
    for cine, job in zip((a, b), jobs):
        frames = read_frames(job.clip)
        assert len(frames) == cine.num_frames
        for f in range(cine.num_frames):
            assert np.array_equal(frames[f], volume_array(cine.sequence.GetNthDataNode(f))[0])
    assert a.browser.GetAttribute(batch.CLIP_ATTRIBUTE) == str((out / batch.SLICER_DIR / "clips" / "carotid a.seq.nrrd").resolve())
    # writing again changes nothing on disk (same frames): the batch runner's fingerprints stay, a rerun resumes
    clip = out / batch.SLICER_DIR / "clips" / "carotid a.seq.nrrd"
    before = (clip.stat().st_mtime_ns, clip.read_bytes(), m.path.read_bytes())
    time.sleep(0.02)
    batch.write_scene_manifest(ctx, out)
    assert (clip.stat().st_mtime_ns, clip.read_bytes(), m.path.read_bytes()) == before
    assert sorted(p.name for p in (out / batch.SLICER_DIR).rglob("*") if p.is_file()) == \
        ["carotid a.seq.nrrd", "carotid a_2.seq.nrrd", "manifest.csv"]  # no temporary file left


def test_manifest_from_the_scene_refusals(ctx, tmp_path):
    out = tmp_path / "labels"
    with pytest.raises(ValueError, match="holds no cine"):
        batch.write_scene_manifest(ctx, out)
    cine = create_cine(ctx, _frames(3, 0), name="c")
    ensure_segmentation_sequence(ctx, cine, segment_name="CCA")  # a segmentation, nothing drawn
    with pytest.raises(ValueError, match="'c': its segmentation is empty on every frame"):
        batch.write_scene_manifest(ctx, out)
    assert not out.exists()  # nothing written
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        batch.write_scene_manifest(ctx, tmp_path / "file")


def test_settings_refuse_bad_input_before_anything_starts(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("name,clip,frame,structure,x0,y0,x1,y1\na,a.seq.nrrd,0,CCA,1,2,x,4\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"m.csv line 2: box value 'x': not a number"):
        batch.BatchRun(batch.BatchSettings(str(bad), str(out)))
    with pytest.raises(ValueError, match="does not exist"):
        batch.BatchSettings(str(tmp_path / "nope.csv"), str(out)).check()
    with pytest.raises(ValueError, match="model checkpoint .*gone.pt' does not exist"):
        batch.BatchSettings(str(bad), str(out), model=str(tmp_path / "gone.pt")).check()
    with pytest.raises(ValueError, match="device 'tpu'"):
        batch.BatchSettings(str(bad), str(out), device="tpu").check()
    with pytest.raises(ValueError, match="no output folder"):
        batch.BatchSettings(str(bad), "").check()
    assert not out.exists()
    s = batch.BatchSettings("m.csv", "o", model="x.pt", png=True, redo=True, device="cpu")
    assert s.args("e.jsonl") == ["batch", "m.csv", "--out-dir", "o", "--device", "cpu", "--events", "e.jsonl",
                                 "--model", "x.pt", "--png", "--save-frames", "--redo"]
    (ev1, log1), (ev2, log2) = s.run_files(), s.run_files()
    assert ev1 != ev2 and log1 != log2 and ev1.parent == log1.parent == Path("o") / batch.SLICER_DIR / "runs"


def test_flagged_frames_and_results_of_a_folder(tmp_path):
    """What the review starts from: the runner's per-frame flags, and the results in a folder
    without a manifest (every complete clip folder; a damaged clip.json is shown, not fatal)."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "frames.csv").write_text("frame,structure,area_px,x0,y0,x1,y1,score,flags\n"
                                  "0,CCA,50,1,1,8,8,0.9,key\n1,CCA,52,1,1,8,8,0.4,low_score\n"
                                  "2,CCA,0,,,,,,absent\n3,CCA,51,1,1,8,8,0.9,\n"
                                  "0,IJV,20,1,1,4,4,0.8,key;shift\n")
    (a / "clip.json").write_text('{"name": "a", "frames": 4, "structures": [{"name": "CCA", "label": 1}], '
                                 '"warnings": ["CCA: absent on 1 of 4 frames"]}')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "clip.json").write_text("{not json")
    (tmp_path / "c").mkdir()  # no clip.json: not a result (a clip in progress leaves nothing here)
    assert batch.flagged_frames(a) == {"CCA": [1, 2], "IJV": [0]}
    assert batch.flagged_frames(tmp_path / "c") == {}
    rows = {r["name"]: r for r in batch.read_results(tmp_path)}
    assert sorted(rows) == ["a", "b"]
    assert (rows["a"]["status"], rows["a"]["frames"], rows["a"]["structures"], rows["a"]["warnings"]) == \
        ("done", 4, ["CCA"], ["CCA: absent on 1 of 4 frames"])
    assert rows["b"]["status"] == "unreadable" and "cannot be read" in rows["b"]["error"]
    assert batch.read_results(tmp_path / "nope") == []


# --------------------------------------------------------------------------------- run, load
def test_run_in_a_subprocess_and_load_for_review(ctx, tmp_path, ckpt):
    cine, key_seg = _labelled_cine(ctx, "clip one", 8, 5, {"disc": {0: _box(6, 12, 24, 28)},
                                                           "corner": {3: _box(36, 30, 45, 37)}})
    out = tmp_path / "labels"
    m = batch.write_scene_manifest(ctx, out)
    run = batch.BatchRun(batch.BatchSettings(str(m.path), str(out), model=ckpt, device="cpu"), env=ENV).start()
    assert run.status == "running"
    seen = []
    while run.running:
        seen.extend(e["event"] for e in run.poll())
        assert 0.0 <= run.fraction <= 1.0 and run.status_text()
        time.sleep(0.05)
    run.wait(RUN_TIMEOUT)
    seen.extend(e["event"] for e in run.poll())
    assert run.returncode == 0 and run.status == "finished", run.lines
    assert {"run_start", "clip_start", "clip_done", "run_end"} <= set(seen)
    assert (run.total, run.done, run.failed, run.frames, run.fraction) == (1, 1, 0, 8, 1.0)
    assert run.status_text() == "1 clips labelled (8 frames)"
    assert any("clips labelled" in line for line in run.lines)  # the command's own summary line, in the log
    assert run.log_path.read_text().startswith("$ ") and run.log_path.parent == out / batch.SLICER_DIR / "runs"
    [row] = run.results()
    assert row["status"] == "done" and row["frames"] == 8 and row["structures"] == ["disc", "corner"]

    n_nodes = ctx.scene.GetNumberOfNodes()
    res = batch.load_result(ctx, out / "clip one")
    assert res.cine.browser is cine.browser  # back into the cine it was labelled from, no second copy of the frames
    assert res.segmentation is not key_seg  # a new segmentation: the user's key frames stay as they were
    assert res.sequence.GetAttribute(batch.RESULT_ATTRIBUTE) == str((out / "clip one").resolve())
    assert batch.segmentation_sequences(cine) == [cine.browser.GetSequenceNode(key_seg)]  # a result is no prompt
    assert cine.browser.GetSequenceNode(res.segmentation) is res.sequence and cine.browser.GetSaveChanges(res.sequence)
    assert res.sequence.GetNumberOfDataNodes() == 8 and ctx.scene.GetNumberOfNodes() > n_nodes
    seg = res.segmentation.GetSegmentation()
    assert [seg.GetSegment(res.segment_ids[s]).GetName() for s in ("disc", "corner")] == ["disc", "corner"]
    # each frame's item holds exactly the labels the batch wrote for that frame, on the frame's grid
    labels = batch._read_label_sequence(out / "clip one" / "clip one.seq.nrrd")
    assert sum(int((lab > 0).sum()) for lab in labels) > 0
    for f in range(8):
        item = res.sequence.GetNthDataNode(f)
        vol = cine.sequence.GetNthDataNode(f)
        for label, s in ((1, "disc"), (2, "corner")):
            assert np.array_equal(segment_array(item, res.segment_ids[s], vol)[0] > 0, labels[f] == label), (f, s)
    # the proxy shows the frame the browser shows (review by scrubbing)
    cine.select(5)
    assert np.array_equal(segment_array(res.segmentation, res.segment_ids["disc"], cine.proxy)[0] > 0, labels[5] == 1)
    # a cine is only offered for its own frames' size and count
    other = create_cine(ctx, _frames(7, 9), name="other")
    n_nodes = ctx.scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="has 8 labelled frames, cine 'other' has 7"):
        batch.load_result(ctx, out / "clip one", cine=other)
    assert ctx.scene.GetNumberOfNodes() == n_nodes
    with pytest.raises(ValueError, match="no finished clip"):
        batch.load_result(ctx, out)


def test_result_loads_into_a_fresh_scene_from_its_saved_frames(ctx, tmp_path, ckpt):
    """A result from another session (the scene's cine is gone): the frames saved next to the labels."""
    import slicer

    _labelled_cine(ctx, "c", 5, 3, {"disc": {2: _box(8, 12, 26, 28)}}, spacing=(0.4, 0.25))
    out = tmp_path / "labels"
    m = batch.write_scene_manifest(ctx, out)
    run = batch.BatchRun(batch.BatchSettings(str(m.path), str(out), model=ckpt, device="cpu"), env=ENV).start()
    assert run.wait(RUN_TIMEOUT) == 0, run.lines
    ctx.scene.Clear(0)
    res = batch.load_result(ctx, out / "c")
    assert res.cine.num_frames == 5 and res.cine.proxy.GetName() == "c"
    assert np.allclose(res.cine.proxy.GetSpacing()[:2], (0.4, 0.25))
    # the review cine is the very frames that were labelled
    src = read_frames(out / batch.SLICER_DIR / "clips" / "c.seq.nrrd")
    assert all(np.array_equal(volume_array(res.cine.sequence.GetNthDataNode(f))[0], src[f]) for f in range(5))
    assert isinstance(res.segmentation, slicer.vtkMRMLSegmentationNode)
    labels = batch._read_label_sequence(out / "c" / "c.seq.nrrd")
    item = res.sequence.GetNthDataNode(2)
    assert np.array_equal(segment_array(item, res.segment_ids["disc"], res.cine.sequence.GetNthDataNode(2))[0] > 0,
                          labels[2] == 1)


def test_cancel_then_resume(ctx, tmp_path, ckpt):
    for k in range(4):
        _labelled_cine(ctx, f"c{k}", 8, k, {"disc": {0: _box(6, 12, 24, 28)}})
    out = tmp_path / "labels"
    m = batch.write_scene_manifest(ctx, out)
    settings = batch.BatchSettings(str(m.path), str(out), model=ckpt, device="cpu")
    run = batch.BatchRun(settings, env=ENV).start()
    deadline = time.monotonic() + RUN_TIMEOUT
    while run.done == 0 and run.running and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    assert run.done >= 1, run.lines
    run.cancel()
    assert run.wait(120) == batch.EXIT_CANCELLED, run.lines
    assert run.status == "cancelled" and run.status_text().startswith("Cancelled after")
    progress = batch.progress_of(run.jobs, out)
    done = progress["done"]
    assert 1 <= done < 4 and progress == {"clips": 4, "done": done, "failed": 0, "todo": 4 - done}
    staging = out / ".uniultra-batch" / "staging"
    assert not staging.exists() or not any(staging.iterdir())  # the clip in progress left nothing
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        sorted([r["name"] for r in batch.read_results(out, run.jobs) if r["status"] == "done"] + ["summary.csv", "summary.json"])
    # the same settings again: resumes (skips what is done), finishes the rest
    again = batch.BatchRun(settings, env=ENV).start()
    assert again.wait(RUN_TIMEOUT) == 0, again.lines
    assert (again.skipped, again.total, again.done) == (done, 4 - done, 4 - done)
    assert batch.progress_of(again.jobs, out) == {"clips": 4, "done": 4, "failed": 0, "todo": 0}
    assert [r["status"] for r in again.results()] == ["done"] * 4


def test_failed_clip_and_engine_error_reach_the_panel(ctx, tmp_path, ckpt):
    clips = tmp_path / "clips"
    clips.mkdir()
    from uniultra.data.io import write_seq_nrrd

    write_seq_nrrd(clips / "ok.seq.nrrd", _frames(4, 1))
    (clips / "broken.seq.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("name,clip,frame,structure,x0,y0,x1,y1\n"
                        "ok,clips/ok.seq.nrrd,0,disc,6,12,24,28\nbroken,clips/broken.seq.nrrd,0,disc,6,12,24,28\n"
                        "late,clips/ok.seq.nrrd,9,disc,6,12,24,28\n")
    out = tmp_path / "out"
    run = batch.BatchRun(batch.BatchSettings(str(manifest), str(out), model=ckpt, device="cpu"), env=ENV).start()
    assert run.wait(RUN_TIMEOUT) == 102, run.lines
    assert run.status == "finished with failures" and (run.done, run.failed) == (1, 2)
    rows = {r["name"]: r for r in run.results()}
    assert rows["ok"]["status"] == "done"
    assert rows["broken"]["status"] == "failed" and rows["broken"]["error"]
    assert rows["late"]["status"] == "failed" and "key frame 9 is outside the clip" in rows["late"]["error"]
    # an error the engine finds only when it starts (an unknown model name) is its one line
    bad = batch.BatchRun(batch.BatchSettings(str(manifest), str(tmp_path / "out2"), model="no-such-model",
                                             device="cpu")).start()
    assert bad.wait(RUN_TIMEOUT) == 2
    assert bad.status == "error" and "no-such-model" in bad.error_message()
    assert not os.path.exists(tmp_path / "out2" / "ok")
