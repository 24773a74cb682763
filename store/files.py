"""Files and folders written whole or not at all: write beside the target, flush to disk, rename.

The one home of write-temp-then-rename. A reader (another process, the next start after a crash or a
power cut) sees the old contents or the complete new ones, never a half-written file: the data is
fsync'ed before the rename, and the folder after it, so the rename itself survives a crash too.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it, a new file in it). Not every filesystem allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, and `path` itself, so that a rename publishes complete contents."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the new file to; on success it is flushed and renamed
    onto `path`, on failure removed (and `path` left as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.partial")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path | str, data) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2, default=str))


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place: its files flushed, then one rename (atomic on one filesystem),
    which fails if `final` exists and is not empty. The folder appears whole or not at all."""
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(Path(final).parent)


__all__ = ["atomic_path", "fsync_dir", "fsync_tree", "publish_dir", "write_json_atomic", "write_text_atomic"]
