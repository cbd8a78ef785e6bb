"""The gate's decisions and exit codes: non-inferiority on stored per-item results, errors as exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import yaml
from conftest import cli_in_process

from pipeline import store
from pipeline.report import write_report


def make_run(root: Path, base: list[float], variants: dict[str, list[float]], task="gsm8k", kl: dict | None = None) -> Path:
    """A run folder as `quantpipe run` leaves it: per-item records in the store and the run's index."""
    steps = []
    metric, flt = {"gsm8k": ("exact_match", "flexible-extract"), "truthfulqa_mc2": ("acc", "none")}[task]
    for row, values in [("base", base), *variants.items()]:
        folder = root / row / "eval" / task

        def compute(tmp, values=values):
            samples = [{"task": task, "doc_id": i, "doc_hash": f"h{i}", "filter": flt, metric: float(v)} for i, v in enumerate(values)]
            (tmp / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
            return {"evaluated_as": "test fixture"}

        store.cached(folder, f"k-{row}", compute, "fixture")
        steps.append(
            {"id": f"eval {row} {task}", "kind": "eval", "row": row, "task": task, "key": f"k-{row}", "path": str(folder.relative_to(root))}
        )
    for row, sets in (kl or {}).items():
        store.cached(root / row / "kl", f"kl-{row}", lambda tmp, sets=sets: {"sets": sets}, "fixture")
        steps.append({"id": f"kl {row}", "kind": "kl", "row": row, "task": None, "key": f"kl-{row}", "path": f"{row}/kl"})
    store.atomic_write_json(root / "plan.json", {"rows": ["base", *variants], "steps": steps, "artifacts": {}, "base": {}})
    write_report(root)
    return root


def gate_process(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "gate", *map(str, args)], capture_output=True, text=True)


def gate(*args, cwd=None):
    """In this process (a CLI start costs seconds); test_pass_and_fail_exit_codes starts real ones."""
    return cli_in_process("gate", *args, cwd=cwd)


BASE = [1] * 120 + [0] * 80  # 60% on 200 items


def test_pass_and_fail_exit_codes(tmp_path):
    good = list(BASE)
    bad = [0] * 30 + BASE[30:]  # 30 correct->wrong: -15 points
    run = make_run(tmp_path / "r", BASE, {"good": good, "bad": bad})
    r = gate_process(run, "--max-drop", "GSM8K=5", "--json", tmp_path / "v.json", "--junit", tmp_path / "v.xml")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout and "bad / GSM8K" in r.stdout
    v = json.loads((tmp_path / "v.json").read_text())
    status = {(c["variant"], c["check"]): c["status"] for c in v["checks"]}
    assert status == {("good", "GSM8K"): "pass", ("bad", "GSM8K"): "fail"}
    by = {c["variant"]: c for c in v["checks"]}
    assert by["good"]["interval"][1] < 5 < by["bad"]["interval"][0]  # the bounds decided, not the point estimate
    suites = ET.parse(tmp_path / "v.xml").getroot()
    assert [(s.get("name"), s.get("failures")) for s in suites] == [("good", "0"), ("bad", "1")]
    assert gate_process(run, "--max-drop", "GSM8K=5", "--variant", "good").returncode == 0
    r = gate_process(run)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no thresholds" in r.stderr, r.stderr


def test_a_drop_that_may_exceed_the_margin_does_not_pass(tmp_path):
    """The README's gptq-4bit MMLU cell: 114 items, drop 3.5 points, 95% interval about [0, 7.9].
    The old gate passed it with --require-significant (the interval straddled a margin of 3)."""
    base = [1] * 60 + [0] * 54
    var = [0] * 6 + [1] * 54 + [0] * 52 + [1] * 2  # 6 correct->wrong, 2 wrong->correct: -3.5 points
    run = make_run(tmp_path / "r", base, {"gptq": var})
    r = gate(run, "--max-drop", "GSM8K=3")
    assert r.returncode == 2 and "UNDECIDED" in r.stdout, r.stdout
    check = json.loads(gate(run, "--max-drop", "GSM8K=3", "--json", tmp_path / "v.json").stdout and (tmp_path / "v.json").read_text())
    c = check["checks"][0]
    assert c["status"] == "undecided" and c["interval"][0] < 3 < c["interval"][1] and c["more_items"] > 0
    assert "more items would decide" in r.stdout
    # the point estimate alone (3.5 > 3) fails it, and says it is not a test
    p = gate(run, "--max-drop", "GSM8K=3", "--point-estimate")
    assert p.returncode == 1 and "not a statistical test" in p.stdout


def test_lossless_variant_on_too_few_items_is_undecided(tmp_path):
    base = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]
    run = make_run(tmp_path / "r", base, {"v": list(base)})
    r = gate(run, "--max-drop", "GSM8K=5")
    assert r.returncode == 2 and "UNDECIDED" in r.stdout and "[10 items]" in r.stdout


def test_errors_exit_2_with_one_line(tmp_path):
    assert gate(tmp_path / "nothing", "--max-drop", "default=1").returncode == 2
    run = make_run(tmp_path / "r", BASE, {"v": BASE})
    r = gate(run)
    assert r.returncode == 2 and "no thresholds" in r.stderr
    bad_args = (
        ["--max-drop", "GSM8K"],
        ["--max-drop", "GSM8K=nan"],
        ["--max-drop", "GSM8K=-1"],
        ["--alpha", "2", "--max-drop", "default=3"],
    )
    for bad in bad_args:
        r = gate(run, *bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (bad, r.stderr)
    # a benchmark the table does not have is an error, never a silent pass
    r = gate(run, "--max-drop", "MMLU=3")
    assert r.returncode == 2 and "no MMLU results" in r.stdout
    # an unwritable --json, a garbled or incomplete table: one line, exit 2
    r = gate(run, "--max-drop", "default=50", "--json", tmp_path / "no" / "such" / "dir" / "v.json")
    assert r.returncode == 2 and "cannot write" in r.stderr
    table = run / "report" / "degradation.json"
    original = table.read_text()
    for garbage in ("", "{not json", json.dumps({"rows": []}), json.dumps({**json.loads(original), "rows": [{"name": "base"}]})):
        table.write_text(garbage)
        r = gate(run, "--max-drop", "default=50")
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip(), garbage[:30]
    table.write_text(original)
    # a variant that failed to build is an error, not a pass
    (run / "v" / "error.json").write_text(json.dumps({"error": "RuntimeError: boom"}))
    write_report(run)
    r = gate(run, "--max-drop", "default=50")
    assert r.returncode == 2 and "boom" in r.stdout


def test_nan_scores_are_errors(tmp_path):
    var = [float("nan")] + BASE[1:]
    run = make_run(tmp_path / "r", BASE, {"v": var})
    r = gate(run, "--max-drop", "default=50")
    assert r.returncode == 2 and "non-finite" in r.stdout


def test_average_drop_threshold(tmp_path):
    var = [0] * 6 + BASE[6:]  # 6 of 120 correct lost: 5% relative
    run = make_run(tmp_path / "r", BASE, {"v": var})
    assert gate(run, "--max-avg-drop", "4", "--point-estimate").returncode == 1
    assert gate(run, "--max-avg-drop", "6", "--point-estimate").returncode == 0
    # as a test it needs the benchmarks' bounds; 200 items cannot show 5% < 6%
    r = gate(run, "--max-avg-drop", "6", "--max-drop", "default=50")
    assert r.returncode == 2 and "UNDECIDED" in r.stdout and "average" in r.stdout
    assert gate(run, "--max-avg-drop", "60", "--max-drop", "default=50").returncode == 0


@pytest.mark.parametrize("bad", [{"max_drop": {"GSM8K": "x"}}, {"unknown": 1}, {"max_drop": {"MMLU": float("nan")}}])
def test_recipe_gate_section_is_validated(bad):
    from pipeline.errors import RecipeError
    from pipeline.recipe import parse_recipe

    with pytest.raises(RecipeError, match="gate"):
        parse_recipe({"name": "t", "model": {"id": "a/b"}, "variants": {"f": [{"stage": "fp8"}]}, "gate": bad})


def test_min_recovery_and_max_kl(tmp_path):
    var = [0] * 40 + BASE[40:]  # 80 of 120 correct kept: 67% recovery
    kl = {
        "v": {
            "docs": {
                "tokens": 1000,
                "mean_kl": 0.05,
                "kl_p99": 0.2,
                "top1_agreement": 0.9,
                "ppl_base": 10.0,
                "ppl": 10.5,
                "ppl_ratio": 1.05,
                "base_topk_mass": 0.99,
                "window_kl": [0.04, 0.05, 0.06, 0.05, 0.045, 0.055, 0.05, 0.05],
            }
        }
    }
    run = make_run(tmp_path / "r", BASE, {"v": var}, kl=kl)
    assert gate(run, "--min-recovery", "95").returncode == 1
    assert gate(run, "--min-recovery", "30").returncode == 0
    assert gate(run, "--max-kl", "0.1").returncode == 0
    assert gate(run, "--max-kl", "0.01").returncode == 1
    t = json.loads((run / "report" / "degradation.json").read_text())
    assert t["rows"][1]["cells"]["GSM8K"]["paired"]["correct_to_wrong"] == 40
    run2 = make_run(tmp_path / "r2", BASE, {"v": var})
    r = gate(run2, "--max-kl", "0.1")  # no KL measured: an error, never a silent pass
    assert r.returncode == 2 and "no KL measured" in r.stdout


def test_gate_of_a_recipe_looks_for_its_run_under_artifacts(tmp_path):
    """(A recipe's run found under --artifacts, and refused when the recipe changed since: tests/test_stored_trust.py.)"""
    make_run(tmp_path / "elsewhere" / "t", BASE, {"v": list(BASE)})
    recipe = tmp_path / "t.yaml"
    recipe.write_text(
        yaml.safe_dump({"name": "t", "model": {"id": "a/b"}, "variants": {"v": [{"stage": "fp8"}]}, "gate": {"max_drop": {"default": 5}}})
    )
    r = gate(recipe, "--artifacts", tmp_path / "nowhere")
    assert r.returncode == 2 and "nowhere/t holds no run" in r.stderr
    # without --artifacts it reads ./artifacts/<recipe name>: none there, one line naming it
    r = gate(recipe, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == "quantpipe: error: artifacts/t holds no run (no plan.json); run `quantpipe run` first\n"


def test_plan_sizes_each_check_from_the_stored_items(tmp_path):
    from pipeline.gate import GateConfig
    from pipeline.items_needed import plan_report

    closer = [0] * 6 + BASE[6:]  # a 3-point drop against a 5-point margin: harder to decide than no drop
    over = [0] * 20 + BASE[20:]  # a 10-point drop: sized to fail, as a drop under the margin is sized to pass
    same = list(BASE)  # no pair differs: sized at the rule-of-three spread, sqrt(3/200), not a 1-item design
    run = make_run(tmp_path / "r", BASE, {"closer": closer, "noisy": [0] * 2 + [1] * 2 + BASE[4:], "over": over, "same": same})
    text = plan_report(run, GateConfig(max_drop={"default": 5}))
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith(("| closer ", "| noisy ", "| over ", "| same "))
    }
    assert set(rows) == {"closer", "noisy", "over", "same"}
    # the fixed-n design ((z_0.95 + z_0.9) sd / margin)^2 = ((1.6449 + 1.2816) * 0.1225 / 0.05)^2 = 51.4: 52 items
    assert rows["same"][4] == "0.122" and int(rows["same"][5]) == 52
    assert rows["over"][3] == "+10.00" and 0 < int(rows["over"][5]) < int(rows["closer"][5])
    assert rows["closer"][0] == "GSM8K" and rows["closer"][2] == "200" and rows["closer"][3] == "+3.00"
    fixed = {k: int(v[5]) for k, v in rows.items()}
    assert fixed["closer"] > fixed["noisy"] > 0  # closer to the margin needs more items
    assert "docs/statistics.md" in text


def test_plan_says_when_a_benchmark_has_too_few_items_to_decide(tmp_path):
    from pipeline.gate import GateConfig
    from pipeline.items_needed import plan_report

    # a 3-point drop against a 3.5-point margin: sized at 2.625 points, a fixed-n design of
    # ((1.6449 + 1.2816) * 0.171 / 0.00875)^2 ~ 3,270 items, more than GSM8K's 1,319 test questions
    run = make_run(tmp_path / "r", BASE, {"closer": [0] * 6 + BASE[6:], "far": [0] * 40 + BASE[40:]})
    lines = plan_report(run, GateConfig(max_drop={"default": 3.5})).splitlines()
    closer = next(c.strip() for line in lines if line.startswith("| closer ") for c in [line.split("|")[-2]])
    far = next(c.strip() for line in lines if line.startswith("| far ") for c in [line.split("|")[-2]])
    assert closer.startswith("1319: too few for fixed-n"), closer
    assert far == "1319"  # a 20-point drop is decided (fail) well within the benchmark


def test_gate_says_when_the_items_a_check_needs_exceed_its_benchmark(tmp_path):
    """A 3-point drop against a 3.5-point margin on 200 GSM8K items needs thousands more: GSM8K has
    1,319 test questions, so the check can never decide there, and the line says so."""
    run = make_run(tmp_path / "r", BASE, {"closer": [0] * 6 + BASE[6:], "far": [0] * 40 + BASE[40:]})
    lines = {line.split()[1]: line for line in gate(run, "--max-drop", "GSM8K=3.5").stdout.splitlines()[1:-1]}
    assert "UNDECIDED" in lines["closer"] and "more than the 1319 GSM8K has" in lines["closer"]
    assert "FAIL" in lines["far"] and "more than" not in lines["far"]
