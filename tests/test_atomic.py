"""Atomic outputs (minilora/atomic.py: save_atomic, atomic_path), on small files in tmp_path.

The oracle is the file system itself: after each save, the parent directory must hold exactly the expected entries
(no temp leftovers) and the target exactly the bytes of one complete write, the old ones or the new ones. A crashed
run is a real child process killed (os._exit) in the middle of its write, so its cleanup never runs.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minilora.atomic import atomic_path, save_atomic


def contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def writer(**files: bytes):
    def write(tmp: Path):
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return write


def crash_while_saving(out: Path) -> list[Path]:
    """Run a child process that dies (no cleanup) half-way through save_atomic(out); return what it left."""
    before = set(out.parent.iterdir())
    code = textwrap.dedent(f"""
        import os
        from minilora.atomic import save_atomic
        def write(tmp):
            tmp.mkdir()
            (tmp / "a.bin").write_bytes(b"partial")
            os._exit(3)  # killed mid-write: no except/finally runs
        save_atomic(write, {str(out)!r}, overwrite=True)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    return sorted(set(out.parent.iterdir()) - before)


def test_writes_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "out"
    assert save_atomic(writer(a=b"1"), str(out)) == out
    assert contents(out) == {"a": b"1"} and os.listdir(tmp_path) == ["out"]
    called = []
    with pytest.raises(FileExistsError, match=f"{out}.*--overwrite"):
        save_atomic(lambda tmp: called.append(tmp), out)
    assert called == [] and contents(out) == {"a": b"1"}  # refused before any work
    save_atomic(writer(b=b"2"), out, overwrite=True)
    assert contents(out) == {"b": b"2"} and os.listdir(tmp_path) == ["out"]  # the old one is gone, not set aside


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_write_leaves_no_temp_and_keeps_the_target(tmp_path, overwrite):
    out = tmp_path / "out"
    if overwrite:
        save_atomic(writer(a=b"old"), out)

    def fail(tmp: Path):
        writer(a=b"new", b=b"new")(tmp)
        raise KeyboardInterrupt  # BaseException too: Ctrl-C must not leave a temp dir behind

    with pytest.raises(KeyboardInterrupt):
        save_atomic(fail, out, overwrite=overwrite)
    assert os.listdir(tmp_path) == (["out"] if overwrite else [])
    if overwrite:
        assert contents(out) == {"a": b"old"}
    # a write that creates nothing fails at the rename, and an existing target is put back
    with pytest.raises(FileNotFoundError):
        save_atomic(lambda tmp: None, out, overwrite=True)
    assert os.listdir(tmp_path) == (["out"] if overwrite else [])
    if overwrite:
        assert contents(out) == {"a": b"old"}


def test_leftover_of_a_crashed_run_does_not_break_a_save(tmp_path):
    out = tmp_path / "out"
    leftovers = crash_while_saving(out)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.") and not out.exists()
    (tmp_path / ".out.tmp").mkdir()  # the fixed name that older versions used, full of a dead run's files
    (tmp_path / ".out.tmp" / "a.bin").write_bytes(b"stale")
    save_atomic(writer(**{"a.bin": b"complete"}), out)  # without overwrite: a leftover is not the target
    assert contents(out) == {"a.bin": b"complete"}
    # a second crash while a complete output exists: the output is untouched, and the next save still works
    leftovers += crash_while_saving(out)
    assert len(set(leftovers)) == 2 and contents(out) == {"a.bin": b"complete"}
    save_atomic(writer(**{"a.bin": b"again"}), out, overwrite=True)
    assert contents(out) == {"a.bin": b"again"}
    # nothing cleans up another process's temp dir (it may be a live run, not a dead one)
    assert sorted(os.listdir(tmp_path)) == sorted([".out.tmp", "out", *(p.name for p in leftovers)])


def test_two_saves_in_flight_use_two_temp_paths(tmp_path):
    """A second save of the same output starts while the first is still writing (two runs, or a checkpoint saved
    twice): each has its own temp path, and the first to finish does not destroy the other's files."""
    out, seen = tmp_path / "out", []

    def outer(tmp: Path):
        seen.append(tmp)
        writer(who=b"outer")(tmp)
        save_atomic(inner, out, overwrite=True)
        assert contents(tmp) == {"who": b"outer"}  # the inner save did not touch our files

    def inner(tmp: Path):
        seen.append(tmp)
        writer(who=b"inner")(tmp)

    save_atomic(outer, out, overwrite=True)
    assert seen[0] != seen[1] and seen[0].parent != seen[1].parent
    assert all(p.parent.parent == tmp_path and p.name == "out" for p in seen)  # beside the target, its own name
    assert contents(out) == {"who": b"outer"} and os.listdir(tmp_path) == ["out"]  # the last to finish wins


def test_target_appearing_during_the_save(tmp_path):
    """Without overwrite, an output that another writer finished meanwhile is kept, and we fail naming it."""
    out = tmp_path / "out"

    def racer(tmp: Path):
        writer(who=b"late")(tmp)
        save_atomic(writer(who=b"first"), out)

    with pytest.raises(FileExistsError, match=f"{out}"):
        save_atomic(racer, out)
    assert contents(out) == {"who": b"first"} and os.listdir(tmp_path) == ["out"]
    # an empty directory is not an output: atomic_path replaces it (the GGUF conversion relies on this)
    out2 = tmp_path / "empty"
    out2.mkdir()
    with atomic_path(out2) as tmp:
        writer(x=b"1")(tmp)
    assert contents(out2) == {"x": b"1"}


def test_files_and_modes(tmp_path):
    """atomic_path works for a single file too (overwrite replaces it in one rename), and what the body creates gets
    the same mode as a file or directory made directly (mkdtemp's 0700 stays on the wrapper)."""
    ref_dir, ref_file = tmp_path / "ref_dir", tmp_path / "ref.txt"
    ref_dir.mkdir()
    ref_file.write_text("x")
    out = tmp_path / "f.txt"
    for text, overwrite in [("one", False), ("two", True)]:
        with atomic_path(out, overwrite) as tmp:
            assert not tmp.exists()
            tmp.write_text(text)
    assert out.read_text() == "two"
    with pytest.raises(FileExistsError, match="f.txt"):
        with atomic_path(out) as tmp:
            tmp.write_text("three")
    assert out.read_text() == "two"
    save_atomic(writer(a=b"1"), tmp_path / "d")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert (mode(out), mode(tmp_path / "d")) == (mode(ref_file), mode(ref_dir))
    assert sorted(os.listdir(tmp_path)) == ["d", "f.txt", "ref.txt", "ref_dir"]
