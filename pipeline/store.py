"""The artifact store: one record format, one `cached` helper, atomic commits and the run lock.

Every result a step computes (a stage output, an evaluation round, the KL reference, a row's KL)
is a *record*: a folder holding the step's files and a `manifest.json` with the step's key, what
the step returned (`meta`), and the size and SHA-256 of every file. The folder is written under a
temporary name and renamed into place only once complete, so a killed run never leaves something
that looks finished. A record is reused only when its key matches and its files are unchanged;
anything else (absent, truncated, edited, written by an older quantpipe) is recomputed, with one
line saying why.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import QuantpipeError

log = logging.getLogger("quantpipe")

FORMAT = 2  # record layout; records of another layout are recomputed, never mixed in
MANIFEST = "manifest.json"


def lib_versions(names) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "absent"
    return out


def content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: Path):
    """A JSON file, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_cache_path() -> Path:
    return Path(os.environ.get("QUANTPIPE_HOME", Path.home() / ".cache" / "quantpipe")) / "sha256-cache.json"


def file_sha256s(paths) -> dict[Path, str]:
    """SHA-256 of each file (resolved path -> hex digest), cached by path, size, mtime and inode,
    so a multi-GB file is hashed once, not every run."""
    cache_path = _hash_cache_path()
    cache = read_json(cache_path) or {}
    out, dirty = {}, False
    for p in sorted(Path(p).resolve() for p in paths):
        st = p.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        entry = cache.get(str(p))
        if not entry or entry[0] != stamp:
            entry = cache[str(p)] = [stamp, sha256_file(p)]
            dirty = True
        out[p] = entry[1]
    if dirty:
        try:
            atomic_write_json(cache_path, cache)
        except OSError:  # a read-only home only costs re-hashing next time
            pass
    return out


def fingerprint_files(paths) -> str:
    """Content identity of input files (base weights, evaluation data), for keys (names included)."""
    h = hashlib.sha256()
    for p, digest in file_sha256s(paths).items():
        h.update(f"{p.name}:{digest}\n".encode())
    return h.hexdigest()[:16]


def file_table(folder: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


@dataclass(frozen=True)
class Record:
    """A finished step's result: its folder and what the step returned."""

    path: Path
    key: str
    meta: dict


def verify(folder: Path, key: str) -> tuple[Record | None, str]:
    """(record, "") when the folder is a complete record with this key, else (None, why)."""
    mf = folder / MANIFEST
    if not mf.is_file():
        return None, "incomplete (no manifest)" if folder.exists() else "absent"
    manifest = read_json(mf)
    if not isinstance(manifest, dict):
        return None, "manifest is not valid JSON"
    if manifest.get("store_format") != FORMAT:
        return None, "written by an older quantpipe (another record layout)"
    if manifest.get("key") != key:
        return None, "computed from other inputs (key changed)"
    actual, expected = file_table(folder), manifest.get("files") or {}
    changed = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
    if changed:
        return None, f"files differ from the manifest ({', '.join(changed[:3])})"
    return Record(folder, key, manifest.get("meta") or {}), ""


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path, key: str, meta: dict) -> Record:
    manifest = {
        "store_format": FORMAT,
        "key": key,
        "meta": meta,
        "files": file_table(tmp),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)
    return Record(final, key, json.loads(json.dumps(meta, default=str)))


def cached(folder: Path, key: str, compute: Callable[[Path], dict], what: str) -> tuple[Record, bool]:
    """The stored record at `folder` when its key and files match; otherwise `compute(tmp_dir)`
    writes the step's files into an empty folder and returns its meta, and the record is
    committed atomically. Returns (record, reused)."""
    found, why = verify(folder, key)
    if found is not None:
        log.debug("%s: reused (%s)", what, folder)
        return found, True
    if why != "absent":
        log.warning("%s: the stored record at %s is not usable (%s); recomputing", what, folder, why)
    tmp = _fresh_tmp(folder)
    try:
        meta = compute(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(tmp, folder, key, meta or {}), False


def clean_stale_tmp(root: Path) -> None:
    """Leftovers of killed runs (never mistaken for results: they carry no final name)."""
    if not root.exists():
        return
    for p in root.rglob(".*.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(root: Path, wait: bool = False):
    """One writer per recipe folder. The holder's pid and command line are in the lock file."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            raise QuantpipeError(f"{root} is in use by another run ({holder}); wait for it or pass --wait") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}".encode(), 0)
        yield
    finally:
        os.close(fd)
