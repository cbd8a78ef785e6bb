"""How numbers read, in every format (Markdown, HTML, model cards): one formatter per kind of value."""

from __future__ import annotations

import math

from .table import Cell, Row


def fmt_points(x: float, sign: bool = True) -> str:
    """A fraction as percentage points with one decimal, never printing '-0.0'."""
    v = round(100 * x, 1) + 0.0
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def fmt_score(c: Cell) -> str:
    return f"{100 * c.score:.1f}" + ("" if math.isnan(c.stderr) else f" ± {100 * c.stderr:.1f}")


def fmt_delta(c: Cell) -> str:
    p = c.paired
    if not p or not p.n:
        return ""
    out = f"Δ {fmt_points(p.diff)} [{fmt_points(p.ci_low)}, {fmt_points(p.ci_high)}]" + ("*" if p.significant else "")
    if p.unpaired and p.base_mean is not None:
        # the rows' items differ (a sequential run stops a variant early): both scores on the shared
        # items, so the score beside the Δ is never read against the base's score on other items
        out += f"; {p.n} paired items: base {100 * p.base_mean:.1f}, this {100 * p.variant_mean:.1f}"
    return out


def fmt_cell(c: Cell | None) -> str:
    if c is None:
        return "–"
    delta = fmt_delta(c)
    return fmt_score(c) + (f" ({delta})" if delta else "")


def fmt_avg(r: Row) -> str:
    if r.is_base:
        return "reference"
    return "–" if r.avg_drop_pct is None else f"{fmt_points(r.avg_drop_pct / 100, sign=False)}%"


def fmt_bytes(n: int | None) -> str:
    if not n:
        return "–"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def one_line(text: str, width: int = 120) -> str:
    """A message for a table cell: its first line, shortened (the whole text is in the row's record
    and the HTML report)."""
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()] or [""]
    head = lines[0].replace("|", "/")
    more = len(lines) > 1 or len(head) > width
    return (head[:width] + " …") if more else head
