"""The quality-degradation table, recomputed from stored per-item results.

Layout follows Section 7 of the research report: one row per method, one column per
benchmark, then Size and Average drop. Each score is mean ± standard error over the items;
each variant's drop comes with a paired 95% interval and is marked significant or not.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .artifacts import atomic_write_json, atomic_write_text, read_json
from .evaluation import BENCHMARKS, item_scores
from .stats import fmt_points as _pts
from .stats import mean_stderr, paired


def load_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def _row_scores(row_dir: Path) -> dict[str, dict]:
    out = {}
    for bench in BENCHMARKS:
        rec = read_json(row_dir / "eval" / f"{bench.task}.json")
        samples_path = row_dir / "eval" / f"{bench.task}.samples.jsonl"
        if not rec or not samples_path.is_file():
            continue
        items = item_scores(load_samples(samples_path), bench)
        if items:
            mean, se = mean_stderr(list(items.values()))
            out[bench.column] = {"items": items, "score": mean, "stderr": se, "evaluated_as": rec.get("evaluated_as"),
                                 "n_shot": _n_shot(rec, bench.task)}
    return out


def _n_shot(rec: dict, task: str) -> int | None:
    """Few-shot examples per prompt, as lm-eval reported them (a group: its subtasks' common value)."""
    shots = {int(v) for k, v in (rec.get("n_shot") or {}).items() if k == task or k.startswith(f"{task}_")}
    return shots.pop() if len(shots) == 1 else None



def build_table(root: Path, rows: list[str]) -> dict:
    base = _row_scores(root / "base")
    table = []
    for name in rows:
        d = root / name
        meta = read_json(d / "row.json") or {}
        err = read_json(d / "error.json")
        scores = base if name == "base" else _row_scores(d)
        div = read_json(d / "divergence.json")
        entry = {"row": name, "bits": meta.get("bits") or (meta.get("dtype") if name == "base" else None),
                 "divergence": {k: v for k, v in div.items() if isinstance(v, dict)} if div else None,
                 "format": meta.get("format"), "size_bytes": meta.get("size_bytes"),
                 "chain": meta.get("chain", []), "error": err["error"] if err else None, "benchmarks": {}}
        drops = []
        for bench in BENCHMARKS:
            s = scores.get(bench.column)
            if not s:
                continue
            cell = {"score": s["score"], "stderr": s["stderr"], "n": len(s["items"]), "evaluated_as": s["evaluated_as"]}
            b = base.get(bench.column)
            if name != "base" and b:
                pr = paired(b["items"], s["items"])
                cell["paired"] = pr.to_dict()
                if b["score"] > 0:
                    cell["relative_drop_pct"] = 100 * (b["score"] - s["score"]) / b["score"]
                    drops.append(cell["relative_drop_pct"])
            entry["benchmarks"][bench.column] = cell
        evaluated = {c["evaluated_as"] for c in entry["benchmarks"].values() if c.get("evaluated_as")}
        entry["evaluated_as"] = "; ".join(sorted(evaluated))
        entry["avg_drop_pct"] = sum(drops) / len(drops) if drops else None
        table.append(entry)
    # few-shot count: the base's, as lm-eval reported it (every row runs the same task settings)
    benchmarks = [{**b.__dict__, "n_shot": base.get(b.column, {}).get("n_shot")} for b in BENCHMARKS]
    return {"rows": table, "benchmarks": benchmarks}


def _fmt_size(n):
    return "–" if not n else f"{n / 2**20:.0f} MiB"


def _cell(entry, col):
    c = entry["benchmarks"].get(col)
    if not c:
        return "–"
    text = f"{100 * c['score']:.1f} ± {100 * c['stderr']:.1f}" if not math.isnan(c["stderr"]) else f"{100 * c['score']:.1f}"
    p = c.get("paired")
    if p and p["n"]:
        mark = "*" if p["significant"] else ""
        text += f" (Δ {_pts(p['diff'])} [{_pts(p['ci_low'])}, {_pts(p['ci_high'])}]{mark})"
    return text


def to_markdown(t: dict) -> str:
    cols = [b["column"] for b in t["benchmarks"]]
    lines = ["| Method | Bits | " + " | ".join(cols) + " | Size | Avg drop |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for e in t["rows"]:
        if e["error"] and not e["benchmarks"]:
            lines.append(f"| {e['row']} | {e['bits'] or '–'} | " + " | ".join(["failed"] * len(cols)) + f" | – | error: {e['error'][:80]} |")
            continue
        avg = "reference" if e["row"] == "base" else ("–" if e["avg_drop_pct"] is None else f"{_pts(e['avg_drop_pct'] / 100, sign=False)}%")
        lines.append(f"| {e['row']} | {e['bits'] or '–'} | " + " | ".join(_cell(e, c) for c in cols)
                     + f" | {_fmt_size(e['size_bytes'])} | {avg} |")
    n = {c: max((e["benchmarks"].get(c, {}).get("n", 0) for e in t["rows"]), default=0) for c in cols}
    lines += [
        "",
        "Scores in % (mean ± standard error over items). Δ: variant minus base in points, with a paired 95% "
        "bootstrap interval over the same items; `*` marks a difference significant at p < 0.05 (exact McNemar "
        "test for 0/1 metrics, paired bootstrap otherwise). Avg drop: the mean over benchmarks of the relative "
        "drop (base − variant) / base, in %, over the benchmarks where the base scores above 0. Items per benchmark: " + ", ".join(f"{c} {n[c]}" for c in cols) + ".",
        "; ".join(f"{b['column']}: {b['label']}" + (f" ({b['n_shot']}-shot)" if b.get("n_shot") is not None else "")
                  for b in t["benchmarks"]) + ". Size: bytes on disk of the artifact's files.",
        "",
        "How each row was evaluated:",
    ]
    lines += [f"- {e['row']}: {e['evaluated_as'] or '–'}" + (f" — error: {e['error']}" if e["error"] else "") for e in t["rows"]]
    div_rows = [e for e in t["rows"] if e.get("divergence")]
    if div_rows:
        sets = sorted({s for e in div_rows for s in e["divergence"]})
        lines += ["", "Distribution distance to the base (next-token, top-64 coarsened KL; lower is closer):", "",
                  "| Method | " + " | ".join(f"{s}: KL | {s}: same top-1 | {s}: PPL ratio" for s in sets) + " |",
                  "|---|" + "---|---|---|" * len(sets)]
        for e in div_rows:
            cells = []
            for s in sets:
                d = e["divergence"].get(s)
                cells += [f"{d['mean_kl']:.4f}", f"{100 * d['top1_agreement']:.1f}%", f"{d['ppl_ratio']:.3f}"] if d else ["–"] * 3
            lines.append(f"| {e['row']} | " + " | ".join(cells) + " |")
        n = {s: max(e["divergence"][s]["tokens"] for e in div_rows if s in e["divergence"]) for s in sets}
        lines.append("\nTokens: " + ", ".join(f"{s} {n[s]}" for s in sets) + " (docs: stdlib docstrings disjoint from the "
                     "calibration corpus; prompts: GSM8K and TruthfulQA questions).")
    return "\n".join(lines) + "\n"


def to_csv(t: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = [b["column"] for b in t["benchmarks"]]
    header = ["method", "bits"]
    for c in cols:
        header += [f"{c}", f"{c}_stderr", f"{c}_n", f"{c}_diff", f"{c}_ci_low", f"{c}_ci_high", f"{c}_p", f"{c}_flips_c2w", f"{c}_flips_w2c"]
    w.writerow(header + ["size_bytes", "avg_drop_pct", "kl_docs", "top1_docs", "ppl_ratio_docs", "evaluated_as", "error"])
    for e in t["rows"]:
        row = [e["row"], e["bits"] or ""]
        for c in cols:
            cell = e["benchmarks"].get(c) or {}
            p = cell.get("paired") or {}
            row += [cell.get("score", ""), cell.get("stderr", ""), cell.get("n", ""), p.get("diff", ""), p.get("ci_low", ""),
                    p.get("ci_high", ""), p.get("p_value", ""), p.get("correct_to_wrong", ""), p.get("wrong_to_correct", "")]
        d = (e.get("divergence") or {}).get("docs") or {}
        w.writerow(row + [e["size_bytes"] or "", "" if e["avg_drop_pct"] is None else e["avg_drop_pct"],
                          d.get("mean_kl", ""), d.get("top1_agreement", ""), d.get("ppl_ratio", ""), e["evaluated_as"], e["error"] or ""])
    return buf.getvalue()


def write_report(root: Path, recipe_name: str, rows: list[str] | None = None) -> Path:
    if rows is None and (root / "recipe.json").is_file():
        rows = ["base", *json.loads((root / "recipe.json").read_text())["variant_order"]]
    if rows is None:
        rows = ["base"] + sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("base", "report") and not p.name.startswith("."))
    t = build_table(root, rows)
    t["recipe"] = recipe_name
    out = root / "report"
    md = f"# {recipe_name}: quality degradation\n\n" + to_markdown(t)
    atomic_write_text(out / "degradation.md", md)
    atomic_write_text(out / "degradation.csv", to_csv(t))
    atomic_write_json(out / "degradation.json", t)
    from .report_html import model_card, to_html

    n_params = (read_json(root / "base" / "row.json") or {}).get("n_params")
    atomic_write_text(out / "report.html", to_html(t, n_params))
    for e in t["rows"]:
        if e["row"] != "base" and e["benchmarks"]:
            atomic_write_text(out / "model-cards" / f"{e['row']}.md", model_card(t, e["row"]))
    return out
