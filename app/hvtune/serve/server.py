"""`hvtune serve OUTPUT_DIR [OUTPUT_DIR_B]`: the run page, a small read-only web page of a run (or two, compared).

It reads only what a run writes (run_folder.py): `status.json` (status.py), `logs/loss.jsonl`, `run.json`, the
validation videos and the LoRA files; so it works on a live run, a finished one, or a folder copied off a rented box.
The standard library's threading HTTP server serves it: no dependency, no build step, nothing fetched from the network
(the page is one HTML file with its script inline).

Security, because rented GPUs expose ports to the internet:
- it binds 127.0.0.1 unless told otherwise; on any other address it requires a token (`--token`, else
  `HVTUNE_PAGE_TOKEN`, else a random one printed at start). The token arrives once as `?token=` and is then kept in
  an HttpOnly, SameSite=Strict cookie; API clients may send `Authorization: Bearer TOKEN`.
- on loopback without a token, requests must name a loopback Host (no DNS rebinding), and the one state-changing
  request (stop) needs a custom header a cross-site form cannot send.
- files are served only from inside the output folder (resolved, symlinks included), only media, weights and the
  loss log; never a hidden (temp) file and never a raw `.json`: the run record goes through `mask_secrets` first.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import mimetypes
import os
import re
import secrets
import socket
import sys
import threading
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hvtune.errors import UserError
from hvtune.run_files import RECORD_NAME
from hvtune.serve.run_folder import RunFolder, request_stop, safe_file

DEFAULT_PORT = 8765
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COOKIE = "hvtune_page"
STOP_HEADER = "X-Hvtune-Stop"


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, folders: list[RunFolder], token: str | None, allow_stop: bool = True):
        super().__init__(address, PageHandler)
        self.folders = folders
        self.token = token
        self.allow_stop = allow_stop
        self._compare_cache: tuple[tuple, dict] | None = None
        self._compare_lock = threading.Lock()

    def compare(self) -> dict[str, Any]:
        """`hvtune compare`'s verdict for the two folders, once both have finished (recomputed when a record
        changes)."""
        records = [f.files.record for f in self.folders]
        if not all(r.is_file() for r in records):
            return {"verdict": None, "text": "the verdict comes when both runs have finished (run.json)"}
        key = tuple(r.stat().st_mtime_ns for r in records)
        with self._compare_lock:
            if self._compare_cache and self._compare_cache[0] == key:
                return self._compare_cache[1]
            from hvtune.output.compare import Tolerances, compare_runs, format_comparison

            try:
                result = compare_runs(self.folders[0].root, self.folders[1].root)
                answer = {"verdict": result.verdict, "text": format_comparison(result, Tolerances())}
            except (UserError, OSError, ValueError, KeyError) as e:
                answer = {"verdict": None, "text": f"cannot compare: {e}"}
            self._compare_cache = (key, answer)
            return answer


class PageHandler(BaseHTTPRequestHandler):
    server: PageServer
    server_version = "hvtune-page"
    sys_version = ""

    def log_message(self, format, *args):  # one line per request would bury the training log
        pass

    # ------------------------------------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self._common_headers()
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _common_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "media-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        )

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    def _cookie_name(self) -> str:
        return f"{COOKIE}_{self.server.server_address[1]}"  # cookies ignore ports: one per page

    def _authorised(self, query_token: str = "") -> bool:
        """Loopback without a token: a loopback Host. Otherwise the token, from the query (the printed address),
        an `Authorization: Bearer` header or the page's cookie."""
        token = self.server.token
        if token is None:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            return host in LOOPBACK
        offered = [query_token]
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            offered.append(auth[7:].strip())
        cookie = SimpleCookie()
        with contextlib.suppress(CookieError):
            cookie.load(self.headers.get("Cookie", ""))
        if self._cookie_name() in cookie:
            offered.append(cookie[self._cookie_name()].value)
        return any(hmac.compare_digest(o.encode(), token.encode()) for o in offered if o)

    def _folder(self, query) -> RunFolder | None:
        try:
            return self.server.folders[int(query.get("run", ["0"])[0])]
        except (ValueError, IndexError):
            return None

    # ------------------------------------------------------------------------------------------------ routes
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        query_token = query.get("token", [""])[0]
        allowed = self._authorised(query_token)
        if allowed and query_token and url.path == "/":  # keep the token in a cookie, drop it from the address bar
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", "/")
            cookie = f"{self._cookie_name()}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
            self.send_header("Set-Cookie", cookie)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not allowed:
            if self.server.token is None:  # loopback page reached through another host name (DNS rebinding?)
                return self._error(HTTPStatus.FORBIDDEN, "hvtune run page: open it as http://127.0.0.1:PORT/")
            return self._error(
                HTTPStatus.UNAUTHORIZED, "hvtune run page: open the address printed at start (it ends in ?token=...)"
            )
        if url.path == "/":
            return self._send(200, _page_html(), "text/html; charset=utf-8")
        if url.path == "/api/info":
            return self._json(
                {
                    "runs": [str(f.root) for f in self.server.folders],
                    "stop": self.server.allow_stop,
                    "host": socket.gethostname(),
                }
            )
        if url.path == "/api/compare":
            if len(self.server.folders) != 2:
                return self._error(HTTPStatus.NOT_FOUND, "not a comparison page")
            return self._json(self.server.compare())
        folder = self._folder(query)
        if folder is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such run")
        if url.path == "/api/state":
            return self._json({"status": folder.status(), "videos": folder.videos(), "downloads": folder.downloads()})
        if url.path == "/api/loss":
            try:
                offset = max(0, int(query.get("offset", ["0"])[0]))
                inode = int(query["inode"][0]) if query.get("inode", [""])[0] else None
            except ValueError:
                return self._error(HTTPStatus.BAD_REQUEST, "offset and inode are integers")
            return self._json(folder.loss(offset, inode))
        if url.path == "/api/record":
            record = folder.run_record()
            if "download" in query:
                body = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
                disposition = {"Content-Disposition": f'attachment; filename="{RECORD_NAME}"'}
                return self._send(200, body, "application/json", disposition)
            return self._json(record)
        if url.path.startswith("/files/"):
            path = safe_file(folder.root, unquote(url.path.removeprefix("/files/")))
            if path is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such file in the run's output folder")
            return self._file(path)
        return self._error(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path != "/api/stop":
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        # the query's token is not accepted here: a stop must come from the page (cookie) or a Bearer header
        if not self._authorised() or self.headers.get(STOP_HEADER) != "1":
            return self._error(HTTPStatus.FORBIDDEN, "stop: not authorised")
        if not self.server.allow_stop:
            return self._error(HTTPStatus.FORBIDDEN, "stop is turned off for this page (--read-only)")
        folder = self._folder(query)
        if folder is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such run")
        ok, message = request_stop(folder.root)
        return self._json({"ok": ok, "message": message}, 200 if ok else 409)

    def _file(self, path: Path) -> None:
        size = path.stat().st_size
        start, end = 0, size - 1
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        partial = bool(match and (match.group(1) or match.group(2)))
        if partial:
            first, last = match.group(1), match.group(2)
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:  # suffix range: the last N bytes
                start = max(0, size - int(last))
            if start > end or start >= size:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if path.suffix in (".safetensors", ".jsonl"):
            self.send_header("Content-Disposition", f'attachment; filename="{path.name}"')
        self._common_headers()
        self.end_headers()
        if self.command == "HEAD":
            return
        with path.open("rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = f.read(min(1 << 20, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _page_html() -> bytes:
    return resources.files("hvtune.serve").joinpath("page.html").read_bytes()


def resolve_token(host: str, token: str | None) -> str | None:
    """The token the page requires: the one given, else HVTUNE_PAGE_TOKEN, else a new one when bound beyond
    loopback; None on loopback without one."""
    token = token or os.environ.get("HVTUNE_PAGE_TOKEN") or None
    if token is None and host not in LOOPBACK:
        token = secrets.token_urlsafe(18)
    if token is not None and len(token) < 12:
        raise UserError("the page token must be at least 12 characters (HVTUNE_PAGE_TOKEN or --token)")
    return token


def serve(
    folders: list[Path],
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    allow_stop: bool = True,
    ready=None,
) -> None:
    """Serve the page until interrupted. `ready(server)` is called once it listens (tests, the port-0 case)."""
    host = host or os.environ.get("HVTUNE_PAGE_HOST") or "127.0.0.1"
    if port is None:
        try:
            port = int(os.environ.get("HVTUNE_PAGE_PORT") or DEFAULT_PORT)
        except ValueError:
            raise UserError(f"HVTUNE_PAGE_PORT={os.environ['HVTUNE_PAGE_PORT']!r} is not a port number") from None
    if not 1 <= len(folders) <= 2:
        raise UserError("hvtune serve takes one output folder, or two to compare")
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file; pass the run's output_dir")
        if not folder.exists():
            print(f"notice: {folder} does not exist yet; the page shows the run once it writes there", file=sys.stderr)
    token = resolve_token(host, token)
    try:
        server = PageServer((host, port), [RunFolder(f) for f in folders], token, allow_stop)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port (HVTUNE_PAGE_PORT)") from e
    bound_port = server.server_address[1]
    shown = host if host in LOOPBACK else (socket.gethostname() if host in ("0.0.0.0", "::") else host)
    print(f"run page: http://{shown}:{bound_port}/" + (f"?token={token}" if token else ""), flush=True)
    if host not in LOOPBACK:
        print("  reachable from other machines; the token above is required (HVTUNE_PAGE_TOKEN)", flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
