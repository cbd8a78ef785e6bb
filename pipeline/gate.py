"""The deploy gate: a pure function of (table, config) -> a verdict with an exit code.

Each check is a non-inferiority test (docs/statistics.md). For a benchmark with margin m points:
pass only when the upper confidence bound of the drop (base − variant, paired on the same items)
is below m; fail when the lower bound is above m; otherwise undecided, with the number of further
items the observed variance suggests. The bounds are anytime-valid confidence sequences
(pipeline.sequential), so looking after every round of a sequential run does not inflate the
error; the family-wise error across a variant's checks is held at `alpha` (Holm over anytime-valid
p-values). `min_recovery` is the same test on variant − r·base; `max_kl` uses a bootstrap interval
over the KL text's windows; `max_avg_drop` bounds the average relative drop with the benchmarks'
own bounds. `point_estimate: true` decides on point
estimates instead, and every such check says it is not a test.

A missing row, benchmark or KL, a failed row, a NaN, or a malformed table is an *error* (exit 2),
never a pass. Exit codes: 0 every checked variant passes, 1 some variant fails, 2 error or undecided.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from xml.etree import ElementTree as ET

import numpy as np

from . import sequential as sq
from .recipe import GateConfig
from .table import Cell, Row, Table


@dataclass
class Check:
    variant: str
    check: str
    status: str  # pass | fail | undecided | error
    observed: float | None = None
    threshold: float | None = None
    interval: tuple[float, float] | None = None
    n: int | None = None
    alpha: float | None = None
    more_items: int | None = None  # undecided: further items the observed variance suggests
    message: str = ""

    def interval_text(self) -> str:
        return "" if self.interval is None else f"[{self.interval[0]:.2f}, {self.interval[1]:.2f}]"


@dataclass
class Verdict:
    status: str
    exit_code: int
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"status": self.status, "exit_code": self.exit_code, "checks": [asdict(c) for c in self.checks]}


def _error(variant: str, name: str, message: str) -> Check:
    return Check(variant, name, "error", message=message)


_UNITS = {"drop": ("drop", "pts", 2), "point": ("drop", "pts", 2), "recovery": ("recovery", "%", 1), "kl": ("mean KL", "nats", 4)}


def _message(d: sq.CheckDecision, scale: float) -> str:
    what, unit, digits = _UNITS[d.kind]
    est, lo, hi, thr = (x * scale for x in (d.estimate, d.lo, d.hi, d.threshold))
    head = f"{what} {est:.{digits}f} {unit}"
    if not d.is_test:
        return f"{head} vs {thr:g} (point estimate: not a statistical test)"
    interval = f"interval [{lo:.{digits}f}, {hi:.{digits}f}]"
    higher_is_better = d.kind == "recovery"
    if d.status == "undecided":
        more = f"; about {d.more_items} more items would decide" if d.more_items else ""
        return f"{head}, {interval} still contains {thr:g} after {d.n} items{more}"
    side = "above" if (d.status == "pass") == higher_is_better else "below"
    return f"{head}, {interval} lies {side} {thr:g} (alpha {d.alpha:g} per check, Holm over the variant's checks)"


def _from_decision(variant: str, name: str, d: sq.CheckDecision, scale: float) -> Check:
    interval = None if not d.is_test else (round(d.lo * scale, 4), round(d.hi * scale, 4))
    return Check(
        variant,
        name,
        d.status,
        round(d.estimate * scale, 4),
        round(d.threshold * scale, 4),
        interval,
        d.n,
        d.alpha,
        d.more_items,
        _message(d, scale),
    )


def paired_items(base: Cell, variant: Cell) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Paired scores on the items both rows have, and the looks (items done at each round's end).
    Within a round the items are put in a fixed pseudo-random order (a hash of the item key): the
    confidence sequence assumes exchangeable arrivals, and a task's file order (first-N runs:
    MMLU by subject, items by difficulty) need not be; the order never depends on the scores."""
    bounds = variant.looks or [len(variant.items)]
    keys = list(variant.items)
    order, looks, start = [], [], 0
    for end in bounds:
        block = [k for k in keys[start:end] if k in base.items]
        order += sorted(block, key=lambda k: hashlib.sha256(k.encode()).digest())
        looks.append(len(order))
        start = end
    b = np.array([base.items[k] for k in order], dtype=float)
    return b, np.array([variant.items[k] for k in order], dtype=float), [n for n in looks if n]


def _family(name: str, base: Row, row: Row, cfg: GateConfig) -> tuple[dict[str, object], dict[str, float], list[Check]]:
    """The variant's checks as the statistics module takes them (one family: its error is held at
    alpha across them), their display scales, and the checks that are errors before any test."""
    family, scale, errors = {}, {}, []
    cols = list(dict.fromkeys([*base.cells, *row.cells, *(c for c in cfg.max_drop if c != "default")]))
    for col in cols:
        wants = [(col, cfg.limit(col))] if cfg.limit(col) is not None else []
        if cfg.min_recovery is not None and (col in base.cells or col in row.cells):
            wants.append((f"{col} recovery", cfg.min_recovery))
        for check, threshold in wants:
            if col not in base.cells or col not in row.cells:
                who = "the base" if col not in base.cells else "this variant"
                errors.append(_error(name, check, f"no {col} results for {who}"))
                continue
            b, v, looks = paired_items(base.cells[col], row.cells[col])
            if not len(b) or not (np.isfinite(b).all() and np.isfinite(v).all()):
                errors.append(_error(name, check, f"{col}: no paired items, or a non-finite score"))
                continue
            if check == col:
                family[check], scale[check] = sq.DropCheck(b - v, threshold / 100, looks), 100
            else:
                family[check], scale[check] = sq.RecoveryCheck(b, v, threshold / 100, looks), 100
    if cfg.max_kl is not None:
        d = row.divergence.get("docs")
        if d is None or not math.isfinite(d.mean_kl):
            errors.append(_error(name, "KL", "no KL measured for this row"))
        elif len(d.window_kl) < 2:
            errors.append(_error(name, "KL", "too few KL windows for an interval; re-run to recompute the row's KL"))
        else:
            family["KL"], scale["KL"] = sq.KLCheck(np.array(d.window_kl), cfg.max_kl), 1
    return family, scale, errors


def _average(name: str, base: Row, row: Row, cfg: GateConfig, drops: dict[str, sq.CheckDecision]) -> Check:
    """Average relative drop over the benchmarks, bounded by the benchmarks' own (corrected) bounds."""
    cols = [c for c in row.cells if c in base.cells and base.cells[c].score > 0]
    if row.avg_drop_pct is None or not cols:
        return _error(name, "average", "no benchmark to average")
    if cfg.point_estimate:
        bad = row.avg_drop_pct > cfg.max_avg_drop
        return Check(
            name,
            "average",
            "fail" if bad else "pass",
            round(row.avg_drop_pct, 3),
            cfg.max_avg_drop,
            message=f"average relative drop {row.avg_drop_pct:.2f}% vs {cfg.max_avg_drop:g}% (point estimate: not a statistical test)",
        )
    if any(c not in drops for c in cols):
        return _error(name, "average", "the average needs a max_drop margin (e.g. default) on every benchmark")
    lo = sum(100 * drops[c].lo / base.cells[c].score for c in cols) / len(cols)
    hi = sum(100 * drops[c].hi / base.cells[c].score for c in cols) / len(cols)
    status = "pass" if hi < cfg.max_avg_drop else "fail" if lo > cfg.max_avg_drop else "undecided"
    return Check(
        name,
        "average",
        status,
        round(row.avg_drop_pct, 3),
        cfg.max_avg_drop,
        (round(lo, 3), round(hi, 3)),
        message=f"average relative drop {row.avg_drop_pct:.2f}%, bounds [{lo:.2f}, {hi:.2f}] vs {cfg.max_avg_drop:g}%",
    )


def evaluate_gate(t: Table, cfg: GateConfig) -> Verdict:
    base = t.row("base")
    checks: list[Check] = []
    if base is None or not base.cells:
        checks.append(_error("base", "row", "the run has no evaluated base row; nothing to compare against"))
        return Verdict("error", 2, checks)
    names = cfg.variants or [r.name for r in t.rows if not r.is_base]
    if not names:
        checks.append(_error("-", "row", "the run has no variant rows"))
    for name in names:
        row = t.row(name)
        if row is None:
            checks.append(_error(name, "row", f"no variant '{name}' in this run"))
            continue
        if row.error:
            checks.append(_error(name, "build", row.error))
        family, scale, errors = _family(name, base, row, cfg)
        if cfg.point_estimate:
            decided = {k: sq.point_estimate(c.d, c.margin) for k, c in family.items() if isinstance(c, sq.DropCheck)}
            errors += [_error(name, k, "point-estimate mode covers max_drop and max_avg_drop only") for k in family if k not in decided]
        else:
            decided = sq.decide_family(family, cfg.alpha, cfg.method) if family else {}
        checks += [_from_decision(name, k, d, scale[k]) for k, d in decided.items()] + errors
        if cfg.max_avg_drop is not None:
            drops = {k: d for k, d in decided.items() if isinstance(family[k], sq.DropCheck)}
            checks.append(_average(name, base, row, cfg, drops))
    statuses = {c.status for c in checks}
    if "fail" in statuses:
        return Verdict("fail", 1, checks)
    if "error" in statuses or not checks:
        return Verdict("error", 2, checks)
    if "undecided" in statuses:
        return Verdict("undecided", 2, checks)
    return Verdict("pass", 0, checks)


def summary(v: Verdict) -> str:
    lines = [f"quantpipe gate: {v.status.upper()} (exit {v.exit_code})"]
    for c in v.checks:
        items = f" [{c.n} items]" if c.n else ""
        lines.append(f"  {c.status.upper():9s} {c.variant} / {c.check}{items}: {c.message}")
    passed = sum(c.status == "pass" for c in v.checks)
    lines.append(f"  {passed} of {len(v.checks)} checks passed")
    return "\n".join(lines)


def junit_xml(v: Verdict) -> str:
    suites = ET.Element("testsuites", name="quantpipe-gate")
    by_variant: dict[str, list[Check]] = {}
    for c in v.checks:
        by_variant.setdefault(c.variant, []).append(c)
    for variant, checks in by_variant.items():
        s = ET.SubElement(
            suites,
            "testsuite",
            name=variant,
            tests=str(len(checks)),
            failures=str(sum(c.status == "fail" for c in checks)),
            errors=str(sum(c.status in ("error", "undecided") for c in checks)),
        )
        for c in checks:
            case = ET.SubElement(s, "testcase", classname=f"quantpipe.{variant}", name=c.check)
            if c.status == "fail":
                ET.SubElement(case, "failure", message=c.message)
            elif c.status in ("error", "undecided"):
                ET.SubElement(case, "error", message=c.message, type=c.status)
    return ET.tostring(suites, encoding="unicode")
