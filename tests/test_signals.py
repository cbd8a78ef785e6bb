"""SIGTERM and Ctrl-C (SIGINT): one line, the exit code of the signal, no child process left behind
(llama.cpp's converter included), the lock released, and the next run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_pipeline import quantpipe, table_numbers, write_recipe

from pipeline.store import run_lock

pytestmark = pytest.mark.slow


def converters(parent: int | None = None) -> list[str]:
    """llama.cpp converter processes (children of `parent` only, if given: other jobs may convert too)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout  # -ww: full command lines
    return [line for line in out.splitlines() if "quantpipe_convert.py" in line and (parent is None or line.split()[1] == str(parent))]


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_stops_cleanly_and_the_next_run_resumes(tiny_model, data_dir, tmp_path, sig, code, word):
    recipe = write_recipe(
        tmp_path,
        tiny_model,
        data_dir,
        tasks={"humaneval": None, "gsm8k": None, "mmlu": None},
        variants={"q8": [{"stage": "gguf", "type": "Q8_0", "pre_tokenizer": "gpt-2"}]},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", recipe, "--artifacts", tmp_path / "art"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job inherits SIGINT ignored (pytest started with `&`): Ctrl-C must reach the run
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 900
    while not converters(proc.pid) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the converter started"
    os.kill(proc.pid, sig)  # while llama.cpp's converter runs as a child process
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"quantpipe: {word}") and "Traceback" not in err
    time.sleep(1.0)
    assert not converters(), "the converter outlived the run"
    with run_lock(tmp_path / "art" / "tiny"):  # released: taken at once, without --wait
        pass
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art")
    assert set(table_numbers(tmp_path / "art" / "tiny")) == {"base", "q8"} and "FAILED" not in r.stderr
