"""`uniultra web [FILE_OR_FOLDER]` (also `python -m uniultra_web`): serve UniUltra Web.

Security defaults: listens on 127.0.0.1.  Any other address needs a secret token (--token or the
UNIULTRA_WEB_TOKEN environment variable, at least 16 characters, not a number); without one the
command refuses to start.  The token is trame/wslink's authKey: the browser must open
http://HOST:PORT/?secret=TOKEN, and a websocket that does not present it gets no data.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
from pathlib import Path

EXIT_INPUT = 2
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def _source_paths() -> None:
    """Running from the source tree: the Slicer-side library and the engine are two folders up."""
    root = Path(__file__).resolve().parents[2]
    for p in (root / "UniUltraWeb", root / "UniUltraSegment", root):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every `uniultra` command
        self.exit(EXIT_INPUT, f"uniultra: error: web: {message} (see `uniultra web --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="uniultra web", description="UniUltra in a browser (trame-slicer).")
    p.add_argument("path", nargs="?", default=None, metavar="FILE_OR_FOLDER",
                   help="an image, volume, .seq.nrrd cine or DICOM file, or a folder of them, offered in the browser")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free port; default 8080)")
    p.add_argument("--token", default=None,
                   help="secret the browser must present (?secret=TOKEN); required for a non-local --host "
                        "(or set UNIULTRA_WEB_TOKEN)")
    p.add_argument("--model", default=None, help="registry model (default: the bundled default, uniultra.registry.DEFAULT_MODEL)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--out", default=None, help="folder for exported masks and segmentations (default: in the session folder)")
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest upload accepted (MB, default 100)")
    p.add_argument("--timeout", type=int, default=0,
                   help="stop after this many seconds without a connected browser (0: never; the launcher uses it)")
    p.add_argument("--session-dir", default=None, help="this session's folder for uploads (default: a new temporary one)")
    return p


class UsageError(ValueError):
    pass


def check_args(args) -> str:
    """Validate; returns the token to use (may be the public trame default on localhost)."""
    token = args.token or os.environ.get("UNIULTRA_WEB_TOKEN") or ""
    if not is_local(args.host):
        if not token:
            raise UsageError(f"--host {args.host} listens beyond this machine: give a secret --token "
                             "(or UNIULTRA_WEB_TOKEN), e.g. --token $(python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    if token:
        if len(token) < 16:
            raise UsageError("--token must be at least 16 characters")
        try:
            float(token)
            numeric = True
        except ValueError:
            numeric = False
        if numeric:
            raise UsageError("--token must not be a number (the browser would read it as one)")
        if not all(c.isalnum() or c in "-_.~" for c in token):
            raise UsageError("--token may only hold letters, digits and - _ . ~ (it goes into the URL)")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number")
    if args.max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    if args.timeout < 0:
        raise UsageError("--timeout must be >= 0")
    return token


def main(argv=None) -> int:
    _source_paths()
    args = build_parser().parse_args(argv)
    try:
        token = check_args(args)
    except UsageError as exc:
        print(f"uniultra: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    from .files import FileCatalog

    try:
        catalog = FileCatalog(args.path)
    except ValueError as exc:
        print(f"uniultra: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    from .app import configure_rendering

    configure_rendering()
    from trame.app import get_server

    from uniultra.registry import DEFAULT_MODEL

    from .app import UniUltraWebApp

    model = args.model or os.environ.get("UNIULTRA_MODEL") or DEFAULT_MODEL
    workdir = Path(args.session_dir) if args.session_dir else Path(tempfile.mkdtemp(prefix="uniultra-web-"))
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    out = Path(args.out) if args.out else workdir / "export"
    server = get_server(None, client_type="vue3")
    # trame parses sys.argv for its own options: give it only ours (authKey = the token)
    sys.argv = [sys.argv[0], "--authKey", token or "wslink-secret"]
    app = UniUltraWebApp(server, catalog=catalog, model=model, device=args.device, workdir=workdir, out_dir=out,
                         max_upload_mb=args.max_upload_mb)
    # load the model before the first box (seconds), then open the first file
    app.session.get_engine()
    if len(catalog):
        app.open_index(0)
        app.state.file_index = 0
    url = f"http://{args.host}:{{port}}/" + (f"?secret={token}" if token else "")
    server.controller.on_server_ready.add(lambda **kw: print(f"UniUltra Web ready: {url.format(port=server.port)}",
                                                             flush=True))
    server.start(host=args.host, port=args.port, open_browser=False, timeout=args.timeout,
                 show_connection_info=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
