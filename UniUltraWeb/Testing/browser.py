"""Start UniUltra Web as a real server process and drive it with Playwright + Debian's chromium.

Used by the browser tests (test_web_browser.py) and the latency benchmark
(benchmarks/web_latency.py).  The server is stopped by its process id.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("UNIULTRA_CHROMIUM", "/usr/bin/chromium")
VIEW_IMG = "img.image-display-area:visible"  # trame-rca double-buffers: two <img>, one shown


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed in this environment: run `make web-setup` (pip extra 'web')"
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        return (f"Debian's chromium is not installed ({CHROMIUM}): `apt-get install -y chromium` "
                "(make web-setup does it when run as root)")
    return None


def chromium_path() -> str:
    return CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m uniultra_web ARGS` on a free port; `url` once it printed its ready line."""

    def __init__(self, args: list[str], port: int | None = None, env: dict | None = None, timeout: float = 600):
        self.port = port or free_port()
        e = dict(os.environ)
        e["PYTHONPATH"] = os.pathsep.join([str(REPO / "UniUltraWeb"), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        e.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
        e.pop("DISPLAY", None)
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "uniultra_web", *args, "--port", str(self.port)],
                                     cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if line.startswith("UniUltra Web ready: "):
                    self.url = line.split(": ", 1)[1].strip()
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        t0 = time.time()
        while not ready.wait(0.5):
            if time.time() - t0 > timeout:
                self.stop()
                raise TimeoutError(f"UniUltra Web did not start in {timeout} s:\n" + "\n".join(self.lines[-30:]))
        if self.url is None:
            self.stop()
            raise RuntimeError("UniUltra Web exited:\n" + "\n".join(self.lines[-30:]))

    def rss_mb(self) -> float:
        """Resident memory of the server process (MB), from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        """Stop the server by its process id (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:  # aiohttp's graceful shutdown can take long on a busy machine
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(120)


def state(page, name):
    """A trame state value, read in the page."""
    return page.evaluate("(n) => window.trame.state.get(n)", name)


def wait_state(page, expr: str, timeout_ms: int = 120000):
    """Wait until a JS expression over `s` (trame state getter) is true."""
    page.wait_for_function(f"() => {{ const s = (n) => window.trame.state.get(n); return {expr}; }}",
                           timeout=timeout_ms)


def open_app(browser, url: str, viewport=(1180, 820), touch: bool = False):
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, has_touch=touch)
    page = context.new_page()
    page.goto(url)
    page.locator(VIEW_IMG).first.wait_for(timeout=90000)
    wait_state(page, "s('frame_count') > 0", 90000)
    return page


def frame_to_page(page, col: float, row: float) -> tuple[float, float]:
    """Page coordinates of frame pixel (col, row) in the streamed slice view.

    The server publishes where the frame's pixel centres (0, 0) and (W-1, H-1) are in the view's
    display pixels (VTK: origin bottom left) and the view's size; the <img> shows that view."""
    g = state(page, "frame_display")
    box = page.locator(VIEW_IMG).first.bounding_box()
    x = g["x0"] + (col / max(g["w"] - 1, 1)) * (g["x1"] - g["x0"])
    y = g["y0"] + (row / max(g["h"] - 1, 1)) * (g["y1"] - g["y0"])
    return box["x"] + x * box["width"] / g["vw"], box["y"] + (g["vh"] - y) * box["height"] / g["vh"]


def mouse_drag(page, a, b, steps: int = 6):
    xa, ya = frame_to_page(page, *a)
    xb, yb = frame_to_page(page, *b)
    page.mouse.move(xa, ya)
    page.mouse.down()
    page.mouse.move(xb, yb, steps=steps)
    page.mouse.up()


def touch_drag(page, a, b, steps: int = 6):
    """A one-finger drag, as real touch events (Chrome DevTools Protocol Input.dispatchTouchEvent)."""
    cdp = page.context.new_cdp_session(page)
    xa, ya = frame_to_page(page, *a)
    xb, yb = frame_to_page(page, *b)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": xa, "y": ya}]})
    for i in range(1, steps + 1):
        t = i / steps
        cdp.send("Input.dispatchTouchEvent",
                 {"type": "touchMove", "touchPoints": [{"x": xa + t * (xb - xa), "y": ya + t * (yb - ya)}]})
        time.sleep(0.03)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
