"""Trust what is stored: results are keyed on the content they were computed from (weights, data),
damaged records are recomputed with one line, and the table and gate read only complete reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_pipeline import quantpipe, step_lines, table_numbers

from pipeline.store import run_lock

pytestmark = pytest.mark.slow

TQ = [{"stage": "turboquant", "preset": "turboquant_3bit_nc", "skip_layers": [], "mode": "stress"}]


def recipe(tmp: Path, model: Path, data: Path) -> Path:
    path = tmp / "t.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "model": {"id": str(model), "dtype": "float32"},
                "offline": True,
                "eval": {
                    "suite": "smoke",
                    "data_dir": str(data),
                    "tasks": {"humaneval": None, "gsm8k": None, "mmlu": None, "truthfulqa_mc1": None},
                },
                "variants": {"tq": TQ},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def finished(tiny_model, data_dir, tmp_path_factory):
    """One run of a model and data copy; each test gets its own copy of all three (keys are content, not paths)."""
    tmp = tmp_path_factory.mktemp("trust")
    model, data = tmp / "model", tmp / "data"
    shutil.copytree(tiny_model, model)
    shutil.copytree(data_dir, data)
    quantpipe("run", recipe(tmp, model, data), "--artifacts", tmp / "art")
    return tmp


@pytest.fixture
def run(finished, tmp_path):
    for name in ("model", "data", "art"):
        shutil.copytree(finished / name, tmp_path / name, symlinks=True)
    r = recipe(tmp_path, tmp_path / "model", tmp_path / "data")
    out = quantpipe("run", r, "--artifacts", tmp_path / "art")
    assert not computed(out.stderr), out.stderr  # the copy is reused whole: keys are content, not paths
    return r, tmp_path / "model", tmp_path / "data", tmp_path / "art" / "t"


def computed(stderr: str) -> list[str]:
    return [line for line in step_lines(stderr) if not line.endswith("reused")]


def test_new_weights_of_the_same_shape_recompute_everything(run, tmp_path):
    from conftest import build_tiny_model

    r, model, _, root = run
    before = table_numbers(root)
    build_tiny_model(tmp_path / "other", seed=7)
    shutil.copy2(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    out = quantpipe("run", r, "--artifacts", tmp_path / "art")
    assert len(computed(out.stderr)) == len(step_lines(out.stderr)), out.stderr  # nothing reused
    assert table_numbers(root) != before


def test_edited_evaluation_data_is_recomputed(run, tmp_path):
    r, _, data, root = run
    mc = data / "truthfulqa" / "multiple_choice" / "validation.jsonl"
    rows = [json.loads(line) for line in mc.read_text().splitlines()]
    for row in rows[:3]:  # the smoke suite's three items: flip their MC2 labels
        row["mc2_targets"]["labels"] = [1 - x for x in row["mc2_targets"]["labels"]]
    mc.write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = table_numbers(root)["base"]["TruthfulQA"][0]
    out = quantpipe("run", r, "--artifacts", tmp_path / "art")
    assert any("eval base truthfulqa_mc2" in line for line in computed(out.stderr)), out.stderr
    after = table_numbers(root)["base"]["TruthfulQA"][0]
    assert after == pytest.approx(1 - before, abs=1e-6)  # MC2 of flipped labels is the complement


@pytest.mark.parametrize("cut", ["line", "mid-line"])
def test_truncated_samples_are_recomputed_with_one_line(run, tmp_path, cut):
    r, _, _, root = run
    samples = root / "base" / "eval" / "truthfulqa_mc2" / "samples.jsonl"
    text = samples.read_text()
    samples.write_text(text[: text.index("\n") + 1] if cut == "line" else text[: len(text) // 2])
    t = quantpipe("table", root, "--format", "json")  # never a JSONDecodeError; the cell is just not there
    assert "TruthfulQA" not in {r["name"]: r for r in json.loads(t.stdout)["rows"]}["base"]["cells"]
    out = quantpipe("run", r, "--artifacts", tmp_path / "art")
    assert "eval base truthfulqa_mc2: the stored record at" in out.stderr
    assert "is not usable (files differ from the manifest (samples.jsonl)); recomputing" in out.stderr
    assert table_numbers(root)["base"]["TruthfulQA"][1] == 3


def test_truncated_kl_reference_is_recomputed(run, tmp_path):
    r, _, _, root = run
    ref = root / "base" / "kl-reference" / "reference.npz"
    ref.write_bytes(ref.read_bytes()[:100])
    out = quantpipe("run", r, "--artifacts", tmp_path / "art")
    assert "kl-reference base: the stored record" in out.stderr and "FAILED" not in out.stderr


def test_table_waits_for_a_run_and_the_gate_reads_only_complete_reports(run, tmp_path):
    r, _, _, root = run
    with run_lock(root):
        t = quantpipe("table", root, check=False)
        assert t.returncode == 2 and "in use by another run" in t.stderr
    # the report is one set behind a symlink: the gate reads a complete table or none
    assert (root / "report").is_symlink() and (root / "report" / "degradation.json").is_file()
    shutil.rmtree(root / ".reports")
    g = quantpipe("gate", root, "--max-drop", "default=50", check=False)
    assert g.returncode == 2 and "no table" in g.stderr


def _variant_recipe(r: Path, dest: Path, **eval_changes) -> Path:
    spec = yaml.safe_load(r.read_text())
    spec["eval"].update(eval_changes)
    dest.write_text(yaml.safe_dump(spec))
    return dest


def test_first_n_and_random_runs_in_one_folder_keep_each_others_results(run, tmp_path):
    """Switching eval.order (and the order's seed) back and forth in one run folder recomputes nothing
    the other mode stored: the records never nest, and each seed's chunks have their own folder."""
    r, _, _, root = run
    tasks = {"humaneval": None, "gsm8k": None, "mmlu": None, "truthfulqa_mc1": None, "truthfulqa_mc2": {"limit": 20}}
    rnd = _variant_recipe(r, tmp_path / "random.yaml", order="random", chunk_items=10, tasks=tasks)
    rnd1 = _variant_recipe(r, tmp_path / "random1.yaml", order="random", chunk_items=10, tasks=tasks, seed=1)
    art = tmp_path / "art"
    first = quantpipe("run", rnd, "--artifacts", art)
    assert len(computed(first.stderr)) == 4, first.stderr  # 2 rows x 2 chunks
    for again, n_computed in ((r, 0), (rnd1, 4), (rnd, 0), (r, 0)):
        out = quantpipe("run", again, "--artifacts", art)
        assert "recomputing" not in out.stderr and len(computed(out.stderr)) == n_computed, (again.name, out.stderr)
    assert table_numbers(root)["base"]["TruthfulQA"][1] == 3  # the last run was first-N: its 3 items


def test_the_gate_refuses_a_stale_report_and_a_run_in_progress(run, tmp_path):
    from pipeline.job import Job
    from pipeline.recipe import load_recipe

    r, _, _, root = run
    assert quantpipe("gate", root, "--max-drop", "default=50", "--point-estimate", check=False).returncode in (0, 1)
    assert quantpipe(
        "gate", r, "--artifacts", tmp_path / "art", "--max-drop", "default=50", "--point-estimate", check=False
    ).returncode in (0, 1)
    # the recipe redefines its variant and a run of it is killed after writing its plan
    spec = yaml.safe_load(r.read_text())
    spec["variants"]["tq"][0]["preset"] = "turboquant_4bit_nc"
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    Job(load_recipe(changed), tmp_path / "art").start()
    for target in (root, changed):
        g = quantpipe("gate", target, "--artifacts", tmp_path / "art", "--max-drop", "default=50", "--point-estimate", check=False)
        assert g.returncode == 2 and "another plan than the run's current one" in g.stderr, g.stderr
    quantpipe("run", r, "--artifacts", tmp_path / "art")  # the original recipe again: its report is current
    g = quantpipe("gate", changed, "--artifacts", tmp_path / "art", "--max-drop", "default=50", "--point-estimate", check=False)
    assert g.returncode == 2 and "as it stands now" in g.stderr, g.stderr
    with run_lock(root):
        g = quantpipe("gate", root, "--max-drop", "default=50", "--point-estimate", check=False)
        assert g.returncode == 2 and "in use by another run" in g.stderr


def test_peak_memory_does_not_depend_on_what_the_process_held_before(run, tmp_path):
    import numpy as np

    from pipeline.isolation import ModelSlot
    from pipeline.job import Job
    from pipeline.recipe import load_recipe

    r, _, _, _ = run
    peaks = []
    for i, ballast_mib in enumerate((0, 512)):
        ballast = np.ones(ballast_mib * 2**17)  # float64: touched, so resident
        job = Job(load_recipe(r), tmp_path / f"fresh-{i}")
        slot = ModelSlot(job)
        for step in job.start().steps:  # the base row's evaluation only, in this process
            if step.kind == "eval" and step.row == "base":
                assert not job.run_step(step, slot)
        slot.release()
        rec = json.loads((tmp_path / f"fresh-{i}" / "t" / "base" / "eval" / "truthfulqa_mc2" / "manifest.json").read_text())
        peaks.append(rec["meta"]["peak_memory_bytes"])
        del ballast
    assert abs(peaks[0] - peaks[1]) < 128 * 2**20, peaks  # the 512 MiB held before the row is not the row's
