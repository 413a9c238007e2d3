"""UniUltra Web end to end in a real browser (Debian chromium driven by Playwright), marker `web`.

One server process (module scope) serves a folder holding a real BUSI breast-ultrasound image and
a real 10-frame echo DICOM cine; the bundled model answers.  Real mouse drags and a real touch
drag (CDP touch events) go through trame-rca to the server's slice view.  Screenshots go to
$UNIULTRA_WEB_SHOTS (default out/web); the README's come from `UNIULTRA_WEB_SHOTS=docs/web`.
Every server is stopped by its process id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import (
    REPO,
    VIEW_IMG,
    Server,
    browser_missing,
    chromium_path,
    frame_to_page,
    mouse_drag,
    open_app,
    state,
    touch_drag,
    wait_state,
)

pytestmark = pytest.mark.web
SHOTS = Path(os.environ.get("UNIULTRA_WEB_SHOTS", REPO / "out" / "web"))
BOX = ((192, 86), (237, 114))  # BUSI benign_001: around the lesion (mask bbox 197,92 - 231,108)


@pytest.fixture(scope="module")
def chromium():
    why = browser_missing()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory, busi_image, echo_dicom):
    d = tmp_path_factory.mktemp("web-data")
    shutil.copy(busi_image, d / "a_busi_benign_001.png")
    shutil.copy(echo_dicom, d / "b_echo_cine.dcm")
    return d


@pytest.fixture(scope="module")
def server(chromium, data_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("web-out")
    srv = Server([str(data_folder), "--out", str(out), "--session-dir", str(tmp_path_factory.mktemp("session"))])
    srv.out = out
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None


def _shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name))


def _view_pixels(page, a, b) -> np.ndarray:
    """The streamed view's pixels inside the frame box a-b (RGB array), from a screenshot."""
    from io import BytesIO

    from PIL import Image

    (xa, ya), (xb, yb) = frame_to_page(page, *a), frame_to_page(page, *b)
    img = Image.open(BytesIO(page.screenshot(clip={"x": min(xa, xb), "y": min(ya, yb),
                                                  "width": abs(xb - xa), "height": abs(yb - ya)})))
    return np.asarray(img.convert("RGB"), float)


def _select_file(page, name):
    page.locator("#file-select").click(force=True)
    page.locator(".v-overlay .v-list-item", has_text=name).click()


def _read_mask(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)) > 0


def test_box_drag_preview_apply_undo_redo(server, chromium, busi_image):
    page = open_app(chromium, server.url)
    wait_state(page, "s('kind') === 'image'")
    _shot(page, "01_opened.png")
    before = _view_pixels(page, *BOX)
    mouse_drag(page, *BOX)
    wait_state(page, "s('can_apply')")
    assert "Preview" in state(page, "status")
    page.wait_for_timeout(400)  # the next streamed frame
    _shot(page, "02_box_preview.png")
    page.locator("#btn-apply").click()
    wait_state(page, "s('mask_pixels') > 0")
    pixels = state(page, "mask_pixels")
    page.wait_for_timeout(400)
    _shot(page, "03_applied.png")
    after = _view_pixels(page, *BOX)
    assert np.abs(after - before).mean() > 5, "the mask is not visible in the streamed view"
    # the segment's voxels: exported by the app, compared with the expert mask
    page.locator("#btn-export").click()
    wait_state(page, "s('status').startsWith('Wrote 1 file')")
    written = sorted(server.out.glob("lesion*.png"))
    assert len(written) == 1
    mask = _read_mask(written[0])
    truth = _read_mask(str(busi_image).replace("images", "masks"))
    assert mask.sum() == pixels
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.6
    # undo and redo of the apply
    page.locator("#btn-undo").click()
    wait_state(page, "s('mask_pixels') === 0")
    page.wait_for_timeout(400)
    _shot(page, "04_undone.png")
    assert np.abs(_view_pixels(page, *BOX) - before).mean() < np.abs(after - before).mean() / 2
    page.locator("#btn-redo").click()
    wait_state(page, f"s('mask_pixels') === {pixels}")
    page.close()


def test_touch_drag_on_tablet_viewport(server, chromium):
    page = open_app(chromium, server.url, viewport=(1024, 768), touch=True)
    wait_state(page, "s('kind') === 'image'")
    seq = state(page, "result_seq")
    touch_drag(page, *BOX)
    wait_state(page, f"s('result_seq') > {seq} && s('can_apply')")
    prompts_box = state(page, "status")
    assert "Preview" in prompts_box
    page.wait_for_timeout(400)
    _shot(page, "05_touch_box_tablet.png")
    # large targets: every action button is at least 48 px high
    for bid in ("#btn-apply", "#btn-undo", "#btn-redo", "#btn-cancel", "#btn-propagate"):
        box = page.locator(bid).bounding_box()
        assert box is None or box["height"] >= 48, bid
    page.locator("#btn-cancel").click()
    wait_state(page, "!s('can_apply')")
    page.close()


def test_cine_box_propagate_every_frame(server, chromium):
    page = open_app(chromium, server.url)
    _select_file(page, "b_echo_cine.dcm")
    wait_state(page, "s('kind') === 'cine' && s('frame_count') === 10")
    wait_state(page, "s('frame_display') && s('frame_display').w > 0")
    g = state(page, "frame_display")
    w, h = g["w"], g["h"]
    a, b = (int(w * 0.35), int(h * 0.3)), (int(w * 0.65), int(h * 0.7))
    mouse_drag(page, a, b)
    wait_state(page, "s('can_propagate')")
    page.locator("#btn-propagate").click()
    # a quiet machine may finish the 10 frames between two polls of the page: accept either state
    wait_state(page, "s('propagating') || String(s('status')).includes('Propagation wrote')", 60000)
    if state(page, "propagating"):
        _shot(page, "06_propagating.png")
    wait_state(page, "!s('propagating')", 120000)
    assert "Propagation wrote 10 frames" in state(page, "status"), state(page, "status")
    page.wait_for_timeout(400)
    _shot(page, "07_propagated.png")
    for f in list(server.out.glob("lesion_*.png")):
        f.unlink()
    page.locator("#btn-export").click()
    wait_state(page, "s('status').startsWith('Wrote 10 file')")
    masks = sorted(server.out.glob("lesion_*.png"))
    assert len(masks) == 10
    sizes = [int(_read_mask(m).sum()) for m in masks]
    assert all(s > 100 for s in sizes), sizes
    # scrub: the slider shows another frame and its mask
    seq = state(page, "result_seq")
    page.evaluate("() => window.trame.state.set('frame', 7)")
    wait_state(page, f"s('frame') === 7 && s('result_seq') > {seq}")
    assert state(page, "mask_pixels") == sizes[7]
    # one undo removes the whole propagation
    page.locator("#btn-undo").click()
    wait_state(page, "s('mask_pixels') === 0")
    page.close()


def _start(args, timeout=30):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "UniUltraWeb")
    return subprocess.run([sys.executable, "-m", "uniultra_web", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_remote_address_needs_token(chromium, data_folder, tmp_path):
    # refused without a token: one error line, exit 2, nothing listening
    r = _start([str(data_folder), "--host", "0.0.0.0", "--port", "0"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uniultra: error: --host 0.0.0.0") and "--token" in lines[0]
    r = _start([str(data_folder), "--host", "0.0.0.0", "--token", "short"])
    assert r.returncode == 2 and "at least 16" in r.stderr
    # with a token it serves, and a browser without the token gets no session
    token = "k3y-" + "x" * 20
    srv = Server([str(data_folder), "--host", "0.0.0.0", "--token", token, "--session-dir", str(tmp_path)])
    try:
        assert srv.url.endswith(f"?secret={token}")
        port = srv.port
        ctx = chromium.new_context()
        page = ctx.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_timeout(4000)
        assert page.locator("img.image-display-area").count() == 0  # no websocket session: the app never renders
        page.goto(f"http://127.0.0.1:{port}/?secret=wrong-{token}")
        page.wait_for_timeout(3000)
        assert page.locator("img.image-display-area").count() == 0
        page.goto(f"http://127.0.0.1:{port}/?secret={token}")
        page.locator(VIEW_IMG).first.wait_for(timeout=90000)
        ctx.close()
    finally:
        srv.stop()


def test_upload_checks(tmp_path):
    """Uploads: type, size, name and folder checks (no server needed)."""
    from uniultra_web.files import UploadError, save_upload
    from uniultra_web.loaders import SUPPORTED_EXT

    up = tmp_path / "uploads"
    p = save_upload({"name": "../../etc/passwd.png", "size": 3, "content": b"abc"}, up, SUPPORTED_EXT, 100)
    assert p.parent == up.resolve() and p.name == "passwd.png"
    p2 = save_upload({"name": "passwd.png", "content": b"abc"}, up, SUPPORTED_EXT, 100)
    assert p2 != p and p2.parent == up.resolve()  # never overwrites
    for bad, why in [({"name": "x.exe", "content": b"a"}, "not a supported type"),
                     ({"name": "x.png", "content": b"a" * 101}, "over the"),
                     ({"name": "x.png", "size": 10**9, "content": b"a"}, "over the"),
                     ({"name": "x.png", "content": b""}, "empty"),
                     ({"name": "x.png"}, "no file content")]:
        with pytest.raises(UploadError, match=why):
            save_upload(bad, up, SUPPORTED_EXT, 100)
    assert (up.stat().st_mode & 0o777) == 0o700


def _http(method, url, body=None, timeout=300):
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip() else {}


def _pid_listening_on(port: int) -> int | None:
    """The pid of the session process started with `--port PORT` (from /proc, no tools needed)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--port" in cmd and cmd[cmd.index(b"--port") + 1 : cmd.index(b"--port") + 2] == [str(port).encode()] \
                    and any(b"uniultra_web" in c for c in cmd):
                return int(d.name)
    return None


def test_launcher_two_sessions(chromium, data_folder, tmp_path):
    """trame's (wslink's) launcher: one process per session, each with its own port and secret."""
    import json
    import signal
    import time

    from browser import free_port
    from uniultra_web.launcher import launcher_config

    port, p1 = free_port(), free_port()
    ports = (p1, p1 + 1)
    cfg = launcher_config(data_folder, port=port, ports=ports, log_dir=tmp_path, python=sys.executable,
                          timeout_s=900)  # stays up while the second session starts on a busy machine
    (tmp_path / "launcher.json").write_text(json.dumps(cfg))
    launcher = subprocess.Popen([sys.executable, "-m", "wslink.launcher", str(tmp_path / "launcher.json")], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        url = f"http://127.0.0.1:{port}/uniultra/"
        for _ in range(120):
            try:
                _http("GET", f"http://127.0.0.1:{port}/", timeout=2)
            except OSError as exc:
                if "Connection refused" in str(exc):
                    time.sleep(0.5)
                    continue
            break
        sessions = [_http("POST", url, {"application": "uniultra"}) for _ in range(2)]
        assert {s["port"] for s in sessions} == set(ports), sessions
        assert sessions[0]["secret"] != sessions[1]["secret"] and len(sessions[0]["secret"]) >= 16
        pids = [_pid_listening_on(s["port"]) for s in sessions]
        assert all(pids), pids
        rss = []
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            rss.append(int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) // 1024)
        print(f"launcher sessions: ports {sorted(ports)}, RSS per session (MB): {rss}")
        ctx = chromium.new_context()
        page = ctx.new_page()
        s = sessions[0]
        page.goto(f"http://127.0.0.1:{s['port']}/?secret={s['secret']}")
        page.locator(VIEW_IMG).first.wait_for(timeout=90000)
        ctx.close()
    finally:  # sessions stop on their own --timeout; here they are stopped by process id
        for pid in pids:
            if pid and Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGTERM)
        os.kill(launcher.pid, signal.SIGTERM)
        launcher.wait(20)
