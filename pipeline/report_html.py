"""The single-file HTML report (inline CSS and SVG, no network to view it) and model-card snippets."""

from __future__ import annotations

import html
import math

from .formatting import fmt_avg, fmt_bytes, fmt_delta, fmt_score
from .table import Cell, Row, Table

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79"]


def bits_per_param(r: Row, n_params: int | None) -> float | None:
    if not n_params or not r.size_bytes:
        return None
    return 8 * r.size_bytes / n_params


def _plot(t: Table, column: str, w: int = 420, h: int = 260) -> str:
    pts = []
    for i, r in enumerate(t.rows):
        c = r.cells.get(column)
        x = bits_per_param(r, t.n_params)
        if c and x:
            se = 0 if math.isnan(c.stderr) else c.stderr
            pts.append((r.name, x, 100 * c.score, 100 * se, COLORS[i % len(COLORS)]))
    if not pts:
        return f"<p>No {html.escape(column)} scores.</p>"
    pad_l, pad_b, pad_t, pad_r = 44, 34, 22, 10
    xs = [p[1] for p in pts]
    x0, x1 = math.log2(min(xs)) - 0.3, math.log2(max(xs)) + 0.3
    y0 = max(0.0, min(p[2] - p[3] for p in pts) - 5)
    y1 = min(100.0, max(p[2] + p[3] for p in pts) + 5)
    if y1 - y0 < 1:
        y1 = y0 + 1

    def sx(x):
        return pad_l + (math.log2(x) - x0) / (x1 - x0) * (w - pad_l - pad_r)

    def sy(y):
        return h - pad_b - (y - y0) / (y1 - y0) * (h - pad_b - pad_t)

    out = [
        f'<svg class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(column)} vs bits">',
        f'<text x="{w / 2}" y="14" text-anchor="middle" font-weight="bold">{html.escape(column)}</text>',
        f'<line x1="{pad_l}" y1="{h - pad_b}" x2="{w - pad_r}" y2="{h - pad_b}" stroke="#333"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{h - pad_b}" stroke="#333"/>',
        f'<text x="{w / 2}" y="{h - 4}" text-anchor="middle" font-size="11">bits per parameter on disk (log scale)</text>',
    ]
    for b in (2, 4, 8, 16, 32):
        if 2**x0 <= b <= 2**x1:
            out.append(f'<text x="{sx(b):.1f}" y="{h - pad_b + 14}" text-anchor="middle" font-size="10">{b}</text>')
    for k in range(5):
        y = y0 + k * (y1 - y0) / 4
        out.append(f'<text x="{pad_l - 4}" y="{sy(y) + 3:.1f}" text-anchor="end" font-size="10">{y:.0f}</text>')
    for name, x, y, se, color in pts:
        out.append(f'<line x1="{sx(x):.1f}" y1="{sy(y - se):.1f}" x2="{sx(x):.1f}" y2="{sy(y + se):.1f}" stroke="{color}"/>')
        out.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{color}"><title>{html.escape(name)}: {y:.1f} ± {se:.1f}</title></circle>'
        )
    out.append("</svg>")
    return "".join(out)


def _cell(c: Cell | None) -> str:
    if not c:
        return "<td>–</td>"
    s = fmt_score(c)
    p = c.paired
    if p and p.n:
        cls = "sig" if p.significant else "ns"
        flips = (
            f"<br><small>flips −{p.correct_to_wrong} / +{p.wrong_to_correct} ({p.flip_pct:.1f}%)</small>"
            if p.correct_to_wrong is not None
            else ""
        )
        s += f"<br><span class='{cls}'>{html.escape(fmt_delta(c))}</span>{flips}"
    return f"<td>{s}</td>"


def _verdict(verdict) -> str:
    if verdict is None:
        return ""
    rows = "".join(
        f"<tr class='{c.status}'><th>{html.escape(c.variant)}</th><td>{html.escape(c.check)}</td><td>{c.status.upper()}</td>"
        f"<td>{'' if c.n is None else c.n}</td><td>{html.escape(c.interval_text())}</td><td>{html.escape(c.message)}</td></tr>"
        for c in verdict.checks
    )
    return (
        f"<h2>Deploy gate: {verdict.status.upper()} (exit {verdict.exit_code})</h2>"
        "<table><tr><th>Variant</th><th>check</th><th>decision</th><th>items</th><th>interval</th><th>why</th></tr>"
        f"{rows}</table>"
    )


def to_html(t: Table, verdict=None) -> str:
    cols = [c.name for c in t.columns]
    rows = []
    for r in t.rows:
        err = f"<br><span class='err'>error: {html.escape(r.error)}</span>" if r.error else ""
        err += "".join(f"<br><span class='err'>damaged record: {html.escape(d)}</span>" for d in r.damaged)
        rows.append(
            f"<tr><th>{html.escape(r.name)}{err}</th><td>{html.escape(str(r.bits or '–'))}</td>"
            + "".join(_cell(r.cells.get(c)) for c in cols)
            + f"<td>{fmt_bytes(r.size_bytes)}</td><td>{fmt_bytes(r.weights_bytes)}</td><td>{fmt_bytes(r.peak_memory_bytes)}</td><td>{fmt_avg(r)}</td></tr>"
        )
    div = []
    for r in t.rows:
        for name, d in r.divergence.items():
            div.append(
                f"<tr><th>{html.escape(r.name)}</th><td>{html.escape(name)}</td><td>{d.mean_kl:.4f}</td>"
                f"<td>{100 * d.top1_agreement:.1f}%</td><td>{d.ppl_ratio:.3f}</td><td>{d.tokens}</td></tr>"
            )
    how = "".join(f"<li><b>{html.escape(r.name)}</b>: {html.escape(r.evaluated_as or '–')}</li>" for r in t.rows)
    plots = "".join(_plot(t, c) for c in cols)
    legend = "".join(
        f'<span class="key"><svg width="12" height="12"><circle cx="6" cy="6" r="5" fill="{COLORS[i % len(COLORS)]}"/></svg> '
        f"{html.escape(r.name)}</span>"
        for i, r in enumerate(t.rows)
    )
    title = html.escape(t.recipe)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} — quantpipe report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 12px 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; vertical-align: top; }}
th {{ background: #f5f5f5; text-align: left; }} .sig {{ color: #b00; font-weight: bold; }} .ns {{ color: #666; }}
tr.fail td {{ color: #b00; }} tr.pass td {{ color: #070; }} tr.undecided td, tr.error td {{ color: #a60; }}
.err {{ color: #b00; font-weight: normal; font-size: 11px; }} .plots {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.plot {{ border: 1px solid #ddd; background: #fff; }} .legend {{ margin: 6px 0; }} .key {{ margin-right: 14px; font-size: 13px; white-space: nowrap; }} small {{ color: #555; }}
</style></head><body>
<h1>{title}: quality degradation</h1>
<table><tr><th>Method</th><th>Bits</th>{"".join(f"<th>{html.escape(c)}</th>" for c in cols)}<th>Size</th><th>Weights in memory</th><th>Peak memory</th><th>Avg drop</th></tr>
{"".join(rows)}</table>
<p>Scores in % (mean ± standard error). Δ: variant − base in points with a paired 95% bootstrap interval over the same items;
<span class="sig">red *</span> marks p &lt; 0.05 (exact McNemar for 0/1 metrics). Flips: correct→wrong / wrong→correct.
Avg drop: mean relative drop over benchmarks. Weights in memory: the model as loaded for evaluation. Peak memory: largest resident set (CPU) or CUDA allocation while evaluating.</p>
{_verdict(verdict)}
<h2>Quality vs size</h2><div class="legend">{legend}</div><div class="plots">{plots}</div>
<p><small>x: artifact bytes × 8 / base parameters (embeddings and unquantized layers included; KV-cache rows share
their weights' size). Error bars: ± one standard error.</small></p>
<h2>Distribution distance to the base</h2>
<table><tr><th>Method</th><th>text</th><th>mean KL</th><th>same top-1</th><th>PPL ratio</th><th>tokens</th></tr>{"".join(div)}</table>
<h2>How each row was evaluated</h2><ul>{how}</ul>
</body></html>
"""
