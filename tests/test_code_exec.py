"""The HumanEval sandbox: correct programs pass, hostile ones score 0 and the harness survives."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.code_exec import OPT_IN_ENV, CodeExecutionNotAllowed, _launcher, pass_at_k, pass_at_k_estimate, run_program


@pytest.fixture(autouse=True)
def opt_in(monkeypatch):
    monkeypatch.setenv(OPT_IN_ENV, "1")


def test_requires_opt_in(monkeypatch):
    monkeypatch.delenv(OPT_IN_ENV)
    with pytest.raises(CodeExecutionNotAllowed, match="opt-in"):
        run_program("print(1)")


def test_correct_and_wrong_programs():
    assert run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n")
    assert not run_program("def add(a, b):\n    return a * b\nassert add(2, 3) == 5\n")
    assert not run_program("this is not python")


def test_pass_at_k_matches_code_eval_contract():
    tests = ["assert f(1) == 2", "assert f(1) == 2"]
    preds = [["def f(x): return x + 1", "def f(x): return x"], ["def f(x): return 0", "def f(x): return 0"]]
    assert pass_at_k(tests, preds, k=[1, 2]) == {"pass@1": 0.25, "pass@2": 0.5}
    assert pass_at_k_estimate(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k_estimate(5, 0, 1) == 0.0 and pass_at_k_estimate(5, 5, 3) == 1.0


def test_infinite_loop_is_killed_at_the_timeout():
    t = time.time()
    assert not run_program("while True:\n    pass\n", timeout=2)
    assert time.time() - t < 10


def test_unbounded_allocation_fails():
    assert not run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", timeout=10, mem_bytes=256 << 20)


def test_children_do_not_outlive_the_item():
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid() if False else None\n    time.sleep(300)\nelse:\n    time.sleep(300)\n"
    assert not run_program(prog, timeout=2)
    time.sleep(0.5)
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert "program.py" not in out


def test_fork_bomb_is_contained():
    prog = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert not run_program(prog, timeout=3)
    time.sleep(0.5)
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert "program.py" not in out


def test_cannot_touch_files_or_kill_the_harness(tmp_path):
    _, _, drops = _launcher()
    if not drops:
        pytest.skip("privilege drop needs root and unshare; file protection then rests on file permissions")
    target = Path(__file__).resolve().parent.parent / "pyproject.toml"
    before = target.read_bytes()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.chmod(tmp_path, 0o700)
    assert not run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert not run_program(f"open({str(victim)!r}, 'w').write('x')\n")
    assert not run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert target.read_bytes() == before and victim.read_text() == "keep"


def test_no_network():
    prefix, _, _ = _launcher()
    if not prefix:
        pytest.skip("no network namespace available on this platform")
    prog = "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)\n"
    assert not run_program(prog)
    # loopback is down too: even a listener in the same program cannot be reached
    prog = (
        "import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\nsocket.create_connection(s.getsockname(), timeout=2)\n"
    )
    assert not run_program(prog)
