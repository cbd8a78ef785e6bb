"""Run model-written programs (HumanEval) in a per-item sandbox, and score pass@k.

Every item gets its own PID, mount, network, IPC and UTS namespaces (`unshare --pid --fork
--kill-child ...`). A trusted init (sandbox/init.py, PID 1 there) builds a fresh tmpfs root holding
read-only binds of /usr, a few device nodes, a new /proc and a size-capped writable scratch,
pivot_roots into it and detaches the host's tree, then starts the program with rlimits, a new
session keyring and no capability: as a uid of its own (200000 and up, one per item) when we
are root, or as a user namespace's root stripped of capabilities when we are not. When the
program's main process ends, or the timeout kills PID 1, the kernel kills everything left in
the namespace before unshare returns. A wrapper (sandbox/wrapper.py) runs the program and then reports a
per-item random token on a pipe: an item passes only when its program ran to the end.
Where these guarantees cannot be had, nothing runs: SandboxUnavailable says why.
docs/sandbox.md says what this guarantees, what it does not, and how it is tested.
"""

from __future__ import annotations

import atexit
import itertools
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantpipeError

OPT_IN_ENV = "QUANTPIPE_ALLOW_CODE_EXECUTION"
UID_BASE = 200_000  # item uids (root only): far above system and login users
DEFAULT_TIMEOUT = 10.0  # seconds of wall time per program
DEFAULT_MEM = 1 << 30  # address space per process
SCRATCH_BYTES = 64 << 20  # default size cap of an item's writable scratch (/tmp, HOME, cwd)
SETUP_TIMEOUT = 30.0  # seconds for the sandbox to start; the program's own timeout starts after
OUTPUT_CAP = 64 << 10  # bytes kept of the start of what the sandbox writes to the harness (and 4 KiB of its end)
ROOT_HINT = " (as root the sandbox needs to create namespaces and mount: a container without CAP_SYS_ADMIN cannot)"
USERNS_HINT = (
    " (as a regular user the sandbox needs unprivileged user namespaces: user.max_user_namespaces > 0, "
    "kernel.unprivileged_userns_clone=1 where that exists, no AppArmor/seccomp rule against them; or run as root)"
)
SYSTEM_PYTHON = "/usr/bin/python3"  # what programs run with, when present (HumanEval needs only the standard library)


class CodeExecutionNotAllowed(RuntimeError):
    pass


class SandboxUnavailable(QuantpipeError):
    """The sandbox's guarantees cannot be had here (or it failed on an item), so no program runs."""


@dataclass(frozen=True)
class ProgramResult:
    """Whether a program passed, and why not: "passed", "assertion failed[: msg]", "exception: Type[: msg]",
    "timeout", "killed: memory", "killed: cpu time", "killed: signal NAME", "exit before end", "sandbox error: ..."."""

    passed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.passed


# The programs the sandbox runs (pipeline/sandbox/): PID 1 of an item's namespaces, run by path with
# -I -S (by the system python3, else ours), as root or as the user namespace's root; the wrapper that
# runs the item's program, passed as text (the new root hides this package); the self-check.
_PROGRAMS = Path(__file__).resolve().parent / "sandbox"
_INIT = _PROGRAMS / "init.py"
_WRAPPER = (_PROGRAMS / "wrapper.py").read_text()


def _sandbox_python() -> tuple[str, list[str]]:
    """(interpreter the program runs with, folders to bind read-only for it): the system python3, or ours."""
    if os.path.isfile(SYSTEM_PYTHON):
        return SYSTEM_PYTHON, []
    exe, prefix = os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)
    if exe.startswith("/usr/"):
        return exe, []
    if not exe.startswith(prefix + "/"):
        raise SandboxUnavailable(f"no interpreter for the sandbox: {exe} lies outside /usr and its prefix {prefix}")
    return exe, [prefix]


_mountpoint_lock = threading.Lock()
_mountpoint: str | None = None


def _root_mountpoint() -> str:
    """An empty host folder each item mounts its new root on, in its own mount namespace only."""
    global _mountpoint
    with _mountpoint_lock:
        if _mountpoint is None:
            _mountpoint = tempfile.mkdtemp(prefix="qp-sandbox-root-")
            atexit.register(os.rmdir, _mountpoint)
        return _mountpoint


_uid_block = secrets.randbelow(20_000) * 100_000  # concurrent harnesses rarely share uids (and are isolated anyway)
_uid_counter = itertools.count()


def _item_uid() -> int:
    return UID_BASE + _uid_block + next(_uid_counter) % 100_000


def _mode() -> str:
    return "root" if os.geteuid() == 0 else "user namespace"


def _command(mode: str, uid: int, scratch_bytes: int, mem_bytes: int, timeout: float) -> list[str]:
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        raise SandboxUnavailable("the HumanEval sandbox needs util-linux `unshare`, which is not installed")
    python, binds = _sandbox_python()
    init_python = SYSTEM_PYTHON if python == SYSTEM_PYTHON else sys.executable  # the system's starts faster than a venv's
    args = [
        _root_mountpoint(),
        uid,
        uid,
        int(mode == "root"),
        python,
        int(scratch_bytes),
        int(mem_bytes),
        int(timeout) + 1,
        int(SETUP_TIMEOUT + timeout) + 5,
        _WRAPPER,
        *binds,
    ]
    userns = ["--user", "--map-root-user"] if mode == "user namespace" else []
    return [
        unshare,
        *userns,
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--net",
        "--ipc",
        "--uts",
        init_python,
        "-I",
        "-S",
        str(_INIT),
        *map(str, args),
    ]


def _exchange(proc: subprocess.Popen, data: bytes, token: bytes, timeout: float) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin, read stdout/stderr until both close, keeping the start and the end of each (the
    wrapper's final report comes last, whatever the program wrote before it). The program's timeout
    starts when the wrapper says it started. Returns (stdout, stderr, started, timed_out)."""
    started_line = token + b" started\n"
    deadline = time.monotonic() + SETUP_TIMEOUT
    out, err = (bytearray(), bytearray()), (bytearray(), bytearray())  # (head, tail)
    started, timed_out = False, False
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    view = memoryview(data)
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        view = view[os.write(key.fd, view[:65536]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        view = view[:0]
                    if not view:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                head, tail = key.data
                if len(head) < OUTPUT_CAP:
                    head.extend(chunk)
                else:
                    tail.extend(chunk)
                    del tail[:-4096]
                if not started and started_line in out[0]:
                    started = True
                    deadline = time.monotonic() + timeout
    finally:
        sel.close()
    return bytes(out[0] + b"\n" + out[1]), bytes(err[0] + b"\n" + err[1]), started, timed_out


def _run(source: str, timeout: float, mem_bytes: int, scratch_bytes: int, uid: int | None = None) -> ProgramResult:
    mode = _mode()
    if uid is None:
        uid = _item_uid() if mode == "root" else 0
    token = secrets.token_hex(16)
    proc = subprocess.Popen(
        _command(mode, uid, scratch_bytes, mem_bytes, timeout),
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lingered, out = False, b""
    try:
        out, err, started, timed_out = _exchange(proc, f"{token}\n{source}".encode(errors="replace"), token.encode(), timeout)
        if timed_out and out.startswith(b"init ") and proc.poll() is None:
            # Kill PID 1: the kernel then kills the rest of the namespace, and unshare, which waits for PID 1,
            # exits only once all of it is gone.
            try:
                os.kill(int(out.split(b"\n", 1)[0][5:]), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
        try:  # when both pipes have closed, PID 1 is exiting: unshare exits once the namespace is empty
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            lingered = True
    finally:
        # The fallback: killing unshare kills PID 1 too (--kill-child), though without waiting for the namespace.
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    mark = token.encode() + b" "
    reports = [line[len(mark) :].decode(errors="replace") for line in out.split(b"\n") if line.startswith(mark)]
    final = [r for r in reports if r != "started"]
    if final:
        return ProgramResult(final[0] == "passed", final[0])
    if timed_out:
        return ProgramResult(
            False,
            "timeout"
            if started
            else "sandbox error: did not start within "
            f"{SETUP_TIMEOUT:.0f} s ({err.decode(errors='replace').strip()[-300:] or 'no message'})",
        )
    if lingered and not timed_out:
        return ProgramResult(False, "sandbox error: unshare did not exit after the item ended")
    if not started or rc == 125:
        why = err.decode(errors="replace").strip().splitlines()
        return ProgramResult(False, "sandbox error: " + (why[-1] if why else f"exit status {rc}"))
    if rc == 124:
        return ProgramResult(False, "timeout")
    sig = rc - 128 if rc > 128 else -rc if rc < 0 else 0
    if sig:
        if sig == signal.SIGXCPU:
            return ProgramResult(False, "killed: cpu time")
        try:
            return ProgramResult(False, f"killed: signal {signal.Signals(sig).name}")
        except ValueError:
            return ProgramResult(False, f"killed: signal {sig}")
    return ProgramResult(False, "exit before end")


def _probe(mode: str) -> ProgramResult:
    # host paths that must not exist in there, unless they lead to what is bound in (/usr, the interpreter)
    shown = ["/usr", *_sandbox_python()[1]]
    hidden = [
        p
        for p in (
            "/work",
            "/root",
            "/home",
            "/var",
            "/run",
            "/mnt",
            _root_mountpoint(),
            os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
        )
        if not any(p == b or b.startswith(p + "/") or p.startswith(b + "/") for b in shown)
    ]
    uid = _item_uid() if mode == "root" else 0
    probe = (_PROGRAMS / "probe.py").read_text() + f"\ncheck({uid}, {hidden!r}, {1 << 20})\n"  # checks what sandbox_description() claims
    return _run(probe, 10.0, 1 << 30, 1 << 20, uid)


_state_lock = threading.Lock()
_state: tuple[str, str] | None = None  # ("ok", mode) or ("error", message)


def check_sandbox() -> str:
    """The mode in force ("root" or "user namespace"), once a probe program confirmed the guarantees from inside.
    Raises SandboxUnavailable with the reason when they cannot be had. The answer is cached per process."""
    global _state
    with _state_lock:
        if _state is None:
            mode = _mode()
            try:
                result = _probe(mode)
            except (OSError, SandboxUnavailable) as e:
                result = ProgramResult(False, f"sandbox error: {e}")
            if result.passed:
                _state = ("ok", mode)
            else:
                hint = ROOT_HINT if mode == "root" else USERNS_HINT
                message = f"the HumanEval sandbox is not available ({mode} mode): {result.reason}{hint}"
                _state = ("error", message + "; refusing to run model-written code without it")
        kind, value = _state
    if kind == "error":
        raise SandboxUnavailable(value)
    return value


def sandbox_description() -> str:
    """What is in force, for `quantpipe doctor`; never raises."""
    try:
        mode = check_sandbox()
        python = _sandbox_python()[0]
    except SandboxUnavailable as e:
        return f"UNAVAILABLE: {e}"
    who = f"a uid of its own ({UID_BASE}+)" if mode == "root" else "a user namespace's root (our uid outside)"
    return (
        f"{mode} mode; per item: own PID/mount/network/IPC/UTS namespaces (its processes die with it), "
        f"{who} without capabilities, no_new_privs, new session keyring; read-only tmpfs root with /usr read-only, "
        f"own /proc, no other host files, no network or host sockets; writable /tmp capped at {SCRATCH_BYTES >> 20} MiB; "
        f"limits: {DEFAULT_TIMEOUT:.0f} s, {DEFAULT_MEM >> 30} GiB address space, 64 processes, 64 files, 1 MiB a file; "
        f"passes only by running to its end; interpreter {python}"
    )


def run_program(
    source: str, timeout: float = DEFAULT_TIMEOUT, mem_bytes: int = DEFAULT_MEM, scratch_bytes: int = SCRATCH_BYTES
) -> ProgramResult:
    """Run one program in its own sandbox; passed only when it ran to its end within the limits.

    Never raises for program behaviour; raises CodeExecutionNotAllowed without the opt-in and
    SandboxUnavailable where the sandbox cannot be had."""
    if os.environ.get(OPT_IN_ENV) != "1":
        raise CodeExecutionNotAllowed(f"executing model-written code needs an explicit opt-in (--allow-code-execution, or {OPT_IN_ENV}=1)")
    check_sandbox()
    return _run(source, timeout, mem_bytes, scratch_bytes)


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021), as HF code_eval computes it."""
    import numpy as np

    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int = 1) -> dict[str, float]:
    """Drop-in for HF evaluate's code_eval (same arguments, same pass@k keys), run offline."""
    import numpy as np

    ks = [k] if isinstance(k, int) else list(k)
    totals = {f"pass@{kk}": [] for kk in ks}
    for test, candidates in zip(references, predictions):
        results = [run_program(f"{cand}\n{test}\n") for cand in candidates]
        broken = [r.reason for r in results if r.reason.startswith("sandbox error")]
        if broken:  # an item that never ran must not count as a failure
            raise SandboxUnavailable(f"the HumanEval sandbox failed on an item: {broken[0]}")
        c = sum(r.passed for r in results)
        for kk in ks:
            if len(candidates) >= kk:
                totals[f"pass@{kk}"].append(pass_at_k_estimate(len(candidates), c, kk))
    return {name: float(np.mean(v)) for name, v in totals.items() if v}
