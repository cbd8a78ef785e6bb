"""Time to decision: the sequential gate against a fixed-n design, on the SmolLM2 recipe.

    .venv/bin/python benchmarks/time_to_decision.py                      # the recorded configuration
    .venv/bin/python benchmarks/time_to_decision.py --variants fp8 --mmlu 400 --tqa 200 --gsm8k 40   # a quick look

Runs `quantpipe run --until-decided` on the SmolLM2-135M recipe's variants with MMLU (5-shot, drawn
from the full 14,042-item test split in a seeded, per-subject stratified random order), TruthfulQA
MC2 and GSM8K, margin 3 points on each, item budgets as given. Then prints, per variant and
benchmark: the decision, items used and wall time (the variant's and the base's share of that
benchmark's evaluation seconds), next to the items a fixed-n design needs for the same error rates
(alpha 0.05 family-wise over the variant's checks, Bonferroni) and power 0.9, at the observed spread:
- fixed-n(0): the design one commits to before seeing any data, powered to pass a lossless variant
  (true drop 0; the same n fails a variant that lost twice the margin with the same power). The
  item goal (at most 50% of fixed-n items on average) is measured against it;
- fixed-n(observed): the design an oracle would plan for the drop this check actually showed
  (|margin - observed drop| as the effect), for reference; it needs no items where the observed drop
  is far from the margin and unboundedly many where it sits on it.

With --fixed-n-check the benchmark also evaluates each pair up to its fixed-n size (reusing every
stored chunk) and reports the fixed-n design's own verdict (one-sided z-tests at alpha/k), so
verdicts can be compared wherever both decide.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work" / "time-to-decision"
sys.path.insert(0, str(ROOT))

from pipeline import sequential as sq  # noqa: E402
from pipeline.gate import GateConfig, paired_items  # noqa: E402
from pipeline.items_needed import planning_sd  # noqa: E402
from pipeline.table import build_table  # noqa: E402

BASE_RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
COLUMN_TASK = {"MMLU": "mmlu", "TruthfulQA": "truthfulqa_mc2", "GSM8K": "gsm8k"}


def make_recipe(variants: list[str], budgets: dict[str, int], margin: float, name: str) -> Path:
    base = yaml.safe_load(BASE_RECIPE.read_text())
    recipe = {
        **base,
        "name": name,
        "eval": {
            "suite": "full",
            "data_dir": str((ROOT / "recipes" / base["eval"]["data_dir"]).resolve()),
            "order": "random",
            "chunk_items": 50,
            "round_growth": 1.5,
            "tasks": {"humaneval": None, "truthfulqa_mc1": None, **{t: {"limit": n} for t, n in budgets.items()}},
        },
        "variants": {v: base["variants"][v] for v in variants},
        "gate": {"max_drop": {"default": margin}, "until_decided": True},
    }
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(recipe: Path) -> float:
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--artifacts", str(WORK / "art")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if r.returncode:
        sys.exit(f"quantpipe run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.time() - t0


def seconds(root: Path, row: str, task: str) -> float:
    index = json.loads((root / "plan.json").read_text())
    total = 0.0
    for s in index["steps"]:
        mf = root / s["path"] / "manifest.json"
        if s["kind"] == "eval" and s["row"] == row and s["task"] == task and mf.is_file():
            total += json.loads(mf.read_text())["meta"].get("seconds") or 0.0
    return total


def fixed_n_verdict(d: np.ndarray, margin: float, alpha: float) -> str:
    """One-sided z-tests of a fixed-n design on its n items: pass if the upper bound < margin."""
    from scipy.stats import norm

    z = norm.ppf(1 - alpha)
    half = z * d.std(ddof=1) / np.sqrt(len(d))
    return "pass" if d.mean() + half < margin else "fail" if d.mean() - half > margin else "undecided"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["fp8", "gptq-4bit", "gguf-q4_k_m", "tq-k3v4-stress"])
    ap.add_argument("--mmlu", type=int, default=2000, help="MMLU item budget (of 14,042)")
    ap.add_argument("--tqa", type=int, default=817, help="TruthfulQA MC2 item budget (of 817)")
    ap.add_argument("--gsm8k", type=int, default=150, help="GSM8K item budget (of 1,319)")
    ap.add_argument("--margin", type=float, default=3.0, help="points")
    ap.add_argument("--fixed-n-check", action="store_true", help="also evaluate up to each fixed-n size and compare verdicts")
    a = ap.parse_args()
    budgets = {"mmlu": a.mmlu, "truthfulqa_mc2": a.tqa, "gsm8k": a.gsm8k}
    recipe = make_recipe(a.variants, budgets, a.margin, "ttd")
    wall = run(recipe)
    root = WORK / "art" / "ttd"
    table = build_table(root)
    cfg = GateConfig(max_drop={"default": a.margin}, until_decided=True)
    from pipeline.gate import evaluate_gate

    verdict = {(c.variant, c.check): c for c in evaluate_gate(table, cfg).checks}
    print(f"quantpipe run --until-decided: {wall:.0f} s wall; budgets {budgets}; margin {a.margin} points\n")
    rows = []
    for row in table.rows[1:]:
        k = sum(1 for c in row.cells if c in COLUMN_TASK)
        for col in [c for c in COLUMN_TASK if c in row.cells]:
            b, v, _ = paired_items(table.base.cells[col], row.cells[col])
            d, margin = b - v, a.margin / 100
            sd = planning_sd(d)
            drop = float(d.mean())
            oracle_drop = drop if abs(margin - drop) >= 1e-4 else margin - 1e-4  # on the margin no design decides
            task = COLUMN_TASK[col]
            base_share = seconds(root, "base", task) * len(d) / max(1, table.base.cells[col].n)
            rows.append(
                {
                    "variant": row.name,
                    "col": col,
                    "k": k,
                    "status": verdict[(row.name, col)].status,
                    "n": len(d),
                    "minutes": (seconds(root, row.name, task) + base_share) / 60,
                    "fixed": sq.fixed_n_items(sd, margin, 0.05, 0.9, 0.0, k),
                    "oracle": sq.fixed_n_items(sd, margin, 0.05, 0.9, oracle_drop, k),
                    "drop": 100 * drop,
                    "fixed_verdict": "–",
                }
            )
    if a.fixed_n_check:  # evaluate every pair up to its fixed-n size (stored chunks are reused), then test at fixed n
        split = {"mmlu": 14042, "truthfulqa_mc2": 817, "gsm8k": 1319}
        need = {t: min(split[t], max([r["fixed"] for r in rows if COLUMN_TASK[r["col"]] == t] + [budgets[t]])) for t in budgets}
        extended = make_recipe(a.variants, need, a.margin, "ttd")
        data = yaml.safe_load(extended.read_text())
        data["gate"]["until_decided"] = False
        extended.write_text(yaml.safe_dump(data, sort_keys=False))
        run(extended)
        full = build_table(root)
        for r in rows:
            b, v, _ = paired_items(full.base.cells[r["col"]], full.row(r["variant"]).cells[r["col"]])
            d = (b - v)[: r["fixed"]]
            r["fixed_verdict"] = (
                fixed_n_verdict(d, a.margin / 100, 0.05 / r["k"])
                if len(d) >= r["fixed"]
                else f"needs {r['fixed']} > {len(d)} items in the split"
            )
    print(
        "| Variant | Benchmark | Observed drop | Decision | Items used | Wall time (variant + base share) | Fixed-n(0) items "
        "| Used / fixed-n(0) | Fixed-n(observed) items | Fixed-n verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['col']} | {r['drop']:+.1f} | {r['status']} | {r['n']} | {r['minutes']:.1f} min | {r['fixed']} | "
            f"{r['n'] / r['fixed']:.2f} | {r['oracle']} | {r['fixed_verdict']} |"
        )
    decided = [r["n"] / r["fixed"] for r in rows if r["status"] in ("pass", "fail")]
    open_ = [r for r in rows if r["status"] not in ("pass", "fail")]
    if decided:  # the goal's measure: an undecided check's ratio is the budget's, not a saving
        print(f"\nMean items used / fixed-n(0) items over the {len(decided)} decided checks: {np.mean(decided):.2f}.")
    if open_:
        print(
            f"Undecided at the budget: {len(open_)} of {len(rows)} checks "
            f"({', '.join(r['variant'] + ' / ' + r['col'] for r in open_)}); `quantpipe plan` sizes them from these items."
        )
    both = [r for r in rows if r["status"] in ("pass", "fail") and r["fixed_verdict"] in ("pass", "fail")]
    if both:
        print(f"Verdicts agree where both decide: {sum(r['status'] == r['fixed_verdict'] for r in both)} of {len(both)}.")


if __name__ == "__main__":
    main()
