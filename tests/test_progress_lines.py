"""Progress in a log that is not a terminal (compose, `docker logs`, CI, a pipe): complete lines with the count, the
rate and an ETA - one at the first unit, one per interval, a last one per phase; on a terminal the tqdm bar.
The cache's lines across real processes: tests/test_cache_sharded.py."""

from __future__ import annotations

import io
import re

import pytest

from hvtune.cache.shard import Shard
from hvtune.progress_lines import ProgressLines

LINE = re.compile(r"^vae: +(\d+)% (\d+)/(\d+) clips \| ([\d.]+) s/clip \| ETA (\d+:\d\d:\d\d)$")
LAST = re.compile(r"^vae: +(\d+)% (\d+)/(\d+) clips \| ([\d.]+) s/clip \| done in (\d+:\d\d:\d\d)$")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_a_line_at_the_first_unit_per_interval_and_at_the_end():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressLines(40, label="vae", unit="clip", stream=stream, interval=30, clock=clock)
    for _ in range(40):
        clock.now += 4.0
        bar.advance()
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    # the first clip, then a line every 30 s (8 clips of 4 s), then the phase's last line
    assert [int(LINE.match(ln)[2]) for ln in lines[:-1]] == [1, 9, 17, 25, 33], lines
    assert lines[1] == "vae:  22% 9/40 clips | 4.00 s/clip | ETA 0:02:04"  # 31 clips left at 4 s
    assert lines[-1] == "vae: 100% 40/40 clips | 4.00 s/clip | done in 0:02:40"


def test_a_count_from_several_processes_gives_the_rate_and_eta_of_all_of_them():
    """A sharded cache's main process counts every process's entries: 2 processes of 1 clip per 2 s = 1 s/clip."""
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressLines(100, label="vae", unit="clip", stream=stream, interval=10, clock=clock)
    for second in range(1, 101):
        clock.now = float(second)
        bar.update_to(second)  # both processes together: one clip a second
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[1] == "vae:  11% 11/100 clips | 1.00 s/clip | ETA 0:01:29"
    assert LAST.match(lines[-1]) and lines[-1].endswith("100/100 clips | 1.00 s/clip | done in 0:01:40")


def test_no_line_while_the_count_stands_still_and_the_last_line_tells_a_short_phase():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressLines(8, label="vae", unit="clip", stream=stream, interval=0, clock=clock)
    for _ in range(50):  # the main process polling the others before any clip is done
        clock.now += 0.25
        bar.update_to(0)
    assert stream.getvalue() == ""
    clock.now += 0.5
    bar.update_to(7)
    bar.update_to(7)
    bar.close()  # one clip failed to decode: the phase ends at 7/8
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert LINE.match(lines[0])[2] == "7" and LAST.match(lines[1])[2] == "7"


def test_on_a_terminal_the_bar_stays_tqdm():
    stream = Terminal()
    bar = ProgressLines(5, label="vae", unit="clip", stream=stream, interval=0)
    for _ in bar.each(range(5)):
        pass
    text = stream.getvalue()
    assert bar.bar is not None and "\r" in text and "vae: 100%|" in text and "5/5" in text
    assert not LINE.search(text) and "done in" not in text


def test_disabled_writes_nothing():
    stream = Terminal()
    for s in (stream, io.StringIO()):
        bar = ProgressLines(3, label="vae", unit="clip", stream=s, enabled=False)
        list(bar.each(range(3)))
        assert s.getvalue() == ""


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("HVTUNE_PROGRESS_SECONDS", "7")
    assert ProgressLines(1, label="x", unit="y").interval == 7
    monkeypatch.setenv("HVTUNE_PROGRESS_SECONDS", "soon")
    assert ProgressLines(1, label="x", unit="y").interval == 30


# ------------------------------------------------------------------------------------- the cache's phases (Shard)


@pytest.mark.parametrize("tty", [False, True])
def test_one_cache_process_shows_its_phase_as_lines_in_a_log_and_as_tqdm_on_a_terminal(tmp_path, monkeypatch, tty):
    stream = Terminal() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setenv("HVTUNE_PROGRESS_SECONDS", "0")
    assert list(Shard(tmp_path).progress(range(4), 4, desc="vae", unit="clip")) == [0, 1, 2, 3]
    text = stream.getvalue()
    if tty:
        assert "\r" in text and "vae: 100%|" in text and "4/4" in text
    else:
        lines = text.splitlines()
        assert "\r" not in text and [int(LINE.match(ln)[2]) for ln in lines[:-1]] == [1, 2, 3, 4], lines
        assert LAST.match(lines[-1])[2] == "4"


def test_the_main_cache_process_counts_the_other_processes_and_they_write_no_line(tmp_path, monkeypatch):
    """Rank 1 has encoded 3 entries and is done (its count file); rank 0 encodes its 2: the lines show 5 of 5."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setenv("HVTUNE_PROGRESS_SECONDS", "0")
    other = Shard(tmp_path, rank=1, world=2)
    assert list(other.progress(range(3), 5, desc="vae", unit="clip")) == [0, 1, 2]
    assert stream.getvalue() == ""  # not the main process: silent
    main = Shard(tmp_path, rank=0, world=2)
    assert list(main.progress(range(2), 5, desc="vae", unit="clip")) == [0, 1]
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("vae: 100% 5/5 clips |") and LAST.match(lines[-1]), lines
    assert all(LINE.match(ln) for ln in lines[:-1]) and "\r" not in stream.getvalue()
