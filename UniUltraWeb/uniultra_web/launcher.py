"""Several users: trame's (wslink's) launcher, one UniUltra Web process per session.

trame serves every browser tab of one process from the same scene, so each user gets a process:

    .venv-web/bin/python -m uniultra_web.launcher DATA_FOLDER [--port 9000] [--ports 9001-9010]

writes a wslink launcher configuration (<session folder>/launcher.json) and runs
`python -m wslink.launcher` on it.  A client asks for a session with

    POST http://127.0.0.1:9000/uniultra/   {"application": "uniultra"}

and gets {"id", "host", "port", "secret", "sessionURL"}: a new `uniultra web DATA_FOLDER --port PORT
--token SECRET --timeout 300` process (a fresh random secret each), ready when it printed its
ready line; the user opens http://host:PORT/?secret=SECRET.  A process stops 300 s after its
last browser left (or DELETE /uniultra/<id> when the launcher runs with
WSLINK_LAUNCHER_DELETE=1).  Put TLS and authentication in front (reverse proxy).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def launcher_config(data: str | Path, *, port: int = 9000, ports=(9001, 9010), host: str = "127.0.0.1",
                    log_dir: str | Path, python: str | None = None, timeout_s: int = 300,
                    extra_args: list[str] | None = None) -> dict:
    python = python or sys.executable
    return {
        "configuration": {
            "host": host,
            "port": port,
            "endpoint": "uniultra",
            "log_dir": str(log_dir),
            "proxy_file": str(Path(log_dir) / "proxy-mapping.txt"),  # session id -> host:port (for a reverse proxy)
            "timeout": 240,  # seconds to wait for the ready line (model load on a busy CPU)
            "fields": ["host", "port", "secret", "id"],
            "sessionURL": "ws://${host}:${port}/ws",
        },
        "resources": [{"host": host, "port_range": list(ports)}],
        "properties": {"python": python, "webpath": str(REPO / "UniUltraWeb"), "data": str(data)},
        "apps": {
            "uniultra": {
                "cmd": ["${python}", "-c",
                        "import sys; sys.path.insert(0, sys.argv.pop(1)); from uniultra_web.__main__ import main; "
                        "sys.exit(main(sys.argv[1:]))",
                        "${webpath}", "${data}", "--host", host, "--port", "${port}", "--token", "${secret}",
                        "--timeout", str(timeout_s), *(extra_args or [])],
                "ready_line": "UniUltra Web ready",
            }
        },
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m uniultra_web.launcher",
                                description="one UniUltra Web process per session (wslink launcher)")
    p.add_argument("data", help="folder (or file) every session offers")
    p.add_argument("--port", type=int, default=9000, help="launcher port (default 9000)")
    p.add_argument("--ports", default="9001-9010", help="port range for the sessions (default 9001-9010)")
    p.add_argument("--timeout", type=int, default=300, help="a session stops this long after its last browser left")
    args = p.parse_args(argv)
    lo, hi = (int(x) for x in args.ports.split("-"))
    folder = Path(tempfile.mkdtemp(prefix="uniultra-launcher-"))
    cfg = launcher_config(Path(args.data).resolve(), port=args.port, ports=(lo, hi), log_dir=folder / "logs",
                          timeout_s=args.timeout)
    (folder / "logs").mkdir()
    path = folder / "launcher.json"
    path.write_text(json.dumps(cfg, indent=2))
    print(f"launcher config: {path}", flush=True)
    from wslink import launcher

    launcher.start([str(path)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
