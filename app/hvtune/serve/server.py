"""`hvtune serve OUTPUT_DIR [OUTPUT_DIR_B]`: the run page, a small read-only web page of a run (or two, compared).

It reads only what a run writes (run_folder.py): `status.json` (status.py), `logs/loss.jsonl`, `run.json`, the
validation videos and the LoRA files; so it works on a live run, a finished one, or a folder copied off a rented box.
The standard library's threading HTTP server serves it (why not an ASGI stack: docs/RUN_PAGE.md): no dependency, no
build step, nothing fetched from the network (the page is one HTML file with its script inline).

Security, because rented GPUs expose ports to the internet:
- it binds 127.0.0.1 unless told otherwise, and always requires a token (`--token`, else `HVTUNE_PAGE_TOKEN`, else a
  random one printed at start; auth.py). The token arrives once as `?token=` and is then kept in an HttpOnly,
  SameSite=Strict cookie; API clients may send `Authorization: Bearer TOKEN`. The one state-changing request (stop)
  also needs a custom header a cross-site form cannot send.
- it never lets a client cost the training run much: idle connections time out (IDLE_TIMEOUT_S), at most
  MAX_CONNECTIONS are open at once, and failed requests are logged one line each, at most a few a minute
  (failures.py: the log is the training log).
- files are served only from inside the output folder (resolved, symlinks included), only media, weights and the
  loss log; never a hidden (temp) file and never a raw `.json`: the run record goes through `mask_secrets` first.
"""

from __future__ import annotations

import json
import math
import mimetypes
import os
import re
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hvtune.errors import UserError
from hvtune.run_files import RECORD_NAME
from hvtune.serve.auth import (
    cookie_matches,
    cookie_value,
    link_query,
    query_tokens,
    read_cookie,
    resolve_token,
    token_matches,
)
from hvtune.serve.failures import FailureLog
from hvtune.serve.run_folder import RunFolder, request_stop, safe_file

DEFAULT_PORT = 8765
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COOKIE = "hvtune_page"
STOP_HEADER = "X-Hvtune-Stop"
IDLE_TIMEOUT_S = 20.0  # a connection that sends or takes nothing this long is closed (half-open, slow clients)
MAX_CONNECTIONS = 32  # one thread each; beyond this a new connection is closed at once
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; media-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'",
}


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, folders: list[RunFolder], token: str, allow_stop: bool = True, **limits: Any):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET  # --host ::1
        self.idle_timeout = limits.get("idle_timeout", IDLE_TIMEOUT_S)
        self._slots = threading.BoundedSemaphore(limits.get("max_connections", MAX_CONNECTIONS))
        self.failures = FailureLog()
        super().__init__(address, PageHandler)
        self.folders = folders
        self.token = token
        self.allow_stop = allow_stop
        self._compare_cache: tuple[tuple, dict] | None = None
        self._compare_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):  # no thread for it: closed before a byte is read
            self.failures.note(client_address[0], "connection closed: too many open connections")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # one line, not a traceback, per failure
        self.failures.note(client_address[0], f"request failed: {sys.exc_info()[1]!r}")

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


def finite(data: Any) -> Any:
    """`data` with NaN and infinities as None: JSON has no NaN, and a browser refuses the whole answer over one."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


class PageHandler(BaseHTTPRequestHandler):
    server: PageServer
    server_version = "hvtune-page"
    sys_version = ""

    # ------------------------------------------------------------------------------------------------ plumbing
    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # StreamRequestHandler puts it on the socket: every read and write
        self._failure_logged = False
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except OSError as e:  # the client went away or stalled mid-answer (timeout): one line, no traceback
            self._note_failure(f"{type(e).__name__}")

    def _note_failure(self, what: str) -> None:
        if not self._failure_logged:
            self._failure_logged = True
            self.server.failures.note(self.client_address[0], f"{self._request_shown()}: {what}")

    def _request_shown(self) -> str:
        """The request as logged: method and path, never the query (it may carry the token)."""
        if not getattr(self, "command", None):
            return "-"
        return f"{self.command} {urlsplit(self.path).path}"

    def log_request(self, code="-", size="-") -> None:  # successes are not logged: the log is the training log
        if isinstance(code, int) and code >= 400:
            self._note_failure(str(int(code)))

    def log_message(self, format, *args) -> None:  # idle timeouts (a browser's unused preconnect) are not failures
        pass

    def send_error(self, code, message=None, explain=None) -> None:  # 400, 414, 501...: with the same headers
        self.close_connection = True
        self._error(code, message or HTTPStatus(code).phrase)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(finite(data), allow_nan=False).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    def _cookie_name(self) -> str:
        return f"{COOKIE}_{self.server.server_address[1]}"  # cookies ignore ports: one per page

    def _authorised(self, raw_query: str | None) -> bool:
        """The token, from the query (the printed address; not for stop), an `Authorization: Bearer` header or the
        page's cookie."""
        token = self.server.token
        offered = query_tokens(raw_query) if raw_query is not None else []
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            offered.append(auth[7:].strip())
        if any(token_matches(token, o) for o in offered):
            return True
        return cookie_matches(token, read_cookie(self.headers.get("Cookie", ""), self._cookie_name()))

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
        if not self._authorised(url.query):
            return self._error(
                HTTPStatus.UNAUTHORIZED, "hvtune run page: open the address printed at start (it ends in ?token=...)"
            )
        if url.path == "/" and "token" in query:  # keep the token in a cookie, drop it from the address bar
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", "/")
            cookie = f"{self._cookie_name()}={cookie_value(self.server.token)}; HttpOnly; SameSite=Strict; Path=/"
            self.send_header("Set-Cookie", cookie)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if url.path == "/":
            return self._send(200, _page_html(), "text/html; charset=utf-8")
        if url.path == "/api/info":
            runs = [str(f.root) for f in self.server.folders]
            return self._json({"runs": runs, "stop": self.server.allow_stop, "host": socket.gethostname()})
        if url.path == "/api/compare":
            if len(self.server.folders) != 2:
                return self._error(HTTPStatus.NOT_FOUND, "not a comparison page")
            return self._json(self.server.compare())
        folder = self._folder(query)
        if folder is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such run")
        return self._run_route(url.path, {k: v[0] for k, v in query.items()}, folder)

    def _run_route(self, path: str, query: dict[str, str], folder: RunFolder) -> None:
        if path == "/api/state":
            status = folder.status()
            resume = folder.resume_command() if status.get("state") in ("stopped", "failed") else None
            return self._json(
                {"status": status, "videos": folder.videos(), "downloads": folder.downloads(), "resume": resume}
                | {"now": time.time()}
            )
        if path == "/api/loss":
            try:
                return self._json(folder.loss(query))
            except ValueError:
                return self._error(HTTPStatus.BAD_REQUEST, "offset, inode, stride, columns, first, last: integers")
        if path == "/api/log":
            return self._json(folder.log_tail())
        if path == "/api/record":
            record = folder.run_record()
            if "download" in query:
                body = json.dumps(finite(record), indent=2, sort_keys=True).encode() + b"\n"
                disposition = {"Content-Disposition": f'attachment; filename="{RECORD_NAME}"'}
                return self._send(200, body, "application/json", disposition)
            return self._json(record)
        if path.startswith("/files/"):
            file = safe_file(folder.root, unquote(path.removeprefix("/files/")))
            if file is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such file in the run's output folder")
            return self._file(file)
        return self._error(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path != "/api/stop":
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        # the query's token is not accepted here: a stop must come from the page (cookie) or a Bearer header
        if not self._authorised(None) or self.headers.get(STOP_HEADER) != "1":
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
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
        self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if path.suffix in (".safetensors", ".jsonl"):
            self.send_header("Content-Disposition", f'attachment; filename="{path.name}"')
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with path.open("rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = f.read(min(1 << 16, remaining))  # small writes: the idle timeout bounds each, not the file
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _page_html() -> bytes:
    return resources.files("hvtune.serve").joinpath("page.html").read_bytes()


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
    token = resolve_token(token)
    server = _listen(host, port, [RunFolder(f) for f in folders], token, allow_stop)
    bound_port = server.server_address[1]
    shown = host if host in LOOPBACK else (socket.gethostname() if host in ("0.0.0.0", "::") else host)
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"run page: http://{shown}:{bound_port}/{link_query(token)}", flush=True)
    if host not in LOOPBACK:
        print("  reachable from other machines; the token above is required (HVTUNE_PAGE_TOKEN)", flush=True)
    if ready is not None:
        ready(server)
    if threading.current_thread() is threading.main_thread():
        # why: a process started in the background by a script (`hvtune serve ... &`, as the entrypoints do) inherits
        # SIGINT ignored, and Python then never turns Ctrl-C / kill -INT into KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _listen(host: str, port: int, folders: list[RunFolder], token: str, allow_stop: bool) -> PageServer:
    try:
        return PageServer((host, port), folders, token, allow_stop)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from e
    except OSError as e:
        if e.errno in (99, 97):  # EADDRNOTAVAIL, EAFNOSUPPORT: the address, not the port
            raise UserError(f"cannot listen on {host} ({e.strerror}): pick another --host (HVTUNE_PAGE_HOST)") from e
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port (HVTUNE_PAGE_PORT)") from e
