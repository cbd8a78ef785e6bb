"""Ray at scale, on a local two-node cluster (CPU): a node that cannot see the store refuses the run
before any step, and declared GPUs are requested by the steps.

The second node runs in a mount namespace of its own in which the store's folder is hidden under
an empty tmpfs: the same machine, but a node that does not see the driver's path, as a node
without the shared filesystem would not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import _free_port
from test_pipeline import quantpipe, write_recipe

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

TASKS = {"humaneval": None, "gsm8k": None}


def _can_hide(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "none", str(probe)], capture_output=True)
    return r.returncode == 0


def _stop(proc: subprocess.Popen) -> None:
    """End the process group this test started (ray start --block and what it started)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            time.sleep(1)  # its raylet's workers leave with it
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head: 1 CPU and 2 declared GPUs. Second node: 1 CPU, in a mount namespace hiding `hidden`."""
    tmp = tmp_path_factory.mktemp("nodes")
    if not _can_hide(tmp):
        pytest.skip("needs unprivileged user and mount namespaces (unshare) to hide a folder from one node")
    hidden = tmp / "hidden"
    hidden.mkdir()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", "--object-store-memory=100000000", "--disable-usage-stats", "--block"]
    logs = [open(tmp / f"{n}.log", "w") for n in ("head", "node2")]  # noqa: SIM115 - closed at teardown
    head = subprocess.Popen(
        [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=2", "--include-dashboard=false", *common],
        stdout=logs[0],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs = [head]
    try:
        address = f"127.0.0.1:{port}"
        node = f"mount -t tmpfs none {hidden} && exec {ray_bin} start --address={address} --num-cpus=1 --num-gpus=0 {' '.join(common)}"
        deadline = time.time() + 240
        while time.time() < deadline:  # the second node can join once the head's GCS answers
            r = subprocess.run([ray_bin, "status", f"--address={address}"], capture_output=True, timeout=60)
            if r.returncode == 0:
                break
            time.sleep(2)
        procs.append(
            subprocess.Popen(
                ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", node],
                stdout=logs[1],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        while time.time() < deadline:
            r = subprocess.run([ray_bin, "status", f"--address={address}"], capture_output=True, text=True, timeout=60)
            if r.stdout.count("node_") >= 2:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the second Ray node did not join: {r.stdout[-2000:]}{(tmp / 'node2.log').read_text()[-2000:]}")
        yield address, hidden
    finally:
        for p in reversed(procs):
            _stop(p)
        for f in logs:
            f.close()


def test_a_store_one_node_cannot_see_is_refused_before_any_step(two_nodes, tiny_model, data_dir, tmp_path):
    address, hidden = two_nodes
    recipe = write_recipe(tmp_path, tiny_model, data_dir, variants={"fp8": [{"stage": "fp8"}]}, tasks=TASKS)
    r = quantpipe("run", recipe, "--artifacts", hidden / "art", "--executor", "ray", "--ray-address", address, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "every Ray node must see the artifact store" in last and str(hidden / "art") in last, last
    assert not (hidden / "art" / "tiny" / "fp8" / "stages").exists()  # nothing was built


def test_declared_gpus_are_requested_and_a_visible_store_passes(two_nodes, tiny_model, data_dir, tmp_path):
    """The same cluster, a store both nodes see: the node check passes and the steps ask for the
    head's declared GPUs (no real GPU: the tiny model still runs on CPU), and the run finishes."""
    address, _ = two_nodes
    recipe = write_recipe(tmp_path, tiny_model, data_dir, variants={"fp8": [{"stage": "fp8"}]}, tasks=TASKS)
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art", "--executor", "ray", "--ray-address", address, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if "Ray requests:" in x)
    # 1 build, 3 rows x ... evaluations, the KL reference and fp8's KL: each asks for one of the declared GPUs
    assert "build x (1 CPU, 1 GPU)" in line and "eval x (1 CPU, 1 GPU)" in line and "kl x (1 CPU, 1 GPU)" in line, line
    assert "0 GPU" not in line
    assert (tmp_path / "art" / "tiny" / "report" / "degradation.md").is_file()
