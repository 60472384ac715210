"""The run page in a real browser (headless Chromium, Debian's package): during a real tiny training run (the step
advances between two screenshots, the loss curve is drawn, a validation video plays and keeps playing while new ones
arrive, a finished run says `finished`), on a long stopped run's folder (a 300k-row log, a token with `+/=`, another
app's malformed cookie, hover and zoom, odd video names, the resume command) and on two compared runs.

Chromium comes from tests/browser_setup.sh (run by the `chromium` fixture when it is missing and we are root).
HVTUNE_DOCS_SCREENSHOT=docs/run-page.png also saves the finished page there (how docs/run-page.png was made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser import Browser, chromium_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app")


@pytest.fixture(scope="session")
def chromium() -> str:
    if chromium_path() is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("chromium is not installed and cannot be here (run tests/browser_setup.sh as root)")
        setup = subprocess.run(["bash", str(ROOT / "tests" / "browser_setup.sh")], capture_output=True, text=True)
        assert setup.returncode == 0, f"tests/browser_setup.sh failed:\n{setup.stdout[-2000:]}\n{setup.stderr[-2000:]}"
    path = chromium_path()
    assert path, "tests/browser_setup.sh ran but chromium is not on PATH"
    return path


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hvtune", *args],
        env={**os.environ, "PYTHONPATH": APP, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def canvas_ink(browser: Browser) -> int:
    """How many pixels of the loss chart are drawn in the run's colour (the smoothed curve)."""
    return browser.evaluate(
        """(() => { const c = document.querySelector('#chart'), d = c.getContext('2d')
              .getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i+3] > 200 && d[i+2] > 150 && d[i] < 120) n++;
            return n; })()"""
    )


def test_page_follows_a_training_run_to_the_end(chromium, demo_project, tmp_path):
    out = tmp_path / "run"
    train_args = ["--config", str(demo_project), f"--output_dir={out}", "--max_train_steps=30"]
    train_args += ["--validation_steps=6", "--checkpointing_steps=10"]
    serve = start("serve", str(out), "--port", "0")
    train = None
    try:
        line = ""
        while not line.startswith("run page:"):  # after the notice that the folder does not exist yet
            line = serve.stdout.readline()
            assert line, "hvtune serve exited"
        url = re.search(r"http://\S+", line).group(0)
        with Browser() as browser:
            # the page is up before the run starts: a browser's first start (font caches on a fresh machine) can
            # take longer than the whole tiny run, which the page would then only see finished
            browser.navigate(url)
            browser.wait_for("document.querySelector('.rstate').textContent === 'waiting'", 60)
            train = start("train", *train_args)
            live = "['training', 'validating', 'checkpointing'].includes(document.querySelector('.rstate').textContent)"
            step_of = "(Number(document.querySelector('.step').textContent) || 0)"
            try:
                first = browser.wait_for(
                    f"{live} && {step_of} && {{step: {step_of}, total: document.querySelector('.total').textContent,"
                    " eta: document.querySelector('.eta').textContent}",
                    240,
                )
            except TimeoutError:
                train.kill()
                raise AssertionError(
                    f"the page never showed the run training; train said:\n{train.communicate()[0][-3000:]}"
                ) from None
            browser.screenshot(tmp_path / "during-1.png")
            assert first["total"] == "30" and first["eta"] not in ("", "-"), first
            time.sleep(3)
            second = browser.wait_for(f"{step_of} > {first['step']} && {step_of}", 60)
            browser.screenshot(tmp_path / "during-2.png")
            assert second > first["step"]
            assert canvas_ink(browser) > 200, "the loss curve is not drawn"

            # a validation video appears without a reload, loads nothing until played, and plays
            browser.wait_for("document.querySelectorAll('video').length > 0", 240)
            assert browser.evaluate("document.querySelector('video').preload") == "none"
            played = browser.evaluate(
                """(async () => { const v = document.querySelector('video'); v.loop = true; await v.play();
                    await new Promise(r => setTimeout(r, 600)); v.dataset.watched = '1';
                    return {time: v.currentTime, error: v.error && v.error.code, state: v.readyState}; })()""",
                await_promise=True,
            )
            assert played["error"] is None and played["time"] > 0, played
            # the next step's video is added beside it: the one being watched is the same element, still playing
            count = browser.evaluate("document.querySelectorAll('video').length")
            browser.wait_for(f"document.querySelectorAll('video').length > {count}", 240)
            watched = browser.evaluate(
                """(async () => { const v = document.querySelector('video[data-watched]'); if (!v) return null;
                    const times = []; for (let k = 0; k < 8; k++) { times.push(v.currentTime);
                      await new Promise(r => setTimeout(r, 90)); }
                    return {paused: v.paused, times}; })()""",
                await_promise=True,
            )
            assert watched and not watched["paused"] and max(watched["times"]) > 0, watched  # a short loop: sampled

            output, _ = train.communicate(timeout=600)
            assert train.returncode == 0, output[-3000:]
            # the end of `train` says which file each tool loads, as the page's download list does
            assert "ComfyUI: comfyui_lora.safetensors; diffusers / peft (load_lora_adapter): " in output, output[-800:]
            browser.navigate(url)  # a fresh load of the finished run
            browser.wait_for("document.querySelector('#state').textContent === 'finished'", 30)
            assert browser.evaluate("document.querySelector('.step').textContent") == "30"
            links = browser.evaluate("[...document.querySelectorAll('.links a')].map(a => a.textContent)")
            assert any(t.startswith("LoRA for diffusers") for t in links) and any(
                t.startswith("LoRA for ComfyUI") for t in links
            )
            browser.evaluate("document.querySelector('details.record').open = true")
            browser.wait_for("document.querySelector('details.record table tr') !== null", 30)
            browser.evaluate("document.querySelector('details.record').open = false")  # the picture: no long table
            # every step's video plays (and the picture shows a frame of each, not a black box)
            assert browser.evaluate("document.querySelectorAll('video').length") == 5  # steps 6, 12, 18, 24, 30
            browser.evaluate("document.querySelectorAll('video').forEach(v => { v.muted = true; v.play(); })")
            browser.wait_for("[...document.querySelectorAll('video')].every(v => v.readyState >= 3)", 60)
            browser.evaluate("document.querySelectorAll('video').forEach(v => v.pause())")
            shot = browser.screenshot(tmp_path / "finished.png", full_page=True)
            if os.environ.get("HVTUNE_DOCS_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["HVTUNE_DOCS_SCREENSHOT"])
    finally:
        for proc in (train, serve):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert (tmp_path / "during-1.png").stat().st_size > 10_000 and (tmp_path / "during-2.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------- a long run

ODD_TOKEN = "aB3+xY/9kL=mN+Q0/zw=="  # as `openssl rand -base64 16` prints them
PROMPT = "a red fox <b>runs</b> through snow"


def long_stopped_run(out: Path) -> None:
    """A stopped run's folder: 300k loss rows with a spike and a NaN, two validation videos (one with `#` and `?` in
    its name), a checkpoint and a record."""
    from clips import write_clip
    from hvtune.output.status import RunStatus

    (out / "logs").mkdir(parents=True)
    row = '{{"step": {}, "loss": {}, "lr": 0.0001, "epoch": 0, "seconds": 0.31}}\n'
    values = {150_000: "9.0", 200_000: "NaN"}
    text = "".join(row.format(s, values.get(s, 0.1 + (s % 7) / 100)) for s in range(1, 300_001))
    (out / "logs" / "loss.jsonl").write_text(text)
    for step, name in ((100_000, "validation_0.mp4"), (300_000, "validation_0.mp4"), (300_000, "odd #1?.mp4")):
        folder = out / "validation" / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_clip(folder / name, frames=24, size=(64, 48))
    checkpoint = out / "checkpoints" / "checkpoint-300000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "lora.safetensors").write_bytes(b"x")
    record = {"resolved": {"config": {"validation_prompt": PROMPT}, "config_path": "/data/config.json"}}
    (out / "run.json").write_text(json.dumps({**record, "stopped_early": True}))
    status = RunStatus(out)
    status.data["started"] -= 3 * 3600
    status.finish(stopped_early=True, reason="stop requested: checkpoint at step 300000", step=300_000)


def test_a_long_stopped_run_opens_with_an_odd_token_and_a_foreign_cookie(chromium, tmp_path):
    out = tmp_path / "long"
    long_stopped_run(out)
    serve = start("serve", str(out), "--port", "0", env={"HVTUNE_PAGE_TOKEN": ODD_TOKEN})
    try:
        url = re.search(r"http://\S+", serve.stdout.readline()).group(0)
        with Browser(width=1200, height=900) as browser:
            # another local app's cookie on the same host (cookies ignore ports): JSON with spaces and a backslash
            for name, value in (("prefs", '{"theme": "dark", "cols": [1, 2]}'), ("path", "C:\\Users\\me")):
                browser.send("Network.setCookie", session=True, name=name, value=value, url=url.split("?")[0])
            browser.navigate(url)  # the printed link, token percent-encoded
            browser.wait_for("document.querySelector('.rstate').textContent === 'stopped'", 60)
            assert browser.evaluate("document.querySelector('#state').textContent") == "stopped"
            assert browser.evaluate("document.cookie.includes('prefs=')")  # the foreign cookie really was sent
            assert browser.evaluate("document.querySelector('.step').textContent") == "300000"
            assert browser.evaluate("document.querySelector('.elapsed').textContent").startswith("3h")
            resume = browser.evaluate("document.querySelector('.resume code').textContent")
            assert resume.startswith("hvtune train --config /data/config.json") and "resume_from_checkpoint" in resume

            # the spike at step 150000 is drawn (min/max per pixel column) and hovering it reads its value
            browser.wait_for("document.body.dataset.polls >= 2", 30)
            spike_x = browser.evaluate(
                "(() => { const c = document.querySelector('#chart').getBoundingClientRect();"
                " return c.left + 56 + (c.width - 120) * 0.5; })()"
            )
            box = browser.evaluate(
                "(() => { const r = document.querySelector('#chart').getBoundingClientRect();"
                " return {top: r.top, h: r.height, left: r.left, w: r.width}; })()"
            )
            y = box["top"] + box["h"] / 2
            mouse(browser, "mouseMoved", spike_x, y)
            tip = browser.wait_for(
                "!document.querySelector('#tip').hidden && document.querySelector('#tip').textContent"
            )
            assert "max 9.0000" in tip and "steps 1" in tip, tip
            # drag to zoom on a few hundred steps around it: now one step per column
            mouse(browser, "mousePressed", spike_x - 5, y)
            mouse(browser, "mouseMoved", spike_x + 5, y)
            mouse(browser, "mouseReleased", spike_x + 5, y)
            browser.wait_for("document.body.dataset.zoom", 30)  # the zoomed range's buckets arrived
            mouse(browser, "mouseMoved", spike_x, y)
            tip = browser.wait_for(
                "!document.querySelector('#tip').hidden && document.querySelector('#tip').textContent"
            )
            first, last = map(int, re.search(r"steps? (\d+)(?:-(\d+))?:", tip).groups(default="0"))
            assert 149_000 < first < 151_000 and last - first < 10, tip  # a few steps per column, not 256
            assert browser.evaluate("document.querySelector('#state').textContent") == "stopped"  # never unreachable
            # a stop button left disabled by an earlier stop is usable again once the run is not live (a resume)
            browser.evaluate("document.querySelector('#stop').disabled = true")
            browser.wait_for("!document.querySelector('#stop').disabled", 10)

            # videos: grouped by prompt, the prompt under each, loaded only when played, the odd name plays
            groups = browser.evaluate("[...document.querySelectorAll('.group')].map(g => g.dataset.group)")
            assert sorted(groups) == ["odd #1?", "validation_0"], groups
            assert browser.evaluate("document.querySelectorAll('.group[data-group=validation_0] video').length") == 2
            assert (
                browser.evaluate(
                    "document.querySelector('.group[data-group=validation_0] figcaption .prompt').textContent"
                )
                == PROMPT
            )
            assert browser.evaluate("[...document.querySelectorAll('video')].every(v => v.readyState === 0)")
            played = browser.evaluate(
                """(async () => { const v = document.querySelector('.group[data-group="odd #1?"] video');
                    await v.play(); await new Promise(r => setTimeout(r, 400));
                    return {time: v.currentTime, error: v.error && v.error.code}; })()""",
                await_promise=True,
            )
            assert played["error"] is None and played["time"] > 0, played
            links = browser.evaluate("[...document.querySelectorAll('.links a')].map(a => a.textContent)")
            assert any("for resuming, not ComfyUI" in t for t in links), links
            browser.evaluate("document.querySelector('details.log').open = true")  # the log's tail, once opened
            log = browser.wait_for(
                "(() => { const t = document.querySelector('pre.log').textContent;"
                " return t.includes('loss.jsonl') && t; })()",
                20,
            )
            assert '"step": 300000' in log, log[-300:]
    finally:
        serve.kill()
        serve.wait()


def mouse(browser: Browser, kind: str, x: float, y: float) -> None:
    browser.send("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, button="left", clickCount=1)


def test_two_compared_runs_show_the_config_difference_without_overflow(chromium, tmp_path):
    folders = []
    for name, rate in (("a-run", 1e-4), ("b-run", 3e-4)):
        out = tmp_path / "Runs" / name
        (out / "logs").mkdir(parents=True)
        (out / "logs" / "loss.jsonl").write_text('{"step": 1, "loss": 0.5, "lr": 0.0001}\n')
        config = {
            "learning_rate": rate,
            "seed": 42,
            "validation_prompt": "x" * 300,
            "output_dir": f"/{name}/" + "d" * 200,
        }
        (out / "run.json").write_text(json.dumps({"resolved": {"config": config}, "global_step": 1}))
        folders.append(out)
    serve = start("serve", *map(str, folders), "--port", "0")
    try:
        url = re.search(r"http://\S+", serve.stdout.readline()).group(0)
        with Browser(width=1000, height=900) as browser:
            browser.navigate(url)
            summary = browser.wait_for(
                "(() => { const s = document.querySelector('#config-diff summary').textContent;"
                " return s.includes('key(s)') && s; })()",
                60,
            )
            assert "2 key(s)" in summary, summary  # learning_rate and output_dir
            browser.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
            rows = browser.evaluate(
                "[...document.querySelectorAll('#config-diff tr')].map(r => r.cells[0].textContent)"
            )
            assert "learning_rate" in rows and "output_dir" in rows and "seed" not in rows, rows
            assert browser.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
            label = browser.evaluate("document.querySelector('.run h2 .label')")
            shown = browser.evaluate("getComputedStyle(document.querySelector('.run h2 .label')).textTransform")
            assert label is not None and shown == "none"  # folder paths keep their case ("Runs", not "RUNS")
    finally:
        serve.kill()
        serve.wait()


def test_the_record_shows_how_many_processes_and_their_sharding(chromium, tmp_path):
    """Issue 23: the run page's record says how the run was spread (world size, sharding, context-parallel degree)."""
    from hvtune.output.status import RunStatus

    out = tmp_path / "fsdp"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "loss.jsonl").write_text('{"step": 1, "loss": 0.5, "lr": 0.0001, "epoch": 0, "seconds": 0.3}\n')
    parallelism = {"world_size": 8, "sharding": "fsdp2", "context_parallel_size": 2}
    record = {"resolved": {"config": {"fsdp_enable": True}}, "world_size": 8, "parallelism": parallelism}
    (out / "run.json").write_text(json.dumps(record))
    RunStatus(out).finish(stopped_early=False, step=1)
    serve = start("serve", str(out), "--port", "0")
    try:
        url = re.search(r"http://\S+", serve.stdout.readline()).group(0)
        with Browser(width=1200, height=900) as browser:
            browser.navigate(url)
            browser.wait_for("document.querySelector('.rstate').textContent === 'finished'", 60)
            browser.evaluate("document.querySelector('details.record').open = true")
            browser.wait_for("document.querySelector('details.record .procs') !== null", 30)
            shown = browser.evaluate("document.querySelector('details.record .procs').textContent")
            assert shown == "8 (fsdp2), context parallel 2"
    finally:
        serve.terminate()
        serve.wait(timeout=30)
