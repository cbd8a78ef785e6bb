"""SHA-256 of files, re-read only when their stat says they may have changed.

A file's digest is cached under its (device, inode) with the stat it was read at: size, mtime_ns,
ctime_ns. A write changes ctime, and ctime cannot be set from user space, so an edit that keeps
the size and puts mtime back (`touch -d`) is still seen; only a change below the filesystem (bit
rot, writes to the raw device, a clock set back) is not. Timestamps are coarse (a kernel tick,
up to 2 s on some filesystems): a file modified within RACY_NS before its digest was read could
be modified again without its stamp changing, so such a digest is not trusted later (git calls
these entries "racily clean"). A large file that was just written is hashed once that window has
passed, so the digest taken when a record is committed is the one later loads trust.

One JSON file under QUANTPIPE_HOME holds the cache; concurrent writers merge on save, and a lost
entry only costs one more read.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

RACY_NS = 2 * 10**9  # longest timestamp granularity in use (FAT: 2 s; ext4, xfs, btrfs, tmpfs: a kernel tick)
WAIT_FOR_BYTES = 256 << 20  # a just-written file at least this large: wait out RACY_NS rather than read it twice
STALE_NS = 3600 * 10**9  # an entry whose path is gone is dropped after this (a record's temporary folder is renamed sooner)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_path() -> Path:
    return Path(os.environ.get("QUANTPIPE_HOME", Path.home() / ".cache" / "quantpipe")) / "stat-sha256-cache.json"


@dataclass(frozen=True)
class Stamp:
    """What a write to a file changes."""

    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def as_list(self) -> list[int]:
        return [self.size, self.mtime_ns, self.ctime_ns]


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class HashCache:
    """`cache.sha256(path)` then `cache.save()`. `read` lists the files whose bytes were read."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        self.entries = _read(self.path)
        self.read: list[Path] = []
        self._changed: set[str] = set()

    def entry(self, path: Path) -> dict | None:
        return self.entries.get(_key(os.stat(path)))

    def sha256(self, path: Path) -> str:
        st = os.stat(path)
        key, stamp = _key(st), Stamp.of(st)
        e = self.entries.get(key)
        if _trusted(e, stamp):
            if e.get("path") != str(path):  # the same file under a new name (a committed record's folder)
                e["path"] = str(path)
                self._changed.add(key)
            return e["sha256"]
        wait_ns = max(stamp.mtime_ns, stamp.ctime_ns) + RACY_NS - time.time_ns()
        if stamp.size >= WAIT_FOR_BYTES and 0 < wait_ns <= RACY_NS:
            time.sleep(wait_ns / 1e9)
        start = time.time_ns()
        digest = sha256_file(path)
        self.read.append(Path(path))
        after = os.stat(path)
        if _key(after) == key and Stamp.of(after) == stamp:  # not written to while it was read
            self.entries[key] = {"path": str(path), "stat": stamp.as_list(), "sha256": digest, "hashed_ns": start}
            self._changed.add(key)
        return digest

    def save(self) -> None:
        if not self._changed:
            return
        merged = _read(self.path)  # another process may have saved since this one loaded
        merged.update({k: self.entries[k] for k in self._changed})
        now = time.time_ns()
        merged = {k: e for k, e in merged.items() if not _stale(k, e, now)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(merged, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError:  # a read-only home only costs reading files again next time
            return
        self.entries, self._changed = merged, set()


def _trusted(entry, stamp: Stamp) -> bool:
    """Read at this stamp, and long enough after the file's last write that a later one changes it."""
    if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("hashed_ns"), int)):
        return False
    return entry.get("stat") == stamp.as_list() and max(stamp.mtime_ns, stamp.ctime_ns) <= entry["hashed_ns"] - RACY_NS


def _stale(key: str, entry: dict, now: int) -> bool:
    """An old entry whose path no longer holds that file (deleted records, replaced files)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("hashed_ns"), int):
        return True
    if now - entry["hashed_ns"] < STALE_NS:
        return False
    try:
        return _key(os.stat(entry.get("path", ""))) != key
    except OSError:
        return True
