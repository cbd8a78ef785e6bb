"""Run model-written programs (HumanEval) in a sandboxed child process, and score pass@k.

Each program runs in its own session/process group, in an empty temporary directory, with
limits on CPU time, address space, file size, open files and processes, no inherited
environment, in a fresh network namespace with no interfaces when the platform allows one,
as the unprivileged user `nobody` when we are root (so it cannot signal the harness or write
the machine's files), and with a wall-clock timeout after which the whole process group is
killed. Running anything requires an explicit opt-in.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache

import numpy as np

OPT_IN_ENV = "QUANTPIPE_ALLOW_CODE_EXECUTION"


class CodeExecutionNotAllowed(RuntimeError):
    pass


def _limits(cpu_s: int, mem_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))  # not enforced for root; the group kill covers it


NOBODY = 65534


@lru_cache(maxsize=1)
def _launcher() -> tuple[tuple[str, ...], str, bool]:
    """(command prefix, interpreter, drops privileges).

    As root: `unshare --net --setuid nobody` gives a network namespace with no interfaces and
    an unprivileged user, and the interpreter must be one `nobody` can execute (a system
    python3; HumanEval programs need only the standard library). Otherwise: the same
    interpreter as ours, and `unshare --net --map-root-user` where user namespaces are allowed.
    """
    exe = shutil.which("unshare")
    system_python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    candidates = []
    if os.geteuid() == 0 and exe:
        candidates.append(((exe, "--net", "--setgid", str(NOBODY), "--setuid", str(NOBODY)), system_python, True))
    if exe:
        candidates.append(((exe, "--net", "--map-root-user"), sys.executable, False))
    for prefix, python, drops in candidates:
        try:
            if subprocess.run([*prefix, python, "-c", "pass"], capture_output=True, timeout=10).returncode == 0:
                return prefix, python, drops
        except (OSError, subprocess.TimeoutExpired):
            pass
    return (), sys.executable, False


def sandbox_description() -> str:
    prefix, python, drops = _launcher()
    parts = ["process group + rlimits + temp dir + timeout"]
    if prefix:
        parts.append("no network (new netns)")
    if drops:
        parts.append("user nobody")
    return ", ".join(parts)


def run_program(source: str, timeout: float = 10.0, mem_bytes: int = 1 << 30) -> bool:
    """True when the program exits 0 within the limits. Never raises for program behaviour."""
    if os.environ.get(OPT_IN_ENV) != "1":
        raise CodeExecutionNotAllowed(f"executing model-written code needs an explicit opt-in (--allow-code-execution, or {OPT_IN_ENV}=1)")
    with tempfile.TemporaryDirectory(prefix="qp-sandbox-") as workdir:
        prog = os.path.join(workdir, "program.py")
        with open(prog, "w") as f:
            f.write(source)
        prefix, python, drops = _launcher()
        if drops:
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(prog, NOBODY, NOBODY)
        cmd = [*prefix, python, "-I", "-B", prog]
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: _limits(int(timeout) + 1, mem_bytes),
            )
        except OSError:
            return False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:  # kill the whole group: children it forked must not outlive the item
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        return rc == 0


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021), as HF code_eval computes it."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int = 1) -> dict[str, float]:
    """Drop-in for HF evaluate's code_eval (same arguments, same pass@k keys), run offline."""
    ks = [k] if isinstance(k, int) else list(k)
    totals = {f"pass@{kk}": [] for kk in ks}
    for test, candidates in zip(references, predictions):
        c = sum(run_program(f"{cand}\n{test}\n") for cand in candidates)
        for kk in ks:
            if len(candidates) >= kk:
                totals[f"pass@{kk}"].append(pass_at_k_estimate(len(candidates), c, kk))
    return {name: float(np.mean(v)) for name, v in totals.items() if v}
