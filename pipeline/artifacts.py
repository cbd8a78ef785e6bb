"""The artifact store: content keys, manifests, atomic commits and the run lock.

Everything is written under a temporary name and renamed into place only when complete,
so a killed run never leaves something that looks finished. A stage output carries a
manifest (its key, stage chain, parameters, library versions, and the size and SHA-256 of
every file); one whose files no longer match is reported and rebuilt, never evaluated.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import QuantpipeError

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
    """A stored record, or None when it is absent or unreadable (a killed write leaves no record)."""
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def verify(folder: Path, key: str) -> tuple[dict | None, str]:
    """(manifest, "") when the folder is a complete artifact with this key, else (None, why)."""
    mf = folder / MANIFEST
    if not mf.is_file():
        return None, "no manifest" if folder.exists() else "absent"
    try:
        manifest = json.loads(mf.read_text())
    except ValueError:
        return None, "manifest is not valid JSON"
    if manifest.get("key") != key:
        return None, "built from other inputs (key changed)"
    actual, expected = file_table(folder), manifest.get("files") or {}
    changed = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
    if changed:
        return None, f"files differ from the manifest ({', '.join(changed[:3])})"
    return manifest, ""


def commit_dir(tmp: Path, final: Path, manifest: dict) -> None:
    manifest = {**manifest, "files": file_table(tmp), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(tmp / MANIFEST, manifest)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def clean_stale_tmp(root: Path) -> None:
    """Leftovers of killed runs (never mistaken for results: they carry no final name)."""
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
