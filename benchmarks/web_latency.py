"""UniUltra Web: box to visible mask in a real browser, and memory per session (one run).

    .venv-web/bin/python benchmarks/web_latency.py [--n 20] [--image ../shared/data/busi/images/benign_001.png]
                                                  [--out benchmarks/results]

Starts the app (`python -m uniultra_web IMAGE`, bundled model) on a free localhost port, opens it
in Debian's chromium through Playwright, and times n real mouse drags of the same box:

* t_up: the page's own `pointerup` on the view (performance.now(), in the page);
* t_visible: the first streamed view frame (the <img> trame-rca updates) whose pixels inside the
  box differ from the frame before the drag by more than a threshold, i.e. the preview mask is on
  screen, checked in the page on every image load (canvas readback);
* latency = t_visible - t_up.  Between drags, Cancel removes the preview and the view returns
  to the baseline.

Memory per session = the server process's resident set (VmRSS) after the model and the image are
loaded, and after the n boxes (one process per session behind the launcher, see README).
Results: <out>/web_latency.json and printed.  Absolute numbers belong to the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UniUltraWeb" / "Testing"))
sys.path.insert(0, str(REPO / "UniUltraWeb"))

WATCH_JS = """
([x, y, w, h, thr]) => {
  // trame-rca double-buffers the view: two <img class=image-display-area>, one shown at a time;
  // each newly decoded frame fires 'load' on its <img>: read that frame's pixels in the box
  const shown = () => [...document.querySelectorAll('img.image-display-area')].find(i => i.clientWidth > 0);
  const canvas = document.createElement('canvas');
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const W = { base: null, upAt: null, visibleAt: null, frames: 0, last: null };
  window.__W = W;
  function region(img) {
    const v = shown();
    if (!img || !v || !img.naturalWidth) return null;
    const r = v.getBoundingClientRect();
    const sx = img.naturalWidth / r.width, sy = img.naturalHeight / r.height;
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    ctx.drawImage(img, 0, 0);
    return ctx.getImageData(Math.round((x - r.left) * sx), Math.round((y - r.top) * sy),
                            Math.max(1, Math.round(w * sx)), Math.max(1, Math.round(h * sy))).data;
  }
  const diff = (d) => { if (!d || !W.base || d.length !== W.base.length) return 0; let s = 0;
    for (let i = 0; i < d.length; i += 4) s += Math.abs(d[i] - W.base[i]) + Math.abs(d[i+1] - W.base[i+1]) + Math.abs(d[i+2] - W.base[i+2]);
    return s / (d.length / 4) / 3; };
  W.reset = () => { W.base = region(W.last || shown()); W.upAt = null; W.visibleAt = null; W.frames = 0; };
  W.diff = () => diff(region(W.last || shown()));
  document.addEventListener('load', (ev) => {
    if (!ev.target.classList || !ev.target.classList.contains('image-display-area')) return;
    W.last = ev.target;
    W.frames += 1;
    if (W.upAt !== null && W.visibleAt === null && diff(region(ev.target)) > thr) W.visibleAt = performance.now();
  }, true);
  document.addEventListener('pointerup', () => { W.upAt = performance.now(); }, true);
  W.reset();
}
"""


def main() -> int:
    from browser import Server, browser_missing, chromium_path, frame_to_page, open_app, wait_state

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--image", default=str(REPO.parent / "shared" / "data" / "busi" / "images" / "benign_001.png"))
    ap.add_argument("--box", type=int, nargs=4, default=[192, 86, 237, 114])
    ap.add_argument("--threshold", type=float, default=4.0, help="mean RGB change in the box that counts as visible")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    why = browser_missing()
    if why:
        print(f"web_latency: {why}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    srv = Server([args.image])
    start_s = time.perf_counter() - t0
    try:
        rss_start = srv.rss_mb()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
            page = open_app(browser, srv.url)
            wait_state(page, "s('kind') === 'image'")
            x0, y0, x1, y1 = args.box
            (ax, ay), (bx, by) = frame_to_page(page, x0, y0), frame_to_page(page, x1, y1)
            rx, ry, rw, rh = min(ax, bx), min(ay, by), abs(bx - ax), abs(by - ay)
            page.evaluate(WATCH_JS, [rx, ry, rw, rh, args.threshold])
            lat, server_ms = [], []
            for i in range(args.n):
                page.wait_for_timeout(300)
                page.evaluate("() => window.__W.reset()")
                page.mouse.move(ax, ay)
                page.mouse.down()
                page.mouse.move(bx, by, steps=5)
                page.mouse.up()
                page.wait_for_function("() => window.__W.visibleAt !== null", timeout=30000)
                w = page.evaluate("() => ({up: window.__W.upAt, vis: window.__W.visibleAt})")
                lat.append((w["vis"] - w["up"]) / 1000)
                wait_state(page, "s('can_apply')")
                server_ms.append(page.evaluate("() => window.trame.state.get('predict_ms')"))
                page.locator("#btn-cancel").click()
                wait_state(page, "!s('can_apply')")
                page.wait_for_function("() => window.__W.diff() < 1.0", timeout=30000)
                print(f"box {i + 1}/{args.n}: {lat[-1] * 1000:.0f} ms (server {server_ms[-1]} ms)", flush=True)
            browser.close()
        rss_end = srv.rss_mb()
    finally:
        srv.stop()
    res = {
        "what": "UniUltra Web: real mouse drag in headless chromium -> preview mask visible in the streamed view",
        "n": args.n,
        "latency_s": {"median": statistics.median(lat), "min": min(lat), "max": max(lat),
                      "p90": sorted(lat)[int(0.9 * (len(lat) - 1))], "all": [round(v, 4) for v in lat]},
        "server_release_ms": {"median": statistics.median(server_ms), "all": server_ms,
                              "what": "server time from mouse-up event to preview node written (predict + preview)"},
        "server_start_s": round(start_s, 1),
        "session_rss_mb": {"after_start": round(rss_start), "after_boxes": round(rss_end)},
        "image": Path(args.image).name, "box": args.box, "model": "uniultra-mini-us",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "web_latency.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("latency_s", "server_release_ms", "server_start_s", "session_rss_mb", "machine")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
