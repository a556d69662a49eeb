"""Atomic outputs: write a file or directory under a temporary name beside its target, then rename it into place,
so an interrupted save never leaves a complete-looking output and an existing one is replaced only by a finished
new one. Adapters, trainer checkpoints, merged exports and GGUF files and conversions are all written this way.

    out/.adapter.k3j9x_2a.tmp/          a fresh directory per save (tempfile.mkdtemp: a unique name)
        adapter/                        what write() makes; renamed to out/adapter when it returns
        old-adapter/                    with overwrite: the previous out/adapter, moved aside, then deleted

The path handed to write() lies one level down, inside the unique directory, and carries the target's own name:
two saves of the same output (two runs, or a checkpoint saved while an old run's temp dir is still there) never
share a temp path, a crashed run's leftover is just another sibling that nothing reads, and what write() creates
gets the usual mode (mkdtemp's 0700 stays on the wrapper, which is never renamed).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a path that does not exist yet, beside `out`, for the body to create (file or directory). If the body
    finishes, that path is renamed to `out`; if it raises, everything it wrote is removed and `out` is untouched.
    Without `overwrite`, `out` must not exist when the rename comes (an empty directory may be replaced); callers
    check it up front too, so a clash is reported before the work."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield wrapper / out.name
        _commit(wrapper / out.name, out, overwrite, wrapper / f"old-{out.name}")
    finally:
        shutil.rmtree(wrapper, ignore_errors=True)  # after success only the replaced output, if any, is left in it


def _commit(new: Path, out: Path, overwrite: bool, aside: Path):
    if overwrite and os.path.lexists(out) and (new.is_dir() or out.is_dir()):
        # rename() cannot replace a full directory: move the old one aside first, and back if the rename fails
        os.rename(out, aside)
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(aside, out)
            raise
    elif not overwrite and _occupied(out):  # it appeared while we were writing
        raise FileExistsError(f"{out} exists (it appeared during the save); pass --overwrite to replace it")
    else:
        os.replace(new, out)  # atomic; replaces a file, or an empty directory with a directory


def _occupied(p: Path) -> bool:
    if not os.path.lexists(p):
        return False
    return not (p.is_dir() and not p.is_symlink() and not any(p.iterdir()))


def save_atomic(write: Callable[[Path], object], out_dir: str | Path, overwrite: bool = False) -> Path:
    """Run write(tmp), which creates `tmp` (a directory, or a file), then rename it to `out_dir`: an interrupted save
    never leaves a complete-looking output. An existing `out_dir` is an error unless `overwrite`, and then it is
    replaced only once the new one is complete. Returns `out_dir` as a Path."""
    out = Path(out_dir)
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    with atomic_path(out, overwrite) as tmp:
        write(tmp)
    return out
