"""How long the UniUltra effect keeps Slicer's event loop waiting, measured through the very
controller the effect runs (slicer-core, the bundled model, the sample cine).

The effect has no worker thread (PythonQt keeps the GIL on the main thread): a box is predicted
synchronously inside the mouse-release event, and propagation hands control back to the event
loop (`pump`, i.e. `slicer.app.processEvents()` in Slicer) after every frame.  So the numbers
that matter are the time of one release event and the longest gap between two pumps.  Wall time
depends on what else the machine runs; process CPU time with one torch thread is what an idle
core would need.

    python benchmarks/effect_responsiveness.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "UniUltraSegment"), str(REPO / "Testing"), str(REPO)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mrml_fixtures import AXIAL, slice_to_ras  # noqa: E402
from UniUltraSegmentLib.context import create_context  # noqa: E402
from UniUltraSegmentLib.controller import InteractionController, ViewEvent  # noqa: E402
from UniUltraSegmentLib.engine import PredictorEngine, load_predictor  # noqa: E402
from UniUltraSegmentLib.geometry import slice_geometry  # noqa: E402
from UniUltraSegmentLib.segments import SegmentEditor, create_segmentation_for, get_or_add_segment  # noqa: E402
from UniUltraSegmentLib.sequences import load_sequence_file  # noqa: E402


def main(repeats: int = 3) -> None:
    torch.set_num_threads(1)
    ctx = create_context()
    cine = load_sequence_file(ctx, REPO / "UniUltraSegment" / "Resources" / "SampleData" / "CarotidCine.seq.nrrd")
    seg = create_segmentation_for(ctx, cine.proxy)
    sid = get_or_add_segment(seg, "artery")
    editor = SegmentEditor(ctx)
    editor.configure(seg, cine.proxy, sid)
    t0 = time.perf_counter()
    engine = PredictorEngine(load_predictor("uniultra-mini-us", "cpu"))
    load_s = time.perf_counter() - t0
    c = InteractionController(ctx, editor.node, editor, lambda: engine)
    s2r = slice_to_ras(AXIAL, 0.0)
    g = slice_geometry(cine.proxy, s2r)
    h, w = g.shape
    wall, cpu = [], []
    for i in range(repeats):
        t, ct = time.perf_counter(), time.process_time()
        c.press(ViewEvent("Red", s2r, None, tuple(g.pixel_to_ras(w * 0.3, h * 0.3)), (0, 0)))
        reply = c.release(ViewEvent("Red", s2r, None, tuple(g.pixel_to_ras(w * 0.6, h * 0.6)), (50, 50)))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - ct)
        assert not reply.error, reply.status
        if i < repeats - 1:
            c.undo_prompt()
    stamps, cstamps = [time.perf_counter()], [time.process_time()]
    reply = c.propagate("both", pump=lambda: (stamps.append(time.perf_counter()), cstamps.append(time.process_time())))
    gaps, cgaps = np.diff(stamps), np.diff(cstamps)
    print(f"{cine.num_frames} frames of {g.shape}, model load {load_s:.2f} s; {reply.status}")
    print(f"box -> preview (one release event): wall median {statistics.median(wall) * 1000:.0f} ms, "
          f"CPU median {statistics.median(cpu) * 1000:.0f} ms (first {cpu[0] * 1000:.0f} ms)")
    print(f"propagation, time between event-loop turns: wall median {np.median(gaps) * 1000:.0f} ms, "
          f"max {gaps.max() * 1000:.0f} ms; CPU median {np.median(cgaps) * 1000:.0f} ms, max {cgaps.max() * 1000:.0f} ms")
    c.close()


if __name__ == "__main__":
    main()
