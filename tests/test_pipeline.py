"""End to end on a tiny model: offline evaluation of all four tasks, the table recomputed from
per-item results, resumption (rerun, SIGKILL mid-run, corrupt artifact), opt-in and lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
import yaml

from pipeline.store import run_lock
from pipeline.tasks import COLUMNS

pytestmark = pytest.mark.slow


def write_recipe(tmp: Path, model: Path, data_dir: Path, name="tiny", variants=None, tasks=None) -> Path:
    return conftest.write_recipe(
        tmp,
        model,
        name=name,
        eval={"suite": "smoke", "data_dir": str(data_dir), **({"tasks": tasks} if tasks else {})},
        variants=variants or {"fp8": [{"stage": "fp8"}], "gptq-4bit": [{"stage": "gptq", "group_size": 128}]},
    )


def quantpipe(*args, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True, **kw)
    if check and r.returncode:
        raise AssertionError(f"quantpipe {args} exited {r.returncode}\n{r.stderr[-3000:]}")
    return r


def table_numbers(root: Path) -> dict:
    t = json.loads((root / "report" / "degradation.json").read_text())
    return {r["name"]: {c: (v["score"], v["n"], (v.get("paired") or {}).get("diff")) for c, v in r["cells"].items()} for r in t["rows"]}


def stored(root: Path) -> dict[Path, int]:
    """mtime of every stored record under a run folder, read safely while a run is changing it."""
    while True:
        try:
            return {p: p.stat().st_mtime_ns for p in root.rglob("manifest.json") if ".work" not in p.parts}
        except FileNotFoundError:  # a folder vanished mid-walk (a temporary one, or a record replaced)
            time.sleep(0.01)


def record(folder: Path) -> dict:
    """A stored record's manifest (key, meta, files)."""
    return json.loads((folder / "manifest.json").read_text())


def step_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[") and "/" in line.split("]")[0]]


@pytest.fixture(scope="module")
def finished(tiny_model, data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    recipe = write_recipe(tmp, tiny_model, data_dir)
    t0 = time.time()
    r = quantpipe("run", recipe, "--artifacts", tmp / "art", "--allow-code-execution")
    r.seconds = time.time() - t0  # how long an uninterrupted run takes here: kill times scale with it
    return tmp, recipe, tmp / "art" / "tiny", r


def test_table_has_every_row_and_benchmark(finished):
    _, _, root, r = finished
    nums = table_numbers(root)
    assert list(nums) == ["base", "fp8", "gptq-4bit"]
    expected_n = {"MMLU": 57, "HumanEval": 2, "GSM8K": 2, "TruthfulQA": 3}  # smoke suite limits (MMLU: 1 per subject)
    for row, benches in nums.items():
        assert {b: v[1] for b, v in benches.items()} == expected_n, row
        assert all(0.0 <= v[0] <= 1.0 for v in benches.values())
    md = (root / "report" / "degradation.md").read_text()
    assert "| Method | Bits | MMLU | HumanEval | GSM8K | TruthfulQA | Size | Weights in memory | Peak memory | Avg drop |" in md
    assert "dequantized on CPU" in md and "relative drop" in md
    # few-shot counts as lm-eval ran them (the smoke suite runs MMLU 0-shot; GSM8K's stock config is 5-shot)
    assert "MMLU: acc (0-shot)" in md and "GSM8K: exact match, flexible-extract (5-shot)" in md
    assert "TruthfulQA: MC2 (0-shot)" in md
    assert (root / "report" / "degradation.csv").read_text().startswith("method,bits,MMLU,")
    assert "| Method |" in r.stdout  # printed too


def test_table_matches_lm_eval_aggregates(finished):
    """Scores recomputed from stored per-item samples equal lm-eval's own aggregated metrics."""
    _, _, root, _ = finished
    t = json.loads((root / "report" / "degradation.json").read_text())
    for r in t["rows"]:
        for task in COLUMNS:
            rec = record(root / r["name"] / "eval" / task.name)["meta"]
            agg = rec["results"][task.name][f"{task.column.metric},{task.column.filter}"]
            assert r["cells"][task.column.name]["score"] == pytest.approx(agg, abs=1e-9), (r["name"], task.column.name)


def test_gsm8k_keeps_both_filters_and_humaneval_ran_programs(finished):
    _, _, root, _ = finished
    res = record(root / "base" / "eval" / "gsm8k")["meta"]["results"]["gsm8k"]
    assert "exact_match,strict-match" in res and "exact_match,flexible-extract" in res
    samples = [json.loads(x) for x in (root / "base" / "eval" / "humaneval" / "samples.jsonl").read_text().split("\n") if x]
    assert len(samples) == 2 and all("pass@1" in s and "check(" in s["target"] for s in samples)


def test_rerun_reuses_everything(finished):
    tmp, recipe, root, _ = finished
    before = table_numbers(root)
    r = quantpipe("run", recipe, "--artifacts", tmp / "art", "--allow-code-execution")
    lines = step_lines(r.stderr)
    assert len(lines) == 2 + 3 * 5 + 1 + 2  # builds, (row, task) evaluations, KL reference, KL per variant
    assert all(line.endswith(": reused") for line in lines), lines
    assert table_numbers(root) == before
    # `quantpipe table` rebuilds the same table from stored results alone
    out = quantpipe("table", root, "--format", "json")
    assert {r["name"] for r in json.loads(out.stdout)["rows"]} == set(before)


def test_corrupt_artifact_is_detected_and_rebuilt(finished, tmp_path):
    """On a copy of the finished run: later tests compare with the original."""
    tmp, recipe, root, _ = finished
    original = (root / "fp8" / "stages" / "00-fp8" / "model.safetensors").read_bytes()
    shutil.copytree(tmp / "art", tmp_path / "art", symlinks=True)
    weights = tmp_path / "art" / "tiny" / "fp8" / "stages" / "00-fp8" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art", "--allow-code-execution")
    assert "not usable (files differ from the manifest (model.safetensors)); recomputing" in r.stderr
    assert any(line.startswith("[") and "build fp8[0] fp8: " in line and not line.endswith("reused") for line in step_lines(r.stderr))
    assert weights.read_bytes() != bytes(data)
    assert (root / "fp8" / "stages" / "00-fp8" / "model.safetensors").read_bytes() == original


def test_humaneval_needs_explicit_opt_in(tiny_model, data_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, data_dir, variants={"fp8": [{"stage": "fp8"}]})
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art", check=False)
    assert r.returncode == 2 and "--allow-code-execution" in r.stderr
    assert not (tmp_path / "art" / "tiny" / "base" / "eval").exists()  # failed before any work


def test_second_run_on_same_folder_names_the_holder(tiny_model, data_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, data_dir, tasks={"humaneval": None})
    with run_lock(tmp_path / "art" / "tiny"):
        r = quantpipe("run", recipe, "--artifacts", tmp_path / "art", check=False)
    assert r.returncode == 2 and "in use by another run" in r.stderr and f"pid {os.getpid()}" in r.stderr
    # --wait queues behind the holder instead, and runs once the lock is released
    import threading

    lock = run_lock(tmp_path / "art" / "tiny")
    lock.__enter__()
    threading.Timer(3.0, lambda: lock.__exit__(None, None, None)).start()
    t0 = time.time()
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art", "--variant", "fp8", "--wait")
    assert time.time() - t0 > 3.0 and "build fp8[0] fp8: " in r.stderr and "build fp8[0] fp8: reused" not in r.stderr


def test_failing_variant_is_marked_and_others_finish(tiny_model, data_dir, tmp_path):
    # An empty calibration file passes every check before work (it exists, it has an identity) and
    # makes only the calibrated stage fail, when it reads the text.
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n")
    recipe = write_recipe(
        tmp_path,
        tiny_model,
        data_dir,
        tasks={"humaneval": None, "mmlu": None},
        variants={"gptq-4bit": [{"stage": "gptq"}], "fp8": [{"stage": "fp8"}]},
    )
    data = yaml.safe_load(recipe.read_text())
    data["calibration"]["dataset"] = str(calib)
    recipe.write_text(yaml.safe_dump(data))
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art")
    t = json.loads((tmp_path / "art" / "tiny" / "report" / "degradation.json").read_text())
    rows = {r["name"]: r for r in t["rows"]}
    assert "is empty" in rows["gptq-4bit"]["error"] and not rows["gptq-4bit"]["cells"]
    assert rows["fp8"]["error"] is None and set(rows["fp8"]["cells"]) == {"GSM8K", "TruthfulQA"}
    assert "gptq-4bit: FAILED" in r.stderr
    # a calibration file that is gone is bad input: one line before any work
    data["calibration"]["dataset"] = str(tmp_path / "gone.txt")
    recipe.write_text(yaml.safe_dump(data))
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art2", check=False)
    assert r.returncode == 2 and "calibration file not found" in r.stderr and not (tmp_path / "art2" / "tiny" / "fp8").exists()


def test_html_report_renders_with_plots_in_headless_chromium(finished, tmp_path):
    import shutil

    _, _, root, _ = finished
    page = root / "report" / "report.html"
    text = page.read_text()
    assert text.count('<svg class="plot"') == 4 and "http" not in text.replace("http-equiv", "")  # no network needed
    assert (root / "report" / "model-cards" / "fp8.md").read_text().startswith("## Quantization quality: fp8")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        pytest.skip("no headless Chromium on this machine (.ci/run installs Debian's chromium)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,1200",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert img.size == (1400, 1200) and len(colors) > 50  # a rendered page, not a blank one
    # the plots' markers: the first two row colours (#1f77b4 base, #d62728 fp8) are painted
    present = {c for _, c in colors}
    assert (0x1F, 0x77, 0xB4) in present and (0xD6, 0x27, 0x28) in present


def test_killed_at_random_points_then_resumed(finished, tiny_model, data_dir, tmp_path):
    """SIGKILL at seeded random moments, several times; nothing finished is redone (it is reported
    reused), no temporary folder is left, the final table equals the uninterrupted run's, and no
    half-written artifact is ever taken for a finished one."""
    import random

    _, _, ref_root, _ = finished
    recipe = write_recipe(tmp_path, tiny_model, data_dir)
    art = tmp_path / "art"
    rng = random.Random(1234)
    # Each attempt is killed at a seeded random moment after it has stored something new: the moments
    # follow this run's own progress, not a duration measured on a machine that may be busier or idler.
    finished_files: dict[Path, int] = {}
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", recipe, "--artifacts", art, "--allow-code-execution"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 1800
        while proc.poll() is None and time.time() < deadline and not set(stored(art / "tiny")) - set(finished_files):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 3.0))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        for p, mtime in finished_files.items():
            assert p.stat().st_mtime_ns == mtime, f"{p} was redone after a kill"
        finished_files.update(stored(art / "tiny"))
    r = quantpipe("run", recipe, "--artifacts", art, "--allow-code-execution")
    for p, mtime in finished_files.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was redone"
    assert kills >= 2, "the run finished before it could be interrupted twice"
    assert "build fp8[0] fp8: reused" in r.stderr  # built before a kill, never rebuilt
    assert not list((art / "tiny").rglob(".*.tmp-*"))
    assert table_numbers(art / "tiny") == table_numbers(ref_root)
    assert "FAILED" not in r.stderr


def test_batch_size_auto_runs_end_to_end_and_records_the_measured_batch(tiny_model, data_dir, tmp_path):
    """eval.batch_size auto: the HF row measures its batch when its model loads and the record states
    it; the GGUF row (llama.cpp, one request at a time, its tokenizer checked against llama.cpp's)
    accepts it. (That the budget enters the key: test_recipe.py, on the settings the key hashes.)"""
    recipe = write_recipe(
        tmp_path,
        tiny_model,
        data_dir,
        name="auto",
        tasks={"humaneval": None, "mmlu": None, "gsm8k": None, "truthfulqa_mc2": None},
        variants={"gguf-q8": [{"stage": "gguf", "type": "Q8_0", "pre_tokenizer": "gpt-2"}]},
    )
    data = yaml.safe_load(recipe.read_text())
    data["eval"] |= {"batch_size": "auto", "memory_budget_gib": 16}  # far above a tiny model's needs
    recipe.write_text(yaml.safe_dump(data))
    quantpipe("run", recipe, "--artifacts", tmp_path / "art")
    root = tmp_path / "art" / "auto"
    base, gguf = record(root / "base" / "eval" / "truthfulqa_mc1"), record(root / "gguf-q8" / "eval" / "truthfulqa_mc1")
    assert base["meta"]["settings"]["batch_size"] == "auto" and base["meta"]["settings"]["memory_budget_gib"] == 16
    measured = base["meta"]["batch_size"]
    assert isinstance(measured, int) and 1 <= measured <= 64
    assert f"batch size {measured} (auto: measured to fit 16.00 GiB)" in base["meta"]["evaluated_as"]
    assert gguf["meta"]["batch_size"] == 1 and gguf["meta"]["n_items"] == 3
