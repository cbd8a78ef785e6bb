"""The HumanEval sandbox: correct programs pass; the hostile programs in tests/hostile/ are contained, with evidence.

Each hostile program attempts an attack and asserts from inside that it failed, so its reason is "passed" only
when the program ran to its end with every attempt refused; the tests add what the host can see (files, processes).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import cli_in_process, write_recipe

from pipeline import code_exec
from pipeline.code_exec import (
    OPT_IN_ENV,
    UID_BASE,
    CodeExecutionNotAllowed,
    ProgramResult,
    check_sandbox,
    pass_at_k,
    pass_at_k_estimate,
    run_program,
    sandbox_description,
)

HOSTILE = Path(__file__).parent / "hostile"
ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
can_switch_user = os.geteuid() == 0 and shutil.which("setpriv") and os.path.isfile(SYSTEM_PYTHON)


@pytest.fixture(autouse=True)
def opt_in(monkeypatch):
    monkeypatch.setenv(OPT_IN_ENV, "1")


def hostile(name: str, **params) -> str:
    """A hostile program from tests/hostile/, with the names it expects defined first."""
    return "".join(f"{k} = {v!r}\n" for k, v in params.items()) + (HOSTILE / f"{name}.py").read_text()


def item_processes(tag: str = "") -> list[str]:
    """Processes still alive of any item this process ran: an item uid (root), its init (whose command line names
    our mount point), or `tag` in the command line. Items of other test runs do not count."""
    first_uid = UID_BASE + code_exec._uid_block
    mark = code_exec._root_mountpoint().encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            uid = int(next(x for x in (proc / "status").read_text().splitlines() if x.startswith("Uid:")).split()[1])
        except (OSError, StopIteration):
            continue
        if mark in cmd or (tag and tag.encode() in cmd) or first_uid <= uid < first_uid + 100_000:
            found.append(f"{proc.name} uid={uid} {cmd[:80]!r}")
    return found


def test_requires_opt_in(monkeypatch):
    monkeypatch.delenv(OPT_IN_ENV)
    with pytest.raises(CodeExecutionNotAllowed, match="opt-in"):
        run_program("print(1)")


def test_correct_and_wrong_programs():
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('output is discarded')\n")
    assert ok == ProgramResult(True, "passed") and ok
    wrong = run_program("def add(a, b):\n    return a * b\nassert add(2, 3) == 5\n")
    assert wrong == ProgramResult(False, "assertion failed") and not wrong
    assert run_program("assert 1 == 2, 'one is not two'\n").reason == "assertion failed: one is not two"
    assert run_program("def f(:\n").reason.startswith("exception: SyntaxError: ")
    assert run_program("undefined_name\n").reason == "exception: NameError: name 'undefined_name' is not defined"
    assert run_program("import ctypes\nctypes.string_at(0)\n").reason == "killed: signal SIGSEGV"
    # junk written to every descriptor, the wrapper's report pipe included, does not hide the outcome
    junk = "import os\nfor fd in range(10):\n    try:\n        os.write(fd, b'junk' * 100000)\n    except OSError:\n        pass\n"
    assert run_program(junk).passed and run_program(junk + "assert 0\n").reason == "assertion failed"
    # run as a script, like `python program.py`
    script = "import sys\ndef add(): pass\nassert __name__ == '__main__' and sys.modules['__main__'].add is add\n"
    assert run_program(script).passed


def test_pass_at_k_matches_code_eval_contract():
    tests = ["assert f(1) == 2", "assert f(1) == 2"]
    preds = [["def f(x): return x + 1", "def f(x): return x"], ["def f(x): return 0", "def f(x): return 0"]]
    assert pass_at_k(tests, preds, k=[1, 2]) == {"pass@1": 0.25, "pass@2": 0.5}
    assert pass_at_k_estimate(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k_estimate(5, 0, 1) == 0.0 and pass_at_k_estimate(5, 5, 3) == 1.0


def test_infinite_loop_is_killed_at_the_timeout():
    assert run_program("while True:\n    pass\n", timeout=2).reason == "timeout"
    assert not item_processes()


def test_unbounded_allocation_fails():
    result = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", timeout=10, mem_bytes=256 << 20)
    assert result.reason == "killed: memory"


def test_fork_bomb_is_contained():
    prog = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert run_program(prog, timeout=3).reason == "timeout"
    assert not item_processes()


# Attack 1: a double-forked setsid grandchild outlived its item and wrote a file 20 s later.
def test_nothing_outlives_its_item(tmp_path):
    marker, tag = tmp_path / "escaped", f"qp-grandchild-{secrets.token_hex(4)}"
    result = run_program(hostile("setsid_grandchild", MARKER=str(marker), DELAY=2, TAG=tag), timeout=10)
    assert result.reason == "passed"  # the grandchild was running when the program ended...
    assert not item_processes(tag)  # ...and died with the item
    time.sleep(3)
    assert not marker.exists() and not item_processes(tag)


# Attack 2: a lingering grandchild, same user, rewrote the next items' programs and could kill(-1, 9) them.
def test_items_cannot_reach_each_other():
    fail = "import time\ntime.sleep(0.2)\nassert False, 'b must fail'\n"
    with ThreadPoolExecutor(2) as pool:
        attacker = pool.submit(run_program, hostile("rewrite_other_items", DURATION=2.0), 15)
        time.sleep(0.5)
        during = [run_program(fail) for _ in range(4)]  # while the attacker and its grandchild run
        attacker = attacker.result()
    after = [run_program(fail) for _ in range(2)]  # next items
    assert attacker.reason == "passed"  # found no other program and no process to kill
    assert [r.reason for r in during + after] == ["assertion failed: b must fail"] * 6
    assert not item_processes()


@pytest.mark.skipif(not can_switch_user, reason="needs root and setpriv to start a victim as nobody")
def test_kill_minus_one_reaches_nothing():
    victims = [
        subprocess.Popen(["sleep", "60"]),
        subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sleep", "60"]),
    ]
    try:
        result = run_program(hostile("kill_everyone", HARNESS_PID=os.getpid(), VICTIM_PIDS=[v.pid for v in victims]))
        assert result.reason == "passed"
        assert [v.poll() for v in victims] == [None, None]
    finally:
        for v in victims:
            v.kill()
            v.wait()


# Attack 4: leaving with status 0 before the tests ran scored as a pass.
@pytest.mark.parametrize("name", ["sys_exit", "os_exit", "raise_systemexit"])
def test_exit_before_the_end_fails(name):
    source = hostile(name)
    assert run_program(source).reason == "exit before end"
    without_exit = "\n".join(x for x in source.splitlines() if "exit" not in x.lower() or x.startswith("#"))
    assert run_program(without_exit).reason == "assertion failed"  # what the tests it skipped would say


def test_only_the_main_process_reaching_the_end_counts():
    assert run_program(hostile("forked_child_passes")).reason == "assertion failed"


# Attack 5: reading the project, the data and artifacts; writing /tmp without a cap; Unix sockets by path.
def test_host_files_are_not_there(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    paths = [
        ROOT / "pyproject.toml",
        ROOT / "pipeline",
        ROOT / "artifacts",
        ROOT.parent / "shared" / "data",
        Path("/work/main"),
        Path("/work/shared/data"),
        Path.home(),
        Path("/root"),
        Path("/home"),
        secret,
        tmp_path,
        Path("/etc/shadow"),
        Path("/etc/hostname"),
        Path("/var"),
        Path("/run"),
        Path(sys.prefix),
    ]
    assert (ROOT / "pyproject.toml").is_file() and secret.is_file()  # there on the host
    assert run_program(hostile("read_host", PATHS=[str(p) for p in paths])).reason == "passed"


def test_scratch_is_capped():
    cap = 8 << 20
    before = set(os.listdir(tempfile.gettempdir()))
    assert run_program(hostile("fill_scratch", CAP=cap), scratch_bytes=cap).reason == "passed"
    assert not {x for x in set(os.listdir(tempfile.gettempdir())) - before if x.startswith("fill")}


def test_no_sockets_or_network():
    folder = tempfile.mkdtemp(prefix="qp-sockets-")
    os.chmod(folder, 0o755)  # a socket anyone may connect to, were it visible
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(f"{folder}/harness.sock")
    os.chmod(f"{folder}/harness.sock", 0o777)
    abstract_name = f"qp-test-{secrets.token_hex(4)}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + abstract_name)
    tcp = socket.create_server(("127.0.0.1", 0))
    listeners = [unix, abstract, tcp]
    host_sockets = [str(p) for p in Path("/run").glob("**/*") if p.is_socket()][:20]
    try:
        for s in listeners:
            s.listen()
            s.setblocking(False)
        result = run_program(
            hostile(
                "unix_socket", SOCKETS=[f"{folder}/harness.sock", *host_sockets], ABSTRACT=[abstract_name], PORTS=[tcp.getsockname()[1]]
            )
        )
        assert result.reason == "passed"
        for s in listeners:  # nothing connected
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in listeners:
            s.close()
        shutil.rmtree(folder)


KEYRING_HARNESS = """
import ctypes, json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from pipeline.code_exec import run_program
libc = ctypes.CDLL(None, use_errno=True)
assert libc.syscall(250, 1, b"qp-test-session") > 0  # KEYCTL_JOIN_SESSION_KEYRING, a named one as a login would
assert libc.syscall(248, b"user", sys.argv[2].encode(), b"s3cret", 6, -3) > 0  # add_key to it
source = sys.stdin.read()
unsandboxed = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True)
print(json.dumps({"unsandboxed": unsandboxed.stderr.strip().splitlines()[-1:], "sandboxed": run_program(source).reason}))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the hostile program uses x86_64 syscall numbers")
def test_harness_keyring_is_out_of_reach():
    name = f"qp-secret-{secrets.token_hex(4)}"
    out = subprocess.run(
        [sys.executable, "-c", KEYRING_HARNESS, str(ROOT), name],
        capture_output=True,
        text=True,
        input=hostile("read_keyring", DESCRIPTION=name),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["unsandboxed"] == [f"AssertionError: read the harness's key {got['unsandboxed'][0].split()[-2]} b's3cret'"]
    assert got["sandboxed"] == "passed"


def test_check_and_description():
    mode = check_sandbox()
    assert mode == ("root" if os.geteuid() == 0 else "user namespace")
    text = sandbox_description()
    assert text.startswith(f"{mode} mode; per item: own PID/mount/network/IPC/UTS namespaces")
    assert "without capabilities" in text and "capped at 64 MiB" in text and "running to its end" in text


def test_interpreter_outside_usr_is_bound_read_only(monkeypatch):
    # Without a system python3 the program runs on ours; only its prefix is bound in, read-only.
    monkeypatch.setattr(code_exec, "SYSTEM_PYTHON", "/nonexistent/python3")
    prefix = os.path.realpath(sys.base_prefix)
    if prefix.startswith("/usr/"):
        pytest.skip("our interpreter is under /usr: nothing extra to bind")
    prog = (
        f"import os, sys\nassert sys.base_prefix == {prefix!r}, sys.base_prefix\n"
        f"assert not os.access({prefix!r}, os.W_OK)\n"
        f"assert sorted(os.listdir({os.path.dirname(prefix)!r})) == [{os.path.basename(prefix)!r}]\n"
    )
    assert run_program(prog).reason == "passed"


def test_each_item_runs_in_a_fresh_sandbox():
    """Items one after another, as an evaluation runs them: each finds an empty /tmp (the file the previous item
    left is gone) and is the child of its own PID namespace's init, and nothing of them is left running. (What
    an item costs is measured in docs/sandbox.md, not asserted: CONTRIBUTING rules out timed assertions.)"""
    prog = "import os\nassert os.listdir('/tmp') == [], os.listdir('/tmp')\nopen('/tmp/left-behind', 'w').write('x')\n"
    prog += "assert os.getppid() == 1, os.getppid()\n"
    assert [run_program(prog).reason for _ in range(5)] == ["passed"] * 5
    assert not item_processes()


# The non-root path: the harness itself runs as nobody, so the sandbox is built in a user namespace.
NONROOT_HARNESS = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from pipeline import code_exec
try:
    mode = code_exec.check_sandbox()
except code_exec.SandboxUnavailable as e:
    print(json.dumps({"unavailable": str(e), "description": code_exec.sandbox_description()}))
    try:
        code_exec.run_program("pass")
    except code_exec.SandboxUnavailable as e2:
        print(json.dumps({"run_program": str(e2)}))
    raise SystemExit(0)
items = json.loads(sys.stdin.read())
out = {"mode": mode, "uid": os.getuid()}
for name, source, kw in items:
    out[name] = code_exec.run_program(f"HARNESS_PID = {os.getpid()}\\n" + source, **kw).reason
print(json.dumps(out))
"""


def run_as_nobody(args: list[str], stdin: str = "", prefix: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [*prefix, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SYSTEM_PYTHON, "-I", *args]
    return subprocess.run(
        cmd, check=False, input=stdin, capture_output=True, text=True, timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin", OPT_IN_ENV: "1"}
    )


@pytest.mark.skipif(not can_switch_user, reason="needs root, setpriv and /usr/bin/python3 to run a harness as nobody")
def test_non_root_harness_is_contained_too():
    folder = tempfile.mkdtemp(prefix="qp-harness-home-")
    os.chown(folder, NOBODY, NOBODY)
    victim = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sleep", "60"])
    tag = f"qp-grandchild-{secrets.token_hex(4)}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(f"{folder}/harness.sock")
    os.chown(f"{folder}/harness.sock", NOBODY, NOBODY)
    abstract_name = f"qp-test-{secrets.token_hex(4)}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + abstract_name)
    tcp = socket.create_server(("127.0.0.1", 0))
    for s in (unix, abstract, tcp):
        s.listen()
        s.setblocking(False)
    items = [
        ["harness_attack", hostile("harness_attack", HARNESS_DIR=folder), {}],
        ["kill_everyone", hostile("kill_everyone", VICTIM_PIDS=[victim.pid]), {}],
        ["setsid_grandchild", hostile("setsid_grandchild", MARKER=f"{folder}/escaped", DELAY=1, TAG=tag), {}],
        ["read_host", hostile("read_host", PATHS=[folder, str(ROOT), "/work", "/root", "/home"]), {}],
        ["fill_scratch", hostile("fill_scratch", CAP=4 << 20), {"scratch_bytes": 4 << 20}],
        [
            "unix_socket",
            hostile("unix_socket", SOCKETS=[f"{folder}/harness.sock"], ABSTRACT=[abstract_name], PORTS=[tcp.getsockname()[1]]),
            {},
        ],
        ["sys_exit", hostile("sys_exit"), {}],
        ["os_exit", hostile("os_exit"), {}],
        ["loop", "while True:\n    pass\n", {"timeout": 1}],
        ["memory", "x = []\nwhile True:\n    x.append(bytearray(10**7))\n", {"mem_bytes": 256 << 20}],
    ]
    try:
        out = run_as_nobody(["-c", NONROOT_HARNESS, str(ROOT)], json.dumps(items))
        assert out.returncode == 0, out.stderr  # the harness survived
        got = json.loads(out.stdout)
        if "unavailable" in got:
            pytest.skip(f"user namespaces are not available to nobody here: {got['unavailable']}")
        assert got.pop("mode") == "user namespace" and got.pop("uid") == NOBODY
        assert got == {
            "harness_attack": "passed",
            "kill_everyone": "passed",
            "setsid_grandchild": "passed",
            "read_host": "passed",
            "fill_scratch": "passed",
            "unix_socket": "passed",
            "sys_exit": "exit before end",
            "os_exit": "exit before end",
            "loop": "timeout",
            "memory": "killed: memory",
        }
        assert os.listdir(folder) == ["harness.sock"] and victim.poll() is None and not item_processes(tag)
        for s in (unix, abstract, tcp):
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in (unix, abstract, tcp):
            s.close()
        victim.kill()
        victim.wait()
        shutil.rmtree(folder)


@pytest.mark.skipif(
    not can_switch_user or not shutil.which("unshare") or not shutil.which("chroot"),
    reason="needs root, unshare, chroot, setpriv and /usr/bin/python3",
)
def test_refuses_clearly_without_user_namespaces():
    # The kernel refuses user namespaces to a process in a chroot: bind the whole tree elsewhere and chroot there.
    folder = tempfile.mkdtemp(prefix="qp-chroot-")
    try:
        chroot = f'mount --rbind / {folder} && exec {shutil.which("chroot")} {folder} "$@"'
        out = run_as_nobody(["-c", NONROOT_HARNESS, str(ROOT)], prefix=["unshare", "--mount", "sh", "-c", chroot, "-"])
        assert out.returncode == 0, out.stderr
        first, second = (json.loads(x) for x in out.stdout.splitlines())
        assert first["unavailable"].startswith("the HumanEval sandbox is not available (user namespace mode)")
        assert "unshare failed: Operation not permitted" in first["unavailable"]
        assert "refusing to run model-written code" in first["unavailable"]
        assert first["description"].startswith("UNAVAILABLE: ")
        assert second["run_program"] == first["unavailable"]
    finally:
        os.rmdir(folder)


def test_an_unavailable_sandbox_stops_the_cli_with_one_line_before_any_work(tiny_model, tmp_path, monkeypatch):
    """SandboxUnavailable reaches the user as bad input does: exit 2 and main()'s one line, nothing built (not an
    internal error with a traceback). The probe's answer is what check_sandbox caches; a kernel that refuses the
    namespaces is test_refuses_clearly_without_user_namespaces."""
    refusal = "the HumanEval sandbox is not available (test): refusing to run model-written code without it"
    monkeypatch.setattr(code_exec, "_state", ("error", refusal))
    recipe = write_recipe(tmp_path, tiny_model, name="x")  # the smoke suite runs HumanEval
    out = cli_in_process("validate", recipe, "--artifacts", tmp_path / "art")
    assert (out.returncode, out.stderr) == (2, f"quantpipe: error: {refusal}\n")
    assert not (tmp_path / "art" / "x").exists()
