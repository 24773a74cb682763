"""Files written whole or not at all (store.files): the one home of write-temp-then-rename."""

from __future__ import annotations

import json
import os

import pytest

from store.files import atomic_path, publish_dir, write_json_atomic, write_text_atomic


def test_a_file_is_replaced_whole_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "sub" / "outcome.json"
    write_json_atomic(target, {"status": "succeeded", "n": 1})
    assert json.loads(target.read_text()) == {"status": "succeeded", "n": 1}
    write_text_atomic(target, "second")
    assert target.read_text() == "second" and os.listdir(target.parent) == ["outcome.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["data.jsonl"]


def test_writes_are_flushed_before_the_rename(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(len(synced)), real_replace(a, b))[1])
    write_text_atomic(tmp_path / "f.txt", "x")
    assert renamed and renamed[0] >= 1 and len(synced) >= 2  # the file before the rename, the folder after


def test_a_folder_is_published_in_one_rename_and_never_over_a_full_one(tmp_path):
    staged = tmp_path / ".tmp-v1"
    (staged / "deep").mkdir(parents=True)
    (staged / "deep" / "weights.bin").write_bytes(b"w")
    publish_dir(staged, tmp_path / "v1")
    assert (tmp_path / "v1" / "deep" / "weights.bin").read_bytes() == b"w" and not staged.exists()
    other = tmp_path / ".tmp-v1b"
    (other / "x").mkdir(parents=True)
    with pytest.raises(OSError):
        publish_dir(other, tmp_path / "v1")
    assert (tmp_path / "v1" / "deep" / "weights.bin").exists()
