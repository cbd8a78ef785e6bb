"""Scale-out: a run on a local Ray cluster (loopback) produces the same table as the embedded run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import quantpipe, record, table_numbers, write_recipe

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

VARIANTS = {"fp8": [{"stage": "fp8"}], "gptq-4bit": [{"stage": "gptq", "group_size": 128}]}
TASKS = {"humaneval": None, "gsm8k": None}  # the log-likelihood tasks keep this test short


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head` on 127.0.0.1, two CPUs, a small object store; stopped afterwards."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run(
        [
            str(ray_bin),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield f"127.0.0.1:{port}"
    subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120)


def test_distributed_run_gives_the_same_table_as_a_local_run(ray_cluster, tiny_model, data_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, data_dir, variants=VARIANTS, tasks=TASKS)
    # one thread, as each 1-CPU Ray task gets: GPTQ's result depends on the BLAS thread count
    quantpipe("run", recipe, "--artifacts", tmp_path / "local", env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "ray", "--executor", "ray", "--ray-address", ray_cluster, "-v")
    local, dist = tmp_path / "local" / "tiny", tmp_path / "ray" / "tiny"
    assert table_numbers(dist) == table_numbers(local)
    # ...and the work really ran as Ray tasks in other processes, one per (row, benchmark)
    # 2 builds + 3 rows x 3 tasks + the KL reference + 2 KLs, one Ray task per plan step
    assert "tiny: submitted 14 steps to Ray" in r.stderr
    assert any((dist / ".work").glob("worker-*"))
    assert "(step_task pid=" in r.stderr or "(eval base mmlu pid=" in r.stderr
    for row in ("base", "fp8", "gptq-4bit"):
        for task in ("mmlu", "truthfulqa_mc1", "truthfulqa_mc2"):
            assert record(dist / row / "eval" / task)["key"] == record(local / row / "eval" / task)["key"]
    kl = [record(run / "fp8" / "kl")["meta"]["sets"]["docs"]["mean_kl"] for run in (dist, local)]
    assert kl[0] > 0 and kl[0] == pytest.approx(kl[1], rel=1e-3)


def test_a_failing_variant_on_ray_is_recorded_and_the_others_finish(ray_cluster, tiny_model, data_dir, tmp_path):
    """A batch of two recipes in one invocation; one variant's stage fails inside its Ray task."""
    ok = write_recipe(tmp_path, tiny_model, data_dir, name="ok", variants={"fp8": VARIANTS["fp8"]}, tasks=TASKS)
    bad = write_recipe(tmp_path, tiny_model, data_dir, name="bad", variants=VARIANTS, tasks=TASKS)
    # the gptq stage fails at run time, inside its task (fp8 needs no calibration text)
    text = bad.read_text().replace("num_samples: 8", "num_samples: 8\n  dataset: " + str(tmp_path / "empty.txt"))
    bad.write_text(text)
    (tmp_path / "empty.txt").write_text("")
    r = quantpipe("run", ok, bad, "--artifacts", tmp_path / "art", "--executor", "ray", "--ray-address", ray_cluster)
    assert (tmp_path / "art" / "ok" / "report" / "degradation.md").is_file()
    err = json.loads((tmp_path / "art" / "bad" / "gptq-4bit" / "error.json").read_text())
    assert "calibration" in err["error"].lower()
    assert not (tmp_path / "art" / "bad" / "fp8" / "error.json").exists()
    assert "gptq-4bit" in r.stdout and "FAILED" in r.stderr
