"""Render the typed table: Markdown (two layouts), CSV, model cards; write a run's report as one set.

Layouts: `methods` (one row per method, one column per benchmark, then size, memory and average
drop) and `section7` (the research report's Section 7: benchmarks as rows, methods as columns,
Average Drop as the last row). Every score cell is formatted by `fmt_cell`, in every format.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path

from . import store
from .formatting import fmt_avg, fmt_bytes, fmt_cell, one_line
from .table import Table, build_table

LAYOUTS = ("methods", "section7")


def _footer(t: Table) -> list[str]:
    n = {c.name: max((r.cells[c.name].n for r in t.rows if c.name in r.cells), default=0) for c in t.columns}
    n = {c: k for c, k in n.items() if k}
    return [
        "Scores in % (mean ± standard error over items). Δ: variant minus base in points, with a paired 95% "
        "bootstrap interval over the same items; `*` marks a difference significant at p < 0.05 (exact McNemar "
        "test for 0/1 metrics, paired bootstrap otherwise). Avg drop: the mean over benchmarks of the relative "
        "drop (base − variant) / base, in %, both on the items the two rows share, over the benchmarks where the base "
        "scores above 0 there. Items per benchmark: " + ", ".join(f"{c} {k}" for c, k in n.items()) + ".",
        "; ".join(f"{c.name}: {c.label}" + (f" ({c.n_shot}-shot)" if c.n_shot is not None else "") for c in t.columns)
        + ". Size: bytes on disk of the artifact's files. Weights in memory: the loaded model's weights as evaluated "
        "(dequantized on CPU; llama.cpp's model buffers for GGUF). Peak memory: the largest growth of the resident set "
        "(CPU) or CUDA allocation (GPU) over what the process held before the row's model was loaded (freed heap "
        "released first), while evaluating the row: the same whatever ran before it.",
    ]


def _methods(t: Table) -> list[str]:
    cols = [c.name for c in t.columns]
    lines = [
        "| Method | Bits | " + " | ".join(cols) + " | Size | Weights in memory | Peak memory | Avg drop |",
        "|---|---|" + "---|" * len(cols) + "---|---|---|---|",
    ]
    for r in t.rows:
        if r.error and not r.cells:
            lines.append(
                f"| {r.name} | {r.bits or '–'} | " + " | ".join(["failed"] * len(cols)) + f" | – | – | – | error: {one_line(r.error, 80)} |"
            )
            continue
        lines.append(
            f"| {r.name} | {r.bits or '–'} | "
            + " | ".join(fmt_cell(r.cells.get(c)) for c in cols)
            + f" | {fmt_bytes(r.size_bytes)} | {fmt_bytes(r.weights_bytes)} | {fmt_bytes(r.peak_memory_bytes)} | {fmt_avg(r)} |"
        )
    return lines


def _section7(t: Table) -> list[str]:
    lines = ["| Benchmark | " + " | ".join(r.name for r in t.rows) + " |", "|---|" + "---|" * len(t.rows)]
    for c in t.columns:
        lines.append(f"| {c.name} | " + " | ".join(fmt_cell(r.cells.get(c.name)) for r in t.rows) + " |")
    lines.append("| Bits | " + " | ".join(str(r.bits or "–") for r in t.rows) + " |")
    lines.append("| Size | " + " | ".join(fmt_bytes(r.size_bytes) for r in t.rows) + " |")
    lines.append("| Weights in memory | " + " | ".join(fmt_bytes(r.weights_bytes) for r in t.rows) + " |")
    lines.append("| Peak memory | " + " | ".join(fmt_bytes(r.peak_memory_bytes) for r in t.rows) + " |")
    lines.append("| **Average Drop** | " + " | ".join(fmt_avg(r) for r in t.rows) + " |")
    return lines


def _divergence(t: Table) -> list[str]:
    rows = [r for r in t.rows if r.divergence]
    if not rows:
        return []
    sets = sorted({s for r in rows for s in r.divergence})
    lines = [
        "",
        "Distribution distance to the base (next-token, top-64 coarsened KL; lower is closer):",
        "",
        "| Method | " + " | ".join(f"{s}: KL | {s}: same top-1 | {s}: PPL ratio" for s in sets) + " |",
        "|---|" + "---|---|---|" * len(sets),
    ]
    for r in rows:
        cells = []
        for s in sets:
            d = r.divergence.get(s)
            cells += [f"{d.mean_kl:.4f}", f"{100 * d.top1_agreement:.1f}%", f"{d.ppl_ratio:.3f}"] if d else ["–"] * 3
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    n = {s: max(r.divergence[s].tokens for r in rows if s in r.divergence) for s in sets}
    lines.append(
        "\nTokens: " + ", ".join(f"{s} {n[s]}" for s in sets) + " (docs: stdlib docstrings disjoint from the "
        "calibration corpus; prompts: GSM8K and TruthfulQA questions)."
    )
    return lines


def _grid_note(t: Table, r) -> str:
    """A GGUF row of the type the base was dequantized from: flattered by the same-grid effect."""
    last = r.chain[-1] if r.chain else {}
    if t.base_gguf_type and last.get("stage") == "gguf" and str(last.get("params", {}).get("type", "")).upper() == t.base_gguf_type.upper():
        return f" (same grid as the base's source file, {t.base_gguf_type})"
    return ""


def to_markdown(t: Table, layout: str = "methods", verdict_lines: list[str] | None = None) -> str:
    lines = (_section7 if layout == "section7" else _methods)(t)
    lines += ["", *_footer(t), "", "How each row was evaluated:"]
    lines += [
        f"- {r.name}: {r.evaluated_as or '–'}{_grid_note(t, r)}" + (f" — error: {one_line(r.error)}" if r.error else "") for r in t.rows
    ]
    if t.base_gguf_type:
        lines += [
            "",
            f"The base is itself dequantized from a GGUF {t.base_gguf_type} file, so its weights lie on that type's grid: a row "
            f"re-quantized to {t.base_gguf_type} gets nearly the same weights back and looks nearly lossless for that reason "
            "alone (the same-grid effect, docs/recipes.md); rows of other types are ordinary quantization of this base.",
        ]
    damaged = [f"- {r.name}: {d}" for r in t.rows for d in r.damaged]
    if damaged:
        lines += ["", "Damaged stored records (recomputed by the next run; the scores above stop before them):", *damaged]
    lines += _divergence(t)
    if verdict_lines:
        lines += ["", "Deploy gate:", "", "```", *verdict_lines, "```"]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = [c.name for c in t.columns]
    header = ["method", "bits"]
    for c in cols:
        header += [
            c,
            f"{c}_stderr",
            f"{c}_n",
            f"{c}_diff",
            f"{c}_ci_low",
            f"{c}_ci_high",
            f"{c}_p",
            f"{c}_flips_c2w",
            f"{c}_flips_w2c",
        ]
    w.writerow(
        header
        + [
            "size_bytes",
            "weights_bytes",
            "peak_memory_bytes",
            "avg_drop_pct",
            "kl_docs",
            "top1_docs",
            "ppl_ratio_docs",
            "evaluated_as",
            "error",
        ]
    )
    for r in t.rows:
        row = [_cell_text(r.name), _cell_text(r.bits or "")]
        for c in cols:
            cell = r.cells.get(c)
            p = cell.paired if cell else None
            row += ["", "", ""] if cell is None else [cell.score, cell.stderr, cell.n]
            row += (
                [""] * 6 if p is None else [p.diff, p.ci_low, p.ci_high, p.p_value, _blank(p.correct_to_wrong), _blank(p.wrong_to_correct)]
            )
        d = r.divergence.get("docs")
        w.writerow(
            row
            + [
                r.size_bytes or "",
                r.weights_bytes or "",
                r.peak_memory_bytes or "",
                _blank(r.avg_drop_pct),
                *(["", "", ""] if d is None else [d.mean_kl, d.top1_agreement, d.ppl_ratio]),
                _cell_text(r.evaluated_as),
                _cell_text(r.error or ""),
            ]
        )
    return buf.getvalue()


def _blank(x):
    return "" if x is None else x


def _cell_text(s: str) -> str:
    """Text that a spreadsheet would run as a formula (plug-ins control names, bits and messages) is
    quoted with a leading apostrophe (OWASP's CSV-injection advice)."""
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s


def model_card(t: Table, name: str) -> str:
    """A Markdown snippet for one variant's model card: its row next to the base, and how measured."""
    cols = [c.name for c in t.columns]
    r = t.row(name)
    lines = [
        f"## Quantization quality: {name}",
        "",
        "| Method | Bits | " + " | ".join(cols) + " | Avg drop |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    for x in (t.base, r):
        lines.append(f"| {x.name} | {x.bits or '–'} | " + " | ".join(fmt_cell(x.cells.get(c)) for c in cols) + f" | {fmt_avg(x)} |")
    chain = " → ".join(f"{s['stage']}({', '.join(f'{k}={v}' for k, v in s['params'].items())})" for s in r.chain)
    n = ", ".join(f"{c} {r.cells[c].n}" for c in cols if c in r.cells)
    lines += [
        "",
        f"Measured with quantpipe on lm-eval's stock tasks ({n} items; paired with the base on the same items).",
        f"Stages: {chain or '–'}.",
        f"Evaluated as: {r.evaluated_as or '–'}.",
    ]
    d = r.divergence.get("docs")
    if d:
        lines.append(
            f"Next-token KL to base {d.mean_kl:.4f}, same top-1 token {100 * d.top1_agreement:.1f}%, "
            f"perplexity ratio {d.ppl_ratio:.3f} ({d.tokens} tokens)."
        )
    return "\n".join(lines) + "\n"


def _card_name(row: str) -> str:
    return f"{row}.md"


def write_report(root: Path, gate_cfg=None) -> Path:
    """Build the table and write every report file as one set: a fresh folder, switched into place
    atomically (`report` is a symlink to it), so a reader never sees files from two runs."""
    from .gate import stored_config
    from .report_html import to_html

    t = build_table(root)
    gate_cfg = gate_cfg or stored_config(root)
    verdict = verdict_lines = None
    if gate_cfg is not None and gate_cfg.has_thresholds():
        from .gate import evaluate_gate, summary

        verdict = evaluate_gate(t, gate_cfg)
        verdict_lines = summary(verdict).split("\n")
    # sortable by time; two reports of one process within a second stay apart
    version = root / ".reports" / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}-{os.getpid()}"
    version.mkdir(parents=True)
    (version / "degradation.md").write_text(f"# {t.recipe}: quality degradation\n\n" + to_markdown(t, "methods", verdict_lines))
    (version / "degradation-section7.md").write_text(
        f"# {t.recipe}: quality degradation (Section 7 layout)\n\n" + to_markdown(t, "section7", verdict_lines)
    )
    (version / "degradation.csv").write_text(to_csv(t))
    (version / "degradation.json").write_text(store.dumps(t.to_dict(), indent=1) + "\n")
    (version / "report.html").write_text(to_html(t, verdict))
    if verdict:
        (version / "gate.json").write_text(store.dumps(verdict.to_dict(), indent=1) + "\n")
    for r in t.rows:
        if not r.is_base and r.cells:
            (version / "model-cards").mkdir(exist_ok=True)
            (version / "model-cards" / _card_name(r.name)).write_text(model_card(t, r.name))
    link, tmp_link = root / "report", root / f".report.tmp-{os.getpid()}"
    if link.is_dir() and not link.is_symlink():  # a report folder written by an older quantpipe
        shutil.rmtree(link)
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(version.relative_to(root))
    os.replace(tmp_link, link)
    # keep the previous set too: a reader that resolved the old link a moment ago can still finish
    for old in sorted((root / ".reports").iterdir())[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return link
