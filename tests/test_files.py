"""files: every write lands whole or not at all, with the permissions a plain `open` would give."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hvtune.cache.store import remove_temp_files
from hvtune.files import atomic_directory, atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic

APP = str(Path(__file__).resolve().parents[1] / "app")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=oct)
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_success_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "out.bin"  # parent folders are created
    assert write_bytes_atomic(target, b"first") == 5
    assert write_bytes_atomic(target, b"second!") == 7
    assert target.read_bytes() == b"second!"
    assert write_text_atomic(target, "h\u00e9") == 3  # UTF-8 bytes counted
    assert target.read_bytes() == "h\u00e9".encode()
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path, error):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        tmp.write_bytes(b"half written")
        raise error
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_a_writer_that_needs_a_name_gets_one_beside_the_target(tmp_path):
    target = tmp_path / "still.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".still.png.")  # same folder (atomic rename), hidden
        assert not target.exists()  # nothing at the final name until the block succeeds
        with open(tmp, "wb") as f:  # as PIL, PyAV and matplotlib open it
            f.write(b"png bytes")
    assert target.read_bytes() == b"png bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["still.png"]


def test_final_files_and_directories_follow_the_umask(tmp_path, umask):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # what any ordinary write would give
    assert mode(plain) == 0o666 & ~umask
    write_bytes_atomic(tmp_path / "a.safetensors", b"x")
    with atomic_path(tmp_path / "b.png") as tmp:
        tmp.write_bytes(b"x")
    with atomic_directory(tmp_path / "checkpoint-000001") as d:
        (d / "state.json").write_text("{}")
    assert mode(tmp_path / "a.safetensors") == mode(tmp_path / "b.png") == mode(plain)
    assert mode(tmp_path / "checkpoint-000001") == 0o777 & ~umask
    assert mode(tmp_path / "checkpoint-000001" / "state.json") == mode(plain)


def test_json_keeps_the_run_record_format(tmp_path):
    target = tmp_path / "run.json"
    write_json_atomic(target, {"b": Path("/data"), "a": [1]})
    assert target.read_text() == '{\n  "a": [\n    1\n  ],\n  "b": "/data"\n}\n'
    write_json_atomic(target, {"b": 1, "a": 2}, indent=None, sort_keys=False)
    assert target.read_text() == '{"b": 1, "a": 2}\n'


def test_atomic_directory_replaces_an_existing_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    with atomic_directory(out) as tmp:
        assert not (tmp / "stale.bin").exists()  # built from scratch
        (tmp / "model_index.json").write_text("{}")
        assert (out / "stale.bin").exists()  # the old one stays usable until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_directory_leaves_nothing_behind_on_failure(tmp_path, existing):
    out = tmp_path / "model"
    if existing:
        out.mkdir()
        (out / "weights.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("save_pretrained failed")
    assert [p.name for p in tmp_path.iterdir()] == (["model"] if existing else [])
    if existing:
        assert (out / "weights.bin").read_bytes() == b"old"


def test_atomic_directory_keeps_the_previous_one_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "checkpoint-000010"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"old")
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == out and Path(src).name.endswith(".tmp") and Path(src).is_dir() and (Path(src) / "new").exists():
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space"), atomic_directory(out) as tmp:
        (tmp / "new").write_bytes(b"new")
    assert (out / "lora.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_killed_writer_leaves_only_a_temp_that_the_cache_removes(tmp_path):
    shard = tmp_path / "ab"
    entry = shard / "ab01.safetensors"
    write_bytes_atomic(entry, b"complete")
    killed = "import os, sys\nfrom hvtune.files import atomic_path\nwith atomic_path(sys.argv[1]) as t:\n"
    killed += "    t.write_bytes(b'half')\n    os._exit(9)\n"
    proc = subprocess.run([sys.executable, "-c", killed, str(shard / "ab02.safetensors")], env={"PYTHONPATH": APP})
    assert proc.returncode == 9
    assert len(list(shard.iterdir())) == 2  # the complete entry and the killed one's temp
    assert list(shard.glob("*.safetensors")) == [entry]  # the temp never looks like an entry
    remove_temp_files(tmp_path)
    assert list(shard.iterdir()) == [entry]
