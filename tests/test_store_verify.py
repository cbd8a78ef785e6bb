"""Record verification at scale: a file is read when its record is written and again only when its
stat (size, mtime, ctime, inode) changes, and an edited byte is still caught."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from pipeline import filehash
from pipeline.filehash import HashCache
from pipeline.store import cached, verify

TICK = 0.05  # longer than a kernel timestamp tick: a write after it gets a new ctime


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def record(folder: Path, payload: bytes) -> Path:
    def compute(tmp: Path) -> dict:
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "small.txt").write_text("x")
        return {"n": 1}

    rec, reused = cached(folder, "k1", compute, "test")
    assert not reused
    return rec.path


def edit_byte_keep_mtime(path: Path, offset: int) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def trusted_entry(path: Path) -> dict:
    e = HashCache().entry(path)
    assert e is not None and e["stat"] == filehash.Stamp.of(os.stat(path)).as_list()
    return e


def test_an_unchanged_file_is_not_read_again(home, tmp_path, monkeypatch):
    monkeypatch.setattr(filehash, "RACY_NS", 0)  # trust a digest however recent the file (the next tests keep the margin)
    rec = record(tmp_path / "rec", os.urandom(1 << 16))
    weights = rec / "weights.bin"
    first = trusted_entry(weights)  # hashed when written; the entry follows the file into its final folder
    assert verify(rec, "k1")[0] is not None
    assert trusted_entry(weights) == {**first, "path": str(weights)}  # same digest, same read time: not read again
    # the digest is taken from the cache, not the bytes: a poisoned entry for an unchanged stat is believed
    entries = json.loads(filehash.cache_path().read_text())
    next(e for e in entries.values() if e["path"] == str(weights))["sha256"] = "0" * 64
    filehash.cache_path().write_text(json.dumps(entries))
    found, why = verify(rec, "k1")
    assert found is None and "weights.bin" in why


def test_a_changed_byte_is_caught_when_mtime_is_put_back(home, tmp_path, monkeypatch):
    monkeypatch.setattr(filehash, "RACY_NS", 0)  # the cached digest is trusted: only the stat can tell
    rec = record(tmp_path / "rec", os.urandom(1 << 16))
    weights = rec / "weights.bin"
    assert verify(rec, "k1")[0] is not None
    trusted_entry(weights)
    time.sleep(TICK)
    edit_byte_keep_mtime(weights, 1000)  # same size, same mtime, same inode: ctime moved
    found, why = verify(rec, "k1")
    assert found is None and why == "files differ from the manifest (weights.bin)"


def test_a_byte_changed_just_after_writing_is_caught(home, tmp_path):
    # within one timestamp tick of the write even ctime may not move: such digests are not trusted
    rec = record(tmp_path / "rec", os.urandom(1 << 16))
    edit_byte_keep_mtime(rec / "weights.bin", 7)
    found, why = verify(rec, "k1")
    assert found is None and "weights.bin" in why


def test_a_file_replaced_by_one_of_the_same_size_and_mtime_is_caught(home, tmp_path, monkeypatch):
    monkeypatch.setattr(filehash, "RACY_NS", 0)
    rec = record(tmp_path / "rec", b"a" * 4096)
    weights = rec / "weights.bin"
    assert verify(rec, "k1")[0] is not None
    other = tmp_path / "other.bin"
    other.write_bytes(b"b" * 4096)
    st = os.stat(weights)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.move(other, weights)  # a new inode under the old name
    found, why = verify(rec, "k1")
    assert found is None and "weights.bin" in why


def test_a_corrupt_cache_file_costs_a_read_not_a_wrong_answer(home, tmp_path):
    rec = record(tmp_path / "rec", os.urandom(4096))
    filehash.cache_path().write_text("{not json")
    assert verify(rec, "k1")[0] is not None
    filehash.cache_path().write_text('{"1:2": 5, "x": {"stat": 1}}')
    assert verify(rec, "k1")[0] is not None
    edit_byte_keep_mtime(rec / "weights.bin", 0)
    assert verify(rec, "k1")[0] is None
