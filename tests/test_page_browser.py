"""The run page in a real browser (headless Chromium, Debian's package) during a real tiny training run: the step
advances between two screenshots, the loss curve is drawn, a validation video plays, a finished run says `finished`.

Chromium comes from tests/browser_setup.sh (run by the `chromium` fixture when it is missing and we are root).
HVTUNE_DOCS_SCREENSHOT=docs/run-page.png also saves the finished page there (how docs/run-page.png was made).
"""

from __future__ import annotations

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


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hvtune", *args],
        env={**os.environ, "PYTHONPATH": APP},
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

            # a validation video appears without a reload and plays
            browser.wait_for("document.querySelectorAll('video').length > 0", 240)
            ready = browser.wait_for("document.querySelector('video').readyState >= 2", 60)
            assert ready
            played = browser.evaluate(
                """(async () => { const v = document.querySelector('video'); await v.play();
                    await new Promise(r => setTimeout(r, 600));
                    return {time: v.currentTime, error: v.error && v.error.code, state: v.readyState}; })()""",
                await_promise=True,
            )
            assert played["error"] is None and played["time"] > 0, played

            output, _ = train.communicate(timeout=600)
            assert train.returncode == 0, output[-3000:]
            browser.navigate(url)  # a fresh load of the finished run
            browser.wait_for("document.querySelector('#state').textContent === 'finished'", 30)
            assert browser.evaluate("document.querySelector('.step').textContent") == "30"
            links = browser.evaluate("[...document.querySelectorAll('.links a')].map(a => a.textContent)")
            assert any(t.startswith("LoRA (diffusers)") for t in links) and any(
                t.startswith("LoRA (ComfyUI)") for t in links
            )
            browser.evaluate("document.querySelector('details.record').open = true")
            browser.wait_for("document.querySelector('details.record table tr') !== null", 30)
            browser.evaluate("document.querySelector('details.record').open = false")  # the picture: no long table
            # every step's video loads (and the picture shows frames, not spinners)
            assert browser.evaluate("document.querySelectorAll('video').length") == 5  # steps 6, 12, 18, 24, 30
            browser.wait_for("[...document.querySelectorAll('video')].every(v => v.readyState >= 3)", 60)
            shot = browser.screenshot(tmp_path / "finished.png", full_page=True)
            if os.environ.get("HVTUNE_DOCS_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["HVTUNE_DOCS_SCREENSHOT"])
    finally:
        for proc in (train, serve):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert (tmp_path / "during-1.png").stat().st_size > 10_000 and (tmp_path / "during-2.png").stat().st_size > 10_000
