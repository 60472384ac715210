"""The run page's server and status file: what a user of `hvtune serve` would notice (token, files, secrets, stop,
live status). The page in a real browser is tests/test_page_browser.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import run_hvtune
from hvtune.config.settings import ConfigError, Problem, mask_secrets
from hvtune.errors import UserError
from hvtune.files import write_text_atomic
from hvtune.output.status import RunStatus, is_stale, read_status, recorded
from hvtune.serve.run_folder import RunFolder, safe_file
from hvtune.serve.server import PageServer, resolve_token

TOKEN = "correct-horse-battery-staple"


@contextmanager
def page(*folders: Path, token: str = TOKEN, allow_stop: bool = True, host: str = "127.0.0.1", **limits):
    server = PageServer((host, 0), [RunFolder(f) for f in folders], token, allow_stop, **limits)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def request(
    port: int, path: str, method: str = "GET", headers: dict | None = None, *, auth: bool = True
) -> tuple[int, dict, bytes]:
    """One raw request: the path is sent exactly as given (no client-side normalisation of `..`). With `auth` it
    carries the page's token as scripts do (Bearer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    sent = {"Host": f"127.0.0.1:{port}", **(BEARER if auth else {}), **(headers or {})}
    conn.request(method, path, headers=sent)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def write_loss(out: Path, rows: list[tuple[int, float]]) -> None:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"step": s, "loss": v, "lr": 1e-4, "epoch": 0, "seconds": 0.3}) + "\n" for s, v in rows)
    write_text_atomic(out / "logs" / "loss.jsonl", lines)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    out = tmp_path / "run"
    write_loss(out, [(1, 0.5), (2, 0.4)])
    (out / "validation" / "step_000002").mkdir(parents=True)
    (out / "validation" / "step_000002" / "validation_0.mp4").write_bytes(bytes(range(256)) * 40)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (out / "checkpoints" / "checkpoint-000002").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-000002" / "lora.safetensors").write_bytes(b"ckpt")
    (out / "checkpoints" / "checkpoint-000002" / "trainer_state.json").write_text("{}")
    return out


# ---------------------------------------------------------------------------------------------------- status file


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_status_is_written_at_most_once_a_second_and_at_every_phase_change(tmp_path):
    clock = Clock()
    status = RunStatus(tmp_path, clock=clock)
    status.phase("training", total_steps=100)
    for step in range(1, 11):  # ten steps in 0.9 s after the phase was written: no write
        clock.now += 0.09
        status.step(step, loss=1.0 / step, lr=1e-4, seconds=0.09)
    assert read_status(tmp_path)["step"] == 0
    clock.now += 0.2  # a second has passed since the last write
    status.step(11, loss=0.09, lr=1e-4, seconds=0.2)
    written = read_status(tmp_path)
    assert written["step"] == 11 and written["state"] == "training"
    assert written["s_per_step"] == pytest.approx(0.09) and written["eta_s"] == pytest.approx(0.09 * 89, abs=0.1)
    status.phase("validating")  # at once, whatever the clock says
    assert read_status(tmp_path)["state"] == "validating"
    status.step(12, loss=0.08, lr=1e-4, seconds=5.0)  # back to training: written at once too
    assert read_status(tmp_path)["state"] == "training"
    status.finish(stopped_early=False, step=100)
    assert read_status(tmp_path)["state"] == "finished" and read_status(tmp_path)["eta_s"] is None


def test_a_reader_never_sees_half_a_status_file(tmp_path):
    status = RunStatus(tmp_path)
    status.phase("training", total_steps=10_000, record={"config": {f"key_{i}": "x" * 50 for i in range(200)}})
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            text = (tmp_path / "status.json").read_text()
            seen.append(json.loads(text)["step"])  # raises on a torn file

    thread = threading.Thread(target=reader)
    thread.start()
    for step in range(300):
        status.data["step"] = step
        status.phase("training")
    stop.set()
    thread.join()
    assert seen and max(seen) <= 299
    assert not [p for p in tmp_path.iterdir() if p.name != "status.json"], "temp files left behind"


def test_other_processes_write_nothing(tmp_path):
    RunStatus(tmp_path, enabled=False).phase("training")
    assert read_status(tmp_path) is None


def test_a_failure_is_recorded_with_its_one_line_reason_and_still_raised(tmp_path):
    status = RunStatus(tmp_path)
    status.phase("training", step=7, total_steps=20)
    with pytest.raises(ConfigError), recorded(tmp_path):
        raise ConfigError([Problem("config.json", "learning_rate", -1, "must be > 0"), Problem("x", "y", 1, "z")])
    written = read_status(tmp_path)
    assert written["state"] == "failed" and written["step"] == 7
    reason = written["reason"]
    assert (
        reason == "2 configuration problem(s): config.json: learning_rate = -1: must be > 0 (+1 more lines in the log)"
    )

    with pytest.raises(RuntimeError), recorded(tmp_path):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    assert (
        read_status(tmp_path)["reason"]
        == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (+1 more lines in the log)"
    )


def test_caching_is_recorded_only_into_an_existing_output_folder(tmp_path):
    with recorded(tmp_path / "missing", "caching", done="cached"):
        pass
    assert not (tmp_path / "missing").exists()
    with recorded(tmp_path, "caching", done="cached"):
        assert read_status(tmp_path)["state"] == "caching"
    assert read_status(tmp_path)["state"] == "cached"


def test_a_dead_run_is_told_apart_from_a_live_one():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    now = time.time()
    assert is_stale({"state": "training", "pid": os.getpid(), "host": here, "updated": now}) is None
    assert "ended without reporting" in is_stale({"state": "training", "pid": dead.pid, "host": here, "updated": now})
    # another machine: only silence tells, and long validations are allowed for
    assert is_stale({"state": "training", "pid": 1, "host": "elsewhere", "updated": now - 60}) is None
    assert "no update for 20 min" in is_stale({"state": "validating", "pid": 1, "host": "x", "updated": now - 1200})
    assert is_stale({"state": "finished", "pid": dead.pid, "host": here, "updated": 0}) is None


def test_train_that_cannot_start_says_why_in_status(demo_project, tmp_path):
    """`hvtune train` with a cache that is not there: exit 2, and the page would show `failed` with that line."""
    cfg = json.loads(demo_project.read_text())
    cfg["cache_dir"], cfg["output_dir"] = str(tmp_path / "empty-cache"), str(tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run_hvtune("train", "--config", str(tmp_path / "config.json"))
    assert r.returncode == 2
    written = read_status(tmp_path / "out")
    assert written["state"] == "failed" and "hvtune cache" in written["reason"]
    assert written["reason"] in r.stderr


# ---------------------------------------------------------------------------------------------------- token and host


def test_token_is_required_when_set_and_kept_in_a_cookie(run_dir):
    with page(run_dir, token=TOKEN) as port:
        assert request(port, "/", auth=False)[0] == 401
        assert request(port, "/api/state", auth=False)[0] == 401
        assert request(port, "/api/state?token=wrong-token-123", auth=False)[0] == 401
        assert request(port, "/files/pytorch_lora_weights.safetensors", auth=False)[0] == 401
        status, headers, _ = request(port, f"/?token={TOKEN}", auth=False)
        assert status == 303 and headers["location"] == "/"  # the token leaves the address bar
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert request(port, "/", headers={"Cookie": cookie.split(";")[0]}, auth=False)[0] == 200
        assert request(port, "/api/state", headers=BEARER, auth=False)[0] == 200
        assert TOKEN not in cookie  # the cookie holds an HMAC of the token, plain hex whatever the token is
        assert request(port, f"/api/state?token={TOKEN}", auth=False)[0] == 200  # scripts may pass it in the query
        assert (
            request(port, "/api/state", headers={"Cookie": f"hvtune_page_{port}=nope-nope-nope"}, auth=False)[0] == 401
        )


def test_every_page_has_a_token(monkeypatch):
    """On 127.0.0.1 too: a rented box can be shared, and any local user could download the LoRA or stop the run."""
    monkeypatch.delenv("HVTUNE_PAGE_TOKEN", raising=False)
    generated = resolve_token(None)
    assert generated and len(generated) >= 20 and generated != resolve_token(None)
    monkeypatch.setenv("HVTUNE_PAGE_TOKEN", TOKEN)
    assert resolve_token(None) == TOKEN and resolve_token("another-long-token") == "another-long-token"
    with pytest.raises(UserError, match="at least 12"):
        resolve_token("short")


def test_loopback_page_without_a_token_set_still_needs_one_to_download_or_stop(run_dir, monkeypatch):
    monkeypatch.delenv("HVTUNE_PAGE_TOKEN", raising=False)
    with page(run_dir, token=resolve_token(None)) as port:
        assert request(port, "/files/pytorch_lora_weights.safetensors", auth=False)[0] == 401
        assert request(port, "/api/stop", "POST", {"X-Hvtune-Stop": "1"}, auth=False)[0] == 403


def test_serve_prints_the_address_with_its_token(run_dir, tmp_path):
    app = str(Path(__file__).resolve().parents[1] / "app")
    env = {**os.environ, "PYTHONPATH": app, "HVTUNE_PAGE_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvtune", "serve", str(run_dir), "--host", "0.0.0.0", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # started as the entrypoints do (`hvtune serve ... &` in a script): SIGINT arrives ignored; Ctrl-C stops it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("run page: http://") and line.strip().endswith(f"?token={TOKEN}"), line
        port = int(re.search(r":(\d+)/", line).group(1))
        assert request(port, "/api/state", auth=False)[0] == 401
        assert request(port, "/api/state", headers=BEARER, auth=False)[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)  # a loaded 2-core CI box: it exits in about 1 s
    assert proc.returncode == 0


def test_a_token_with_plus_slash_and_equals_works_in_the_printed_link_and_pasted_raw(run_dir):
    token = "aB3+xY/9kL=mN+Q0/zw=="  # as `openssl rand -base64 16` prints them
    proc, port = serve_process(run_dir, token=token)
    try:
        link = proc.link.split(" ", 2)[2]
        assert "%2B" in link and "%2F" in link and "%3D" in link, link
        for query in (link.split("/", 3)[3], f"?token={token}"):  # the printed link, and the token pasted as is
            status, headers, _ = request(port, "/" + query, auth=False)
            assert status == 303, query
            assert (
                request(port, "/api/state", headers={"Cookie": headers["set-cookie"].split(";")[0]}, auth=False)[0]
                == 200
            )
        assert request(port, "/api/state", headers={"Authorization": f"Bearer {token}"}, auth=False)[0] == 200
    finally:
        proc.kill()
        proc.wait()


def test_a_malformed_cookie_of_another_local_app_never_locks_the_owner_out(run_dir):
    with page(run_dir) as port:
        ours = request(port, f"/?token={TOKEN}", auth=False)[1]["set-cookie"].split(";")[0]
        jar = [
            'prefs={"theme": "dark", "cols": [1, 2]}',  # JSON, with spaces and commas
            "session=a b c",
            "path=C:\\Users\\me",  # a backslash
            "flag",
            '"quoted=odd',
        ]
        for i in range(len(jar) + 1):
            cookies = "; ".join([*jar[:i], ours, *jar[i:]])
            assert request(port, "/api/state", headers={"Cookie": cookies}, auth=False)[0] == 200, cookies
        assert request(port, "/api/state", headers={"Cookie": "; ".join(jar)}, auth=False)[0] == 401


def test_idle_connections_time_out_and_open_connections_are_capped(run_dir):
    with page(run_dir, idle_timeout=1.0, max_connections=2) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # half-open: never send a byte
        time.sleep(0.2)
        refused = socket.create_connection(("127.0.0.1", port))
        refused.settimeout(5)
        assert refused.recv(1) == b""  # closed at once: no thread for a third
        refused.close()
        started = time.monotonic()
        for conn in idle:
            conn.settimeout(5)
            assert conn.recv(1) == b""  # the server closed it after the idle timeout
            conn.close()
        assert time.monotonic() - started < 3
        time.sleep(0.2)
        assert request(port, "/api/state")[0] == 200  # the slots are free again


def test_failed_requests_write_one_line_each_and_a_flood_is_cut_short(run_dir, capfd):
    with page(run_dir) as port:
        for _ in range(3):
            assert request(port, "/api/state?token=wrong-token-123", auth=False)[0] == 401
        conn = socket.create_connection(("127.0.0.1", port))  # a request aborted half-way through its answer
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.sendall(f"GET /files/validation/step_000002/validation_0.mp4 HTTP/1.0\r\n{auth_line()}\r\n".encode())
        conn.close()
        time.sleep(0.3)
        first = capfd.readouterr().err.splitlines()
        for _ in range(100):
            request(port, "/nothing", auth=False)
        time.sleep(0.2)
        flood = capfd.readouterr().err.splitlines()
        request(port, "/nothing", auth=False)
    assert [line for line in first if "401" in line] == ["page: 127.0.0.1 GET /api/state: 401"] * 3, first
    assert len(first) <= 4 and not [line for line in first if "Traceback" in line or "wrong-token" in line], first
    assert len(flood) < 20, flood  # at most 20 a minute: 100 failures do not bury the training log


def auth_line() -> str:
    return f"Authorization: Bearer {TOKEN}\r\n"


def test_every_answer_has_the_security_headers_even_501(run_dir):
    with page(run_dir) as port:
        for method, path in (("PUT", "/"), ("DELETE", "/api/state"), ("GET", "/nothing")):
            status, headers, _ = request(port, path, method)
            assert status in (404, 501) and "frame-ancestors 'none'" in headers["content-security-policy"], method
            assert headers["x-content-type-options"] == "nosniff"


def test_serve_listens_on_ipv6_loopback(run_dir):
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    proc, port = serve_process(run_dir, "--host", "::1")
    try:
        assert proc.link.startswith(f"run page: http://[::1]:{port}/?token="), proc.link
        conn = http.client.HTTPConnection("::1", port, timeout=10)
        conn.request("GET", "/api/state", headers=BEARER)
        assert conn.getresponse().status == 200
    finally:
        proc.kill()
        proc.wait()


def test_a_stopped_run_shows_its_resume_command_and_the_log_tail(run_dir):
    (run_dir / "run.json").write_text(
        json.dumps({"resolved": {"config": {}, "config_path": "/data/my config.json"}, "stopped_early": True})
    )
    secret = "hf_" + "s" * 34
    (run_dir / "logs" / "libraries.log").write_text(
        f"GET https://x/?token={secret}\n" + "".join(f"line {i}\n" for i in range(99))
    )
    with page(run_dir) as port:
        state = json.loads(request(port, "/api/state")[2])
        log = json.loads(request(port, "/api/log")[2])
    assert state["status"]["state"] == "stopped"
    assert state["resume"] == (
        f"hvtune train --config '/data/my config.json' --output_dir={run_dir} --resume_from_checkpoint=latest"
    )
    assert log["libraries"][-1] == "line 98" and len(log["libraries"]) == 40 and '"step": 2' in log["loss"][-1]
    with page(run_dir) as port:  # a token a library logged is masked
        (run_dir / "logs" / "libraries.log").write_text(f"GET https://x/?token={secret}\n")
        assert secret not in request(port, "/api/log")[2].decode()


def test_video_names_with_hash_and_question_mark_are_served(run_dir):
    odd = run_dir / "validation" / "step_000002" / "a#b?c.mp4"
    odd.write_bytes(b"odd video")
    with page(run_dir) as port:
        assert request(port, "/files/validation/step_000002/a%23b%3Fc.mp4")[2] == b"odd video"
        videos = json.loads(request(port, "/api/state")[2])["videos"]
    assert {v["name"] for v in videos} == {"a#b?c.mp4", "validation_0.mp4"}


def test_serve_refuses_an_address_of_another_machine_naming_the_host(run_dir):
    r = run_hvtune("serve", str(run_dir), "--host", "192.0.2.1", "--port", "0", timeout=60)  # TEST-NET-1
    assert r.returncode == 2 and "pick another --host" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_serve_refuses_a_busy_port_in_one_line(run_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_hvtune("serve", str(run_dir), "--port", str(busy.getsockname()[1]), timeout=60)
    assert r.returncode == 2 and "pick another --port" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------- files


def test_files_outside_the_output_folder_are_never_served(run_dir, tmp_path):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not yours")
    (run_dir / "link.safetensors").symlink_to(secret)
    (run_dir / "validation" / "escape").symlink_to(tmp_path)
    (run_dir / ".pytorch_lora_weights.safetensors.123.abcd.tmp").write_bytes(b"half")
    (run_dir / "run.json").write_text(json.dumps({"hub_token": "hf_" + "a" * 30}))
    with page(run_dir) as port:
        ok = request(port, "/files/pytorch_lora_weights.safetensors")
        assert ok[0] == 200 and ok[2] == b"lora" and "attachment" in ok[1]["content-disposition"]
        assert request(port, "/files/checkpoints/checkpoint-000002/lora.safetensors")[2] == b"ckpt"
        for path in [
            "/files/../secret.safetensors",
            "/files/..%2fsecret.safetensors",
            "/files/%2e%2e/secret.safetensors",
            "/files/validation/../../secret.safetensors",
            f"/files/{secret}",
            f"/files//{secret}",
            "/files/link.safetensors",  # a symlink that leads out
            "/files/validation/escape/secret.safetensors",
            "/files/.pytorch_lora_weights.safetensors.123.abcd.tmp",  # a file being written
            "/files/run.json",  # raw records may hold secrets: /api/record masks them
            "/files/checkpoints/checkpoint-000002/trainer_state.json",
            "/files/logs",
            "/files/nothing.mp4",
            "/files/x.mp4%00.json",
        ]:
            status, _, body = request(port, path)
            assert status == 404 and b"not yours" not in body, path
    assert safe_file(run_dir, "validation/step_000002/validation_0.mp4") is not None


def test_videos_are_listed_newest_first_and_served_with_ranges(run_dir):
    (run_dir / "validation" / "step_000004").mkdir()
    (run_dir / "validation" / "step_000004" / "validation_0.mp4").write_bytes(b"v4")
    data = (run_dir / "validation" / "step_000002" / "validation_0.mp4").read_bytes()
    with page(run_dir) as port:
        state = json.loads(request(port, "/api/state")[2])
        assert [v["step"] for v in state["videos"]] == [4, 2]
        labels = {d["label"]: d["path"] for d in state["downloads"]}
        assert labels["LoRA for diffusers / peft (load_lora_adapter)"] == "pytorch_lora_weights.safetensors"
        checkpoint = "latest checkpoint's LoRA (checkpoint-000002; for resuming, not ComfyUI)"
        assert labels[checkpoint] == "checkpoints/checkpoint-000002/lora.safetensors"
        status, headers, body = request(
            port, "/files/validation/step_000002/validation_0.mp4", headers={"Range": "bytes=100-199"}
        )
        assert status == 206 and body == data[100:200] and headers["content-range"] == f"bytes 100-199/{len(data)}"
        assert headers["content-type"] == "video/mp4"
        status, _, body = request(
            port, "/files/validation/step_000002/validation_0.mp4", headers={"Range": "bytes=-10"}
        )
        assert status == 206 and body == data[-10:]
        assert (
            request(port, "/files/validation/step_000002/validation_0.mp4", headers={"Range": "bytes=99999-"})[0] == 416
        )


def loss(port: int, query: str = "") -> dict:
    return json.loads(request(port, f"/api/loss?{query}")[2])


def test_loss_is_read_incrementally_and_restarts_after_a_resume_rewrote_it(run_dir):
    with page(run_dir) as port:
        first = loss(port, "columns=800")
        assert [b[1] for b in first["buckets"]] == [1, 2] and first["stride"] == 1
        with (run_dir / "logs" / "loss.jsonl").open("a") as f:  # a line being written: not returned half
            f.write(json.dumps({"step": 3, "loss": 0.3}) + "\n" + '{"step": 4, "lo')
        more = loss(port, f"columns=800&offset={first['offset']}&inode={first['inode']}&stride=1")
        assert [b[1] for b in more["buckets"]] == [3] and not more["reset"]
        write_loss(run_dir, [(1, 0.5)])  # a resume from step 1 rewrites the log (a new file)
        again = loss(port, f"columns=800&offset={more['offset']}&inode={more['inode']}&stride=1")
        assert again["reset"] and [b[1] for b in again["buckets"]] == [1]


def test_a_nan_in_the_loss_log_still_gives_valid_json(run_dir):
    (run_dir / "logs" / "loss.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": NaN}\n')
    RunStatus(run_dir).step(2, loss=float("nan"), lr=1e-4, seconds=0.2)
    with page(run_dir) as port:
        text = request(port, "/api/loss?columns=800")[2].decode()
        buckets = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))["buckets"]
        assert buckets[1][1] == 2 and buckets[1][8] == 1 and buckets[1][4] == 0  # counted as non-finite
        state = request(port, "/api/state")[2].decode()
        assert json.loads(state, parse_constant=lambda c: pytest.fail(c))["status"]["loss"] is None


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def test_a_300k_row_log_is_sent_in_pixel_buckets_and_the_server_memory_stays_flat(tmp_path):
    """The measured figures: docs/RUN_PAGE.md ("Long runs")."""
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    row = '{{"step": {}, "loss": {}, "lr": 0.0001, "epoch": 0, "seconds": 0.31}}\n'
    spike = 150_000
    text = "".join(row.format(s, 9.0 if s == spike else 0.1 + (s % 7) / 100) for s in range(1, 300_001))
    (out / "logs" / "loss.jsonl").write_text(text)
    assert len(text) > 20_000_000
    proc, port = serve_process(out)
    try:
        request(port, "/api/state")
        baseline = rss_kb(proc.pid)
        sizes, times = [], []
        for _ in range(10):  # ten page loads: the first reads the log, the others reuse what it built
            started = time.perf_counter()
            status, _, body = request(port, "/api/loss?columns=1200")
            times.append(time.perf_counter() - started)
            sizes.append(len(body))
        view = json.loads(body)
        zoom = loss(port, f"first={spike - 500}&last={spike + 500}&columns=1200")
        tail = loss(port, f"columns=1200&offset={view['offset']}&inode={view['inode']}&stride={view['stride']}")
        peak = rss_kb(proc.pid, "VmHWM")
    finally:
        proc.kill()
        proc.wait()
    assert status == 200 and len(view["buckets"]) <= 2048 and max(sizes) < 400_000, (len(view["buckets"]), sizes)
    assert max(b[6] for b in view["buckets"]) == 9.0  # the one-step spike survives 250 steps per bucket
    assert zoom["stride"] == 1 and [b[1] for b in zoom["buckets"]][:1] == [spike - 500] and len(zoom["buckets"]) == 1001
    assert tail["buckets"] == [] and not tail["reset"]  # nothing new: the next tick costs nothing
    print(f"300k rows: first view {times[0]:.2f} s, then {max(times[1:]) * 1000:.1f} ms, {max(sizes)} B each; ", end="")
    print(f"server RSS {baseline} kB -> peak {peak} kB")
    assert peak - baseline < 30_000, (baseline, peak)  # ten whole-log answers did not grow the server (1.24 GB before)


def serve_process(out: Path, *args: str, token: str = TOKEN) -> tuple[subprocess.Popen, int]:
    app = str(Path(__file__).resolve().parents[1] / "app")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvtune", "serve", str(out), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": app, "HVTUNE_PAGE_TOKEN": token},
    )
    line = proc.stdout.readline()
    match = re.search(r":(\d+)/", line)
    if not match:
        proc.kill()
        pytest.fail(f"hvtune serve did not start: {line}{proc.communicate()[0]}")
    proc.link = line.strip()
    return proc, int(match.group(1))


def test_two_folders_show_both_curves_and_the_compare_verdict_once_both_finished(tmp_path):
    import torch
    from safetensors.torch import save_file

    from hvtune.run_files import LORA_NAME

    runs = []
    for name, losses in (("a", [0.5, 0.4]), ("b", [0.5, 0.41])):
        out = tmp_path / name
        write_loss(out, list(enumerate(losses, start=1)))
        save_file({"lora_A": torch.ones(4, 2)}, out / LORA_NAME)
        runs.append(out)
    (runs[0] / "run.json").write_text(json.dumps({"config_hash": "same", "global_step": 2}))
    with page(*runs) as port:
        assert json.loads(request(port, "/api/info")[2])["runs"] == [str(r) for r in runs]
        assert [b[4] for b in json.loads(request(port, "/api/loss?run=1")[2])["buckets"]] == [0.5, 0.41]
        waiting = json.loads(request(port, "/api/compare")[2])
        assert waiting["verdict"] is None and "both runs have finished" in waiting["text"]
        (runs[1] / "run.json").write_text(json.dumps({"config_hash": "same", "global_step": 2}))
        done = json.loads(request(port, "/api/compare")[2])
        assert done["verdict"] == "different" and "verdict: DIFFERENT" in done["text"]  # 2.5% > 2% loss tolerance
        assert request(port, "/api/state?run=2")[0] == 404
    with page(runs[0]) as port:
        assert request(port, "/api/compare")[0] == 404


# ---------------------------------------------------------------------------------------------------- secrets


def test_run_record_is_served_with_secrets_masked(run_dir):
    record = {
        "resolved": {
            "config": {"learning_rate": 1e-4, "output_dir": "/data/outputs", "tokenizer_max_length": 256},
            "unknown_keys": {
                "hub_token": "hf_" + "x" * 34,
                "webhook_config": {"url": "https://discord/..."},
                "wandb_api_key": "abc",
                "--report_to": "wandb",
                "push_to_hub_token": "",
            },
            "sources": {"learning_rate": "env:HVTUNE_LEARNING_RATE"},
        },
        "environment": {"note": "pulled with hf_" + "y" * 34},
    }
    (run_dir / "run.json").write_text(json.dumps(record))
    with page(run_dir) as port:
        for path in ("/api/record", "/api/record?download=1"):
            body = request(port, path)[2].decode()
            served = json.loads(body)
            assert "x" * 34 not in body and "y" * 34 not in body and "discord" not in body and '"abc"' not in body
            unknown = served["resolved"]["unknown_keys"]
            assert unknown["hub_token"] == unknown["webhook_config"] == unknown["wandb_api_key"] == "***"
            assert unknown["--report_to"] == "wandb" and served["resolved"]["config"]["tokenizer_max_length"] == 256
    assert mask_secrets({"HF_TOKEN": "hf_" + "z" * 30, "seed": 42}) == {"HF_TOKEN": "***", "seed": 42}


# ---------------------------------------------------------------------------------------------------- stop


def fake_trainer(tmp_path: Path) -> subprocess.Popen:
    """A process whose command line names hvtune and that exits 0 on SIGTERM, as training does."""
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(60)  # hvtune"
    return subprocess.Popen([sys.executable, "-c", code])


def test_stop_sends_sigterm_only_with_the_token_and_the_page_header(run_dir, tmp_path):
    proc = fake_trainer(tmp_path)
    try:
        time.sleep(0.3)
        status = RunStatus(run_dir)
        status.data["pid"] = proc.pid
        status.phase("training", step=5, total_steps=10)
        with page(run_dir, token=TOKEN) as port:
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            assert request(port, f"/api/stop?token={TOKEN}", "POST", {"X-Hvtune-Stop": "1"}, auth=False)[0] == 403
            assert request(port, "/api/stop", "POST", {"X-Hvtune-Stop": "1"}, auth=False)[0] == 403  # no token
            assert request(port, "/api/stop", "POST", bearer)[0] == 403  # a cross-site form cannot add the header
            assert proc.poll() is None
            status_code, _, body = request(port, "/api/stop", "POST", {**bearer, "X-Hvtune-Stop": "1"})
            assert status_code == 200 and "checkpoint at the end of step 6" in json.loads(body)["message"]
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


def test_stop_refuses_what_is_not_a_live_local_run(run_dir, tmp_path):
    status = RunStatus(run_dir)
    status.data.update(pid=os.getpid(), host="another-box")
    status.phase("training")
    with page(run_dir) as port:
        code, _, body = request(port, "/api/stop", "POST", {**BEARER, "X-Hvtune-Stop": "1"})
        assert code == 409 and "another machine" in json.loads(body)["message"]
    status.data["host"] = socket.gethostname()
    status.finish(stopped_early=False)
    with page(run_dir, allow_stop=False) as port:
        assert request(port, "/api/stop", "POST", {**BEARER, "X-Hvtune-Stop": "1"})[0] == 403
    with page(run_dir) as port:
        assert request(port, "/api/stop", "POST", {**BEARER, "X-Hvtune-Stop": "1"})[0] == 409


# ---------------------------------------------------------------------------------------------------- live training


@pytest.mark.slow
def test_stop_button_checkpoints_a_real_training_run(demo_project, tmp_path):
    """The page's stop goes to `hvtune train` as SIGTERM does: a checkpoint, exit 0, `stopped` on the page."""
    out = tmp_path / "run"
    app = str(Path(__file__).resolve().parents[1] / "app")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hvtune",
            "train",
            "--config",
            str(demo_project),
            f"--output_dir={out}",
            "--max_train_steps=100000",
            "--validation_disable=true",
            "--checkpointing_steps=100000",
        ],
        env={**os.environ, "PYTHONPATH": app},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with page(out) as port:
            deadline = time.time() + 180
            while time.time() < deadline and (read_status(out) or {}).get("step", 0) < 2:
                time.sleep(0.2)
            state = json.loads(request(port, "/api/state")[2])["status"]
            assert state["state"] == "training" and state["total_steps"] == 100000 and state["s_per_step"] > 0
            assert state["eta_s"] > 0 and state["lr"] > 0
            record = json.loads(request(port, "/api/record")[2])
            assert record["in_progress"] and record["resolved"]["config"]["max_train_steps"] == 100000
            assert record["seeds"]["seed"] == json.loads(demo_project.read_text()).get("seed", 42)
            assert record["environment"]["packages"]["torch"]
            assert request(port, "/api/stop", "POST", {**BEARER, "X-Hvtune-Stop": "1"})[0] == 200
            output, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, output
            final = json.loads(request(port, "/api/state")[2])
        assert final["status"]["state"] == "stopped" and "checkpoint at step" in final["status"]["reason"]
        assert any("latest checkpoint" in d["label"] for d in final["downloads"])
    finally:
        proc.kill()


# ---------------------------------------------------------------------------------------------------- containers


def test_compose_page_file_turns_the_page_on_and_publishes_it_on_loopback():
    from test_container_static import compose_config

    assert "ports" not in compose_config("cpu")["services"]["train"]  # off by default
    files = "compose.yaml:compose.page.yaml"
    train = compose_config("cpu", COMPOSE_FILE=files)["services"]["train"]
    assert train["environment"]["HVTUNE_PAGE_PORT"] == "8765"
    assert [(p["host_ip"], p["published"], p["target"]) for p in train["ports"]] == [("127.0.0.1", "8765", 8765)]
    train = compose_config("cpu", COMPOSE_FILE=files, HVTUNE_PAGE_PORT="9000", HVTUNE_PAGE_BIND="0.0.0.0")
    ports = train["services"]["train"]["ports"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in ports] == [("0.0.0.0", "9000", 9000)]


def entrypoint_page(tmp_path: Path, port: str, calls: int = 1) -> subprocess.Popen:
    script = f'source entrypoints/lib.sh; HV_OUTPUT_DIR="{tmp_path}"; {"hv_start_page; " * calls} wait'
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "app"), "HVTUNE_PAGE_PORT": port}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the `hvtune` script next to this Python
    env.pop("HV_PAGE_STARTED", None)
    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen(
        ["bash", "-c", script], cwd=root, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def test_entrypoint_starts_one_page_with_a_token_when_the_port_is_set(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = entrypoint_page(tmp_path, str(port), calls=2)  # `all` then `train`: one page
    try:
        line = proc.stderr.readline()
        assert line.startswith("[page] run page: http://") and "?token=" in line, line
        token = line.strip().rsplit("?token=", 1)[1]
        assert request(port, "/api/state", auth=False)[0] == 401
        assert request(port, "/api/state", headers={"Authorization": f"Bearer {token}"}, auth=False)[0] == 200
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rest = proc.communicate(timeout=10)[1]
    assert "cannot listen" not in rest, rest

    bad = entrypoint_page(tmp_path, "80a")
    assert bad.wait(timeout=30) == 2 and "HVTUNE_PAGE_PORT=80a is not a port number" in bad.stderr.read()


def test_the_page_starts_without_importing_torch():
    """`hvtune serve` starts in about a second on a busy training box: nothing it imports pulls in torch."""
    code = "import sys, hvtune.cli, hvtune.serve.server; print('torch' in sys.modules)"
    app = str(Path(__file__).resolve().parents[1] / "app")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": app}
    )
    assert r.stdout.strip() == "False", r.stderr
