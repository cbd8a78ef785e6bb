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
import math
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
from .filehash import HashCache, sha256_file  # noqa: F401 - sha256_file: imported from here by others

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


def jsonable(obj):
    """`obj` with every non-finite float as null: strict JSON (NaN and Infinity are not JSON, and strict
    parsers reject them). Readers take null as "not a number" (e.g. a standard error of one item)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Every JSON text quantpipe writes: strict (no NaN/Infinity), unknown types as strings."""
    return json.dumps(jsonable(json.loads(json.dumps(obj, default=str))), allow_nan=False, **kwargs)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, dumps(obj, indent=1, sort_keys=True) + "\n")


def file_sha256s(paths) -> dict[Path, str]:
    """SHA-256 of each file (resolved path -> hex digest), from the stat cache (filehash.py), so a
    multi-GB file is hashed once, not every run."""
    cache = HashCache()
    out = {p: cache.sha256(p) for p in sorted(Path(p).resolve() for p in paths)}
    cache.save()
    return out


def fingerprint_files(paths) -> str:
    """Content identity of input files (base weights, evaluation data), for keys (names included)."""
    h = hashlib.sha256()
    for p, digest in file_sha256s(paths).items():
        h.update(f"{p.name}:{digest}\n".encode())
    return h.hexdigest()[:16]


def nested_records(folder: Path) -> list[Path]:
    """Records stored inside `folder` (by an older layout): never part of its files, never deleted with it."""
    return sorted(m.parent for m in folder.rglob(MANIFEST) if m.parent != folder)


def _own_files(folder: Path) -> list[Path]:
    nested = nested_records(folder)
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST and not any(n in p.parents for n in nested)]


def file_table(folder: Path) -> dict[str, dict]:
    """Size and SHA-256 of a record's own files (not those of a record nested inside it). Digests come
    from the stat cache (filehash.py): a file is read when the record is written and again only once
    its size, mtime, ctime or inode changes."""
    cache = HashCache()
    table = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": cache.sha256(p)} for p in _own_files(folder)}
    cache.save()
    return table


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
    if folder.is_symlink():
        return None, "a symbolic link, not a stored record"
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
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        final.unlink()  # a damaged record: the link goes, never what it points to
    elif final.exists():
        for inner in nested_records(final):  # another record inside the old one moves into the new one
            (tmp / inner.relative_to(final)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(inner, tmp / inner.relative_to(final))
        shutil.rmtree(final)
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
