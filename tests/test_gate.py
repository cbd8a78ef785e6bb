"""The gate's decisions and exit codes on passing, failing, noisy and too-small runs."""

from __future__ import annotations

import json
import subprocess
import sys
from xml.etree import ElementTree as ET

import pytest

from pipeline.report import write_report


def make_run(root, base: list[int], variants: dict[str, list[int]], bench_task="gsm8k"):
    """A run folder with stored per-item GSM8K results (the format `quantpipe run` writes)."""

    def write(row, values):
        d = root / row / "eval"
        d.mkdir(parents=True)
        samples = [{"task": bench_task, "doc_id": i, "doc_hash": f"h{i}", "filter": "flexible-extract",
                    "exact_match": float(v)} for i, v in enumerate(values)]
        (d / f"{bench_task}.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        (d / f"{bench_task}.json").write_text(json.dumps({"evaluated_as": "test fixture"}))
        (root / row / "row.json").write_text(json.dumps({"variant": row, "bits": "W4", "size_bytes": 1}))

    write("base", base)
    for name, vals in variants.items():
        write(name, vals)
    (root / "recipe.json").write_text(json.dumps({"variant_order": list(variants)}))
    write_report(root, "t")
    return root


def gate(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "gate", *map(str, args)], capture_output=True, text=True)


BASE = [1] * 120 + [0] * 80  # 60% on 200 items


def test_pass_and_fail_exit_codes(tmp_path):
    good = list(BASE)
    bad = [0] * 30 + BASE[30:]  # 30 correct->wrong: -15 points
    run = make_run(tmp_path / "r", BASE, {"good": good, "bad": bad})
    r = gate(run, "--max-drop", "GSM8K=2", "--json", tmp_path / "v.json", "--junit", tmp_path / "v.xml")
    assert r.returncode == 1, r.stderr
    assert "FAIL" in r.stdout and "bad / GSM8K" in r.stdout and "drop 15.0 pts" in r.stdout
    v = json.loads((tmp_path / "v.json").read_text())
    status = {(c["variant"], c["check"]): c["status"] for c in v["checks"]}
    assert status == {("good", "GSM8K"): "pass", ("bad", "GSM8K"): "fail"}
    suites = ET.parse(tmp_path / "v.xml").getroot()
    assert [(s.get("name"), s.get("failures")) for s in suites] == [("good", "0"), ("bad", "1")]
    assert gate(run, "--max-drop", "GSM8K=2", "--variant", "good").returncode == 0


def test_noise_alone_does_not_fail_with_require_significant(tmp_path):
    noisy = list(BASE)
    noisy[0] = 0
    noisy[1] = 0
    noisy[2] = 0  # -1.5 points, three flips: not significant
    run = make_run(tmp_path / "r", BASE, {"noisy": noisy})
    assert gate(run, "--max-drop", "GSM8K=1").returncode == 1  # point estimate over the line
    r = gate(run, "--max-drop", "GSM8K=1", "--require-significant", "--min-items", "50")
    assert r.returncode == 0, r.stdout


def test_too_small_sample_is_undecided(tmp_path):
    base = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]
    var = [0, 1, 0, 1, 0, 1, 1, 0, 1, 1]
    run = make_run(tmp_path / "r", base, {"v": var})
    r = gate(run, "--max-drop", "GSM8K=5", "--require-significant", "--min-items", "30")
    assert r.returncode == 2 and "too small to decide" in r.stdout and "only 10 items" in r.stdout


def test_errors_exit_2(tmp_path):
    assert gate(tmp_path / "nothing", "--max-drop", "default=1").returncode == 2
    run = make_run(tmp_path / "r", BASE, {"v": BASE})
    r = gate(run)
    assert r.returncode == 2 and "no thresholds" in r.stderr
    assert gate(run, "--max-drop", "GSM8K").returncode == 2
    # a variant that failed to build is an error, not a pass
    (run / "v" / "error.json").write_text(json.dumps({"error": "RuntimeError: boom"}))
    write_report(run, "t")
    r = gate(run, "--max-drop", "default=100")
    assert r.returncode == 2 and "boom" in r.stdout


def test_average_drop_threshold(tmp_path):
    var = [0] * 6 + BASE[6:]  # 6 of 120 correct lost: 5% relative
    run = make_run(tmp_path / "r", BASE, {"v": var})
    assert gate(run, "--max-avg-drop", "4").returncode == 1
    assert gate(run, "--max-avg-drop", "6").returncode == 0


@pytest.mark.parametrize("bad", [{"max_drop": {"GSM8K": "x"}}, {"unknown": 1}])
def test_recipe_gate_section_is_validated(bad):
    from pipeline.errors import RecipeError
    from pipeline.recipe import parse_recipe

    with pytest.raises(RecipeError, match="gate"):
        parse_recipe({"name": "t", "model": {"id": "a/b"}, "variants": {"f": [{"stage": "fp8"}]}, "gate": bad})


def test_min_recovery_and_max_kl(tmp_path):
    var = [0] * 12 + BASE[12:]  # 108/120 correct kept: 90% recovery
    run = make_run(tmp_path / "r", BASE, {"v": var})
    assert gate(run, "--min-recovery", "95").returncode == 1
    assert gate(run, "--min-recovery", "85").returncode == 0
    r = gate(run, "--max-kl", "0.1")  # no KL measured in this fixture: an error, never a silent pass
    assert r.returncode == 2 and "no KL measured" in r.stdout
    (run / "v" / "divergence.json").write_text(json.dumps({"key": "k", "docs": {"mean_kl": 0.05, "top1_agreement": 0.9,
                                                                                 "ppl_ratio": 1.05, "tokens": 100}}))
    write_report(run, "t")
    assert gate(run, "--max-kl", "0.1").returncode == 0
    assert gate(run, "--max-kl", "0.01").returncode == 1
    t = json.loads((run / "report" / "degradation.json").read_text())
    assert t["rows"][1]["benchmarks"]["GSM8K"]["paired"]["flip_pct"] == pytest.approx(100 * 12 / 200)
