"""`quantpipe plan`: how many items each check needs, and how long that takes on this machine.

From a run's stored per-item results (or a pilot: the first round of a random-order run), per
variant and benchmark with a margin: the observed drop and its per-item spread, the items a
fixed-n design needs to decide at the stated error rates and power, the items the sequential gate
is expected to need, and the wall time both cost at the measured seconds per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import sequential as sq
from . import store
from .errors import QuantpipeError
from .gate import GateConfig
from .table import Table, build_table
from .tasks import COLUMN_SIZES, COLUMNS


@dataclass
class Need:
    variant: str
    column: str
    margin_pts: float
    n: int
    drop_pts: float
    sd: float
    fixed_n: int
    sequential: int | None
    seconds_per_item: float | None
    size: int | None = None  # items the benchmark has

    def room(self) -> str:
        """Whether the benchmark holds the items a design needs: a check needing more can never decide there."""
        if self.size is None:
            return "–"
        short = [name for name, n in (("fixed-n", self.fixed_n), ("sequential", self.sequential)) if n is not None and n > self.size]
        return f"{self.size}" if not short else f"{self.size}: too few for {' and '.join(short)}"

    def hours(self, items: int | None) -> str:
        if items is None or self.seconds_per_item is None:
            return "–"
        s = items * self.seconds_per_item * 2  # the base and the variant each evaluate the items
        return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


def seconds_per_item(root: Path, index: dict) -> dict[str, float]:
    """column -> measured evaluation seconds per item on this machine (mean over the stored records)."""
    spent: dict[str, list[float]] = {}
    for s in index["steps"]:
        if s["kind"] != "eval":
            continue
        rec, _ = store.verify(root / s["path"], s["key"])
        if rec and rec.meta.get("n_items") and rec.meta.get("seconds"):
            spent.setdefault(s["task"], []).append(rec.meta["seconds"] / rec.meta["n_items"])
    return {t.column.name: float(np.mean(spent[t.name])) for t in COLUMNS if t.name in spent}


def planning_sd(d: np.ndarray) -> float:
    """The per-item SD to size a design with: the observed one, or, where no pair differed (a
    pilot says nothing about the spread), the SD of a 3/n rate of +-1 differences (rule of three:
    the 95% upper bound of a rate never seen in n items); otherwise a 1-item "design" results."""
    sd = float(d.std(ddof=1))
    return sd if sd > 0 else float(np.sqrt(3 / len(d)))


def needs(t: Table, cfg: GateConfig, per_item: dict[str, float], power: float = 0.9) -> list[Need]:
    from .gate import paired_items

    base, out = t.base, []
    for row in t.rows[1:]:
        cols = [c for c in row.cells if c in base.cells and cfg.limit(c) is not None]
        for col in cols:
            b, v, _ = paired_items(base.cells[col], row.cells[col])
            d = b - v
            if len(d) < 2:
                continue
            margin = cfg.limit(col) / 100
            sd = planning_sd(d)
            # plan for the observed drop, kept off the margin itself (where no design decides)
            drop = float(d.mean())
            true = min(drop, margin - 0.25 * margin) if drop < margin else max(drop, margin + 0.25 * margin)
            out.append(
                Need(
                    row.name,
                    col,
                    100 * margin,
                    len(d),
                    100 * drop,
                    sd,
                    sq.fixed_n_items(sd, margin, cfg.alpha, power, true, len(cols)),
                    sq.sequential_items(sd, margin, cfg.alpha, true, len(cols), cfg.method),
                    per_item.get(col),
                    COLUMN_SIZES.get(col),
                )
            )
    return out


def render(rows: list[Need], power: float) -> str:
    lines = [
        f"| Variant | Benchmark | Margin | Items so far | Drop (pts) | SD per item | Fixed-n items (power {power:g}) "
        "| Sequential items (expected) | Fixed-n time | Sequential time | Items in the benchmark |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.column} | {r.margin_pts:g} | {r.n} | {r.drop_pts:+.2f} | {r.sd:.3f} | {r.fixed_n} | "
            f"{r.sequential or '–'} | {r.hours(r.fixed_n)} | {r.hours(r.sequential)} | {r.room()} |"
        )
    lines += [
        "",
        "Drop and SD are from the stored paired items; each design is sized for the observed drop (held at least a "
        "quarter margin off the margin). Times: seconds per item measured in this run's evaluations, for the base and the "
        "variant. Sequential items are a plug-in estimate (pipeline.sequential.sequential_items); docs/statistics.md "
        'has simulated averages. A check whose design needs more items than its benchmark has ("too few") cannot '
        "decide at that margin on that benchmark: widen its margin or decide it on a larger benchmark.",
    ]
    return "\n".join(lines) + "\n"


def plan_report(root: Path, cfg: GateConfig, power: float = 0.9) -> str:
    index = store.read_json(root / "plan.json")
    if not isinstance(index, dict):
        raise QuantpipeError(f"no stored results in {root}; run a pilot first: quantpipe plan RECIPE --pilot")
    rows = needs(build_table(root), cfg, seconds_per_item(root, index), power)
    if not rows:
        raise QuantpipeError("no variant has paired results on a benchmark with a margin; run a pilot (--pilot)")
    return render(rows, power)
