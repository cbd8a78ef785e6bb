"""Attacks on stored runs, as a user would meet them: records that nest, damaged or deleted chunks,
failed base rows, unpaired averages, recovery against a zero base, hostile names in the gate's
outputs. Each builds a run folder as `quantpipe run` leaves it (records + plan.json), no model."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from conftest import cli_in_process

from pipeline import store
from pipeline.errors import RecipeError
from pipeline.recipe import parse_recipe
from pipeline.report import write_report
from pipeline.table import build_table

METRIC = {"gsm8k": ("exact_match", "flexible-extract"), "truthfulqa_mc2": ("acc", "none")}


def chunked_run(root: Path, rows: dict[str, list[float]], chunk: int = 20, task: str = "gsm8k") -> Path:
    """A random-order run: each row's items in chunks of `chunk`, one record each, as plan.json lists them."""
    metric, flt = METRIC[task]
    steps = []
    for row, values in rows.items():
        for a in range(0, len(values), chunk):
            folder = root / row / "eval-random" / "seed-0" / task / f"items-{a:06d}-{a + chunk:06d}"

            def compute(tmp, a=a, values=values):
                part = values[a : a + chunk]
                samples = [
                    {"task": task, "doc_hash": f"h{a + i}", "doc_id": a + i, "filter": flt, metric: float(v)} for i, v in enumerate(part)
                ]
                (tmp / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
                return {"evaluated_as": "fixture"}

            store.cached(folder, f"k-{row}-{a}", compute, "fixture")
            steps.append(
                {
                    "id": f"eval {row} {task} {a}-{a + chunk}",
                    "kind": "eval",
                    "row": row,
                    "task": task,
                    "key": f"k-{row}-{a}",
                    "path": str(folder.relative_to(root)),
                }
            )
    # plan.json lists every planned chunk, also those a sequential run never reached
    n = max(len(v) for v in rows.values())
    for row, values in rows.items():
        for a in range(len(values), n, chunk):
            path = f"{row}/eval-random/seed-0/{task}/items-{a:06d}-{a + chunk:06d}"
            steps.append(
                {"id": f"eval {row} {task} {a}-{a + chunk}", "kind": "eval", "row": row, "task": task, "key": "never", "path": path}
            )
    store.atomic_write_json(root / "plan.json", {"rows": list(rows), "steps": steps, "artifacts": {}, "base": {}})
    write_report(root)
    return root


def gate(*args):
    return cli_in_process("gate", *args)  # a CLI start costs seconds; test_gate.py starts real ones


def table_cli(*args):
    return cli_in_process("table", *args)


# base: 12 of its first 20 items right (60%), 50% over all 160
BASE = [1] * 12 + [0] * 8 + ([1] * 35 + [0] * 35) * 2


def test_a_variant_stopped_early_is_compared_with_the_base_on_its_own_items(tmp_path):
    """The issue's reproduction: a variant identical to the base stopped after 20 items while the base
    went on to 160. Its scores (60%) against the base's (50%) made an average drop of -20%."""
    run = chunked_run(tmp_path / "r", {"base": BASE, "same": BASE[:20]})
    t = build_table(run)
    cell = t.row("same").cells["GSM8K"]
    assert cell.n == 20 and t.base.cells["GSM8K"].n == 160
    assert cell.paired.n == 20 and cell.paired.base_mean == pytest.approx(0.6) and cell.paired.variant_mean == pytest.approx(0.6)
    assert cell.relative_drop_pct == 0 and t.row("same").avg_drop_pct == 0
    md = (run / "report" / "degradation.md").read_text()
    assert "20 paired items: base 60.0, this 60.0" in md  # the table says on how many
    # the gate's average (point estimate and bounds) is on the same items: no drop is no drop
    assert gate(run, "--point-estimate", "--max-avg-drop", "-5").returncode == 1
    r = gate(run, "--max-avg-drop", "30", "--max-drop", "default=40", "--json", tmp_path / "v.json")
    avg = next(c for c in json.loads((tmp_path / "v.json").read_text())["checks"] if c["check"] == "average")
    assert avg["observed"] == 0 and avg["interval"][0] < 0 < avg["interval"][1], r.stdout


def test_a_deleted_or_corrupt_chunk_is_named_in_the_table_and_fails_the_gate(tmp_path):
    run = chunked_run(tmp_path / "r", {"base": BASE, "v": BASE})
    assert gate(run, "--max-drop", "default=20").returncode == 0
    shutil.rmtree(run / "v" / "eval-random" / "seed-0" / "gsm8k" / "items-000060-000080")
    r = table_cli(run)
    assert r.returncode == 0
    assert "items-000060-000080: deleted" in r.stdout and "uses the 3 record(s) before it" in r.stdout
    assert build_table(run).row("v").cells["GSM8K"].n == 60
    r = gate(run, "--max-drop", "default=20")
    assert r.returncode == 2 and "damaged record" in r.stdout and "items-000060-000080" in r.stdout
    # a corrupt chunk of the base: the base is damaged, and that is an error too
    samples = run / "base" / "eval-random" / "seed-0" / "gsm8k" / "items-000020-000040" / "samples.jsonl"
    samples.write_text(samples.read_text().replace('"exact_match": 1.0', '"exact_match": 0.0', 1))
    table_cli(run)
    r = gate(run, "--max-drop", "default=20")
    assert r.returncode == 2 and "base / record" in r.stdout and "files differ" in r.stdout


def test_a_failed_base_row_is_an_error_not_a_pass(tmp_path):
    run = chunked_run(tmp_path / "r", {"base": BASE, "v": BASE})
    store.atomic_write_json(run / "base" / "error.json", {"error": "OSError: [Errno 28] No space left on device", "traceback": ""})
    write_report(run)
    r = gate(run, "--max-drop", "default=20")
    assert r.returncode == 2 and "No space left on device" in r.stdout


def test_recovery_against_a_zero_base_is_undefined_and_json_is_strict(tmp_path):
    run = chunked_run(tmp_path / "r", {"base": [0] * 40, "v": [0] * 40})
    r = gate(run, "--min-recovery", "95", "--json", tmp_path / "v.json")
    assert r.returncode == 2 and "recovery is undefined" in r.stdout and "nan" not in r.stdout.lower()

    def no_constants(name):
        raise ValueError(f"not strict JSON: {name}")

    # every JSON file quantpipe wrote parses with NaN/Infinity refused
    for path in [tmp_path / "v.json", *run.rglob("*.json")]:
        json.loads(path.read_text(), parse_constant=no_constants)
    assert json.loads((run / "report" / "degradation.json").read_text())["rows"][0]["cells"]["GSM8K"]["score"] == 0


def test_junit_is_well_formed_with_control_characters_and_empty_benchmarks_are_refused(tmp_path):
    run = chunked_run(tmp_path / "r", {"base": BASE, "v": BASE})
    r = gate(run, "--variant", "a\x01b", "--max-drop", "default=5", "--junit", tmp_path / "v.xml")
    assert r.returncode == 2
    suites = ET.parse(tmp_path / "v.xml").getroot()  # raises on XML that is not well-formed
    assert suites.find("testsuite").get("name") == "a\ufffdb"
    for bad in ("=3", "NOPE=3"):
        r = gate(run, "--max-drop", bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "max_drop" in r.stderr, r.stderr


def test_a_multi_line_error_is_one_line_in_the_markdown_and_whole_in_html(tmp_path):
    run = chunked_run(tmp_path / "r", {"base": BASE, "v": BASE})
    trace = 'RuntimeError: converter failed\nTraceback (most recent call last):\n  File "convert.py", line 1\n| not a cell |'
    store.atomic_write_json(run / "v" / "error.json", {"error": trace, "traceback": ""})
    report = write_report(run)
    md = (report / "degradation.md").read_text()
    table_lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert all(line.count("|") == table_lines[0].count("|") for line in table_lines)  # no cell broke the table
    assert "converter failed …" in md and "Traceback" not in md
    assert "File &quot;convert.py&quot;" in (report / "report.html").read_text()


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(tmp_path):
    run = chunked_run(tmp_path / "r", {"base": BASE, "v": BASE})
    store.atomic_write_json(run / "v" / "error.json", {"error": '=HYPERLINK("http://x","y")', "traceback": ""})
    rows = list(csv.DictReader(io.StringIO((write_report(run) / "degradation.csv").read_text())))
    assert rows[1]["error"] == '\'=HYPERLINK("http://x","y")'
    assert float(rows[1]["GSM8K_diff"]) == 0  # numbers stay numbers


def test_seed_must_be_a_non_negative_integer():
    recipe = {"name": "t", "model": {"id": "a/b"}, "variants": {"f": [{"stage": "fp8"}]}, "eval": {"seed": -1}}
    with pytest.raises(RecipeError, match="seed"):
        parse_recipe(recipe)


def test_an_older_record_nested_in_another_is_never_deleted_with_it(tmp_path):
    """A first-N record at <row>/eval/<task> with random-order chunks inside it (the old layout): the
    outer record verifies without them, and recomputing it keeps them."""
    outer = tmp_path / "base" / "eval" / "gsm8k"
    write = lambda text: lambda tmp: (tmp / "samples.jsonl").write_text(text) and {}
    store.cached(outer, "first-n", write("outer\n"), "outer")
    inner = outer / "items-000000-000020"
    store.cached(inner, "chunk", write("inner\n"), "inner")
    assert store.verify(outer, "first-n")[0] is not None  # the chunk inside is not one of its files
    _, reused = store.cached(outer, "first-n-v2", write("outer v2\n"), "outer")
    assert not reused and (outer / "samples.jsonl").read_text() == "outer v2\n"
    assert store.verify(inner, "chunk")[0] is not None  # the nested record survived the recompute


def test_a_record_replaced_by_a_symlink_is_recomputed_and_its_target_untouched(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not ours")
    folder = tmp_path / "run" / "v" / "eval-random" / "seed-0" / "gsm8k" / "items-000000-000020"
    folder.parent.mkdir(parents=True)
    os.symlink(target, folder)
    assert store.verify(folder, "k")[1] == "a symbolic link, not a stored record"
    rec, reused = store.cached(folder, "k", lambda tmp: (tmp / "samples.jsonl").write_text("x\n") and {}, "chunk")
    assert not reused and not folder.is_symlink() and (folder / "samples.jsonl").is_file()
    assert (target / "keep.txt").read_text() == "not ours"


def test_a_base_dequantized_from_a_gguf_type_labels_the_row_on_its_grid(tmp_path):
    """The same-grid effect is named in the table: the base's source type, and the row re-quantized to it."""
    run = chunked_run(tmp_path / "r", {"base": BASE, "same": BASE, "other": BASE})
    plan = json.loads((run / "plan.json").read_text())
    for row, qtype in (("same", "Q4_K_M"), ("other", "Q4_0")):
        meta = {"format": "gguf", "bits": f"GGUF {qtype}", "chain": [{"stage": "gguf", "params": {"type": qtype}}]}
        store.cached(run / row / "stages" / "00-gguf", f"b-{row}", lambda tmp, meta=meta: (tmp / "m.gguf").write_text("x") and meta, "x")
        plan["steps"].append(
            {"id": f"build {row}[0] gguf", "kind": "build", "row": row, "key": f"b-{row}", "path": f"{row}/stages/00-gguf"}
        )
        plan["artifacts"][row] = f"build {row}[0] gguf"
    plan["base"]["gguf_type"] = "Q4_K_M"
    store.atomic_write_json(run / "plan.json", plan)
    md = (write_report(run) / "degradation.md").read_text()
    assert "dequantized from a GGUF Q4_K_M file" in md
    lines = {line.split(":")[0]: line for line in md.splitlines() if line.startswith("- ")}
    assert "same grid as the base's source file, Q4_K_M" in lines["- same"] and "same grid" not in lines["- other"]
