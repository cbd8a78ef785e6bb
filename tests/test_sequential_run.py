"""Sequential evaluation end to end: the random item order, budgets that extend, rounds that stop
when the gate decides, and a SIGKILL mid-run that resumes without redoing finished rounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_pipeline import quantpipe, record, step_lines, table_numbers

pytestmark = pytest.mark.slow

TQ = [{"stage": "turboquant", "preset": "turboquant_3bit_nc", "skip_layers": [], "mode": "stress"}]


def write_recipe(tmp: Path, model: Path, data_dir: Path, limit: int, gate: dict | None = None, name="seq") -> Path:
    recipe = {
        "name": name,
        "model": {"id": str(model), "dtype": "float32"},
        "offline": True,
        "eval": {
            "suite": "smoke",
            "data_dir": str(data_dir),
            "order": "random",
            "chunk_items": 20,
            "tasks": {"humaneval": None, "gsm8k": None, "truthfulqa_mc1": None, "mmlu": None, "truthfulqa_mc2": {"limit": limit}},
        },
        "variants": {"tq": TQ},
    }
    if gate:
        recipe["gate"] = gate
    path = tmp / f"{name}-{limit}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def eval_records(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.glob("*/eval-random/seed-*/*/items-*/manifest.json")}


def test_a_larger_budget_evaluates_only_the_new_items(tiny_model, data_dir, tmp_path):
    art = tmp_path / "art"
    quantpipe("run", write_recipe(tmp_path, tiny_model, data_dir, 40), "--artifacts", art)
    root = art / "seq"
    before = eval_records(root)
    assert len(before) == 4  # 2 rows x 2 chunks of 20
    r = quantpipe("run", write_recipe(tmp_path, tiny_model, data_dir, 80), "--artifacts", art)
    evals = [line for line in step_lines(r.stderr) if "] eval " in line]
    computed = [line for line in evals if not line.endswith("reused")]
    assert len(evals) == 8 and len(computed) == 4, evals
    assert all(" 40-60:" in line or " 60-80:" in line for line in computed), computed
    for p, mtime in before.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was recomputed"
    # the model saw exactly the 40 new items per row: the new records hold 40 items, all distinct from the old ones
    new = [p for p in eval_records(root) if p not in before]
    assert sum(record(p.parent)["meta"]["n_items"] for p in new) == 2 * 40
    items = Counter()
    for p in eval_records(root):
        if "/base/" in str(p):
            items.update(json.loads(line)["doc_hash"] for line in (p.parent / "samples.jsonl").read_text().splitlines())
    assert len(items) == 80 and max(items.values()) == 1
    assert {b: v[1] for b, v in table_numbers(root)["tq"].items()} == {"TruthfulQA": 80}


def test_until_decided_stops_when_decided_and_resumes_after_sigkill(tiny_model, data_dir, tmp_path):
    art = tmp_path / "art"
    # a margin of 40 points: the identical-weights TurboQuant row is decided (pass) after its first round
    decided = write_recipe(tmp_path, tiny_model, data_dir, 160, gate={"max_drop": {"default": 40}}, name="easy")
    r = quantpipe("run", decided, "--artifacts", art, "--until-decided")
    assert "every check is decided after round 0" in r.stderr
    assert len(eval_records(art / "easy")) == 2  # one chunk per row, of the 8 the budget allows
    assert "PASS      tq / TruthfulQA [20 items]" in r.stdout

    # a margin of 0.5 points cannot be decided within 80 items: every round runs, and a kill mid-way resumes
    hard = write_recipe(tmp_path, tiny_model, data_dir, 80, gate={"max_drop": {"default": 0.5}, "until_decided": True}, name="hard")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", hard, "--artifacts", art], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = art / "hard" / "tq" / "eval-random" / "seed-0" / "truthfulqa_mc2" / "items-000020-000040" / "manifest.json"
    deadline = time.time() + 1200
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # rounds 0 and 1 done, round 2 not
    proc.wait()
    done = eval_records(art / "hard")
    assert marker in done and len(done) == 4
    r = quantpipe("run", hard, "--artifacts", art)
    for p, mtime in done.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was redone"
    assert "round 2: 1 undecided check(s): tq/TruthfulQA" in r.stderr and "item budget reached" in r.stderr
    assert len(eval_records(art / "hard")) == 8
    assert "UNDECIDED tq / TruthfulQA [80 items]" in r.stdout and "more items would decide" in r.stdout
    g = quantpipe("gate", art / "hard", check=False)
    assert g.returncode == 2 and "UNDECIDED" in g.stdout


def test_random_order_is_seeded_nested_and_stratified(tiny_model, data_dir, tmp_path):
    from pipeline.evaluation import Evaluator
    from pipeline.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, tiny_model, data_dir, 40))
    recipe.eval.tasks["mmlu"] = None  # the smoke suite's mmlu again, read in random order
    recipe.eval.tasks.pop("mmlu")
    ev = Evaluator(recipe, tmp_path / "work", False)
    order = ev.item_order("mmlu")
    assert len(order) == 14042 and len(set(order)) == 14042
    sizes = Counter(sub for sub, _ in order)
    prefix = Counter(sub for sub, _ in order[:1404])
    for sub, n in sizes.items():  # every prefix holds each subject in proportion (±1)
        assert abs(prefix[sub] - 1404 * n / 14042) <= 1.0 + 1e-9, sub
    again = Evaluator(recipe, tmp_path / "work2", False).item_order("mmlu")
    assert again == order  # seeded: the same in another process or run
    assert ev.selection("mmlu", 0, 100) == {s: sorted(d for t, d in order[:100] if t == s) for s in {t for t, _ in order[:100]}}
    recipe.eval.seed = 1
    assert Evaluator(recipe, tmp_path / "work3", False).item_order("mmlu")[:50] != order[:50]
    gsm = ev.item_order("truthfulqa_mc2")
    assert sorted(d for _, d in gsm) == list(range(817))
