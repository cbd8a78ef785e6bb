"""The deploy gate: a pure function of (table, config) -> a verdict with an exit code.

Each check is a non-inferiority test (docs/statistics.md). For a benchmark with margin m points:
pass only when the upper confidence bound of the drop (base − variant, paired on the same items)
is below m; fail when the lower bound is above m; otherwise undecided, with the number of further
items the observed variance suggests. The bounds are anytime-valid confidence sequences
(pipeline.sequential), so looking after every round of a sequential run does not inflate the
error; the family-wise error across a variant's checks is held at `alpha` (Bonferroni: each of
the k checks runs at alpha / k). `min_recovery` is the same test on variant − r·base; `max_kl`
uses a bootstrap interval over the KL text's windows; `max_avg_drop` bounds the average relative
drop with the benchmarks' (simultaneous) bounds. `point_estimate: true` decides on point
estimates instead, and every such check says it is not a test.

A missing row, benchmark or KL, a failed row, a NaN, or a malformed table is an *error* (exit 2),
never a pass. Exit codes: 0 every checked variant passes, 1 some variant fails, 2 error or undecided.
"""

from __future__ import annotations

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


def paired_drops(base: Cell, variant: Cell) -> np.ndarray:
    """base − variant per item, in the base's evaluation order, on the items both have."""
    return np.array([base.items[k] - variant.items[k] for k in base.items if k in variant.items], dtype=float)


def _planned(row: Row, base: Row, cfg: GateConfig) -> list[tuple[str, str]]:
    """(kind, column) of every check this variant gets: the Bonferroni family."""
    cols = list(dict.fromkeys([*base.cells, *row.cells]))
    out = [("drop", c) for c in cols if cfg.limit(c) is not None]
    if "default" not in cfg.max_drop:  # a named benchmark the table lacks is still a check (an error)
        out += [("drop", c) for c in cfg.max_drop if c not in cols]
    if cfg.min_recovery is not None:
        out += [("recovery", c) for c in cols]
    if cfg.max_kl is not None:
        out.append(("kl", "docs"))
    if cfg.max_avg_drop is not None:
        out.append(("average", ""))
    return out


def _decision_check(variant: str, name: str, d: sq.CheckDecision, scale: float, unit: str) -> Check:
    lo, hi = d.lo * scale, d.hi * scale
    msg = {"pass": f"{unit} {d.drop * scale:.2f}, upper bound {hi:.2f} < {d.margin * scale:g}",
           "fail": f"{unit} {d.drop * scale:.2f}, lower bound {lo:.2f} > {d.margin * scale:g}",
           "undecided": f"{unit} {d.drop * scale:.2f}, interval [{lo:.2f}, {hi:.2f}] contains {d.margin * scale:g} after "
                        f"{d.n} items" + (f"; about {d.more_items} more items would decide" if d.more_items else "")}[d.status]
    return Check(variant, name, d.status, round(d.drop * scale, 4), d.margin * scale, (round(lo, 4), round(hi, 4)), d.n,
                 d.alpha, d.more_items, msg)


def _point(variant: str, name: str, observed: float, threshold: float, worse_if_above: bool, n: int | None) -> Check:
    bad = observed > threshold if worse_if_above else observed < threshold
    msg = f"point estimate {observed:.3f} vs {threshold:g} (point-estimate mode: not a statistical test)"
    return Check(variant, name, "fail" if bad else "pass", round(observed, 4), threshold, n=n, message=msg)


def _error(variant: str, name: str, message: str) -> Check:
    return Check(variant, name, "error", message=message)


def _drop_check(variant: str, col: str, base: Row, row: Row, cfg: GateConfig, alpha: float) -> tuple[Check, sq.CheckDecision | None]:
    if col not in base.cells:
        return _error(variant, col, f"the base has no {col} results"), None
    if col not in row.cells:
        return _error(variant, col, f"no {col} results for this variant"), None
    d = paired_drops(base.cells[col], row.cells[col])
    if not len(d) or not np.isfinite(d).all():
        return _error(variant, col, f"{col}: no paired items, or a non-finite score"), None
    margin = cfg.limit(col) / 100
    if cfg.point_estimate:
        return _point(variant, col, 100 * d.mean(), 100 * margin, True, len(d)), None
    dec = sq.decide_drop(d, margin, alpha, looks=row.cells[col].looks or None)
    return _decision_check(variant, col, dec, 100, "drop (pts)"), dec


def _recovery_check(variant: str, col: str, base: Row, row: Row, cfg: GateConfig, alpha: float) -> Check:
    name = f"{col} recovery"
    if col not in base.cells or col not in row.cells:
        return _error(variant, name, f"{col} is missing for the base or this variant")
    b, v = base.cells[col], row.cells[col]
    keys = [k for k in b.items if k in v.items]
    bb, vv = np.array([b.items[k] for k in keys]), np.array([v.items[k] for k in keys])
    if not len(keys) or not (np.isfinite(bb).all() and np.isfinite(vv).all()):
        return _error(variant, name, f"{col}: no paired items, or a non-finite score")
    r = cfg.min_recovery / 100
    if cfg.point_estimate:
        return _point(variant, name, 100 * vv.mean() / max(bb.mean(), 1e-12), cfg.min_recovery, False, len(keys))
    dec = sq.decide_recovery(bb, vv, r, alpha, looks=v.looks or None)
    # decide_recovery tests mean(v − r·b) >= 0: pass when its lower bound is above 0
    msg = {"pass": f"recovers {100 * dec.drop:.1f}% of the base; the data show it is at least {cfg.min_recovery:g}%",
           "fail": f"recovers {100 * dec.drop:.1f}% of the base; the data show it is below {cfg.min_recovery:g}%",
           "undecided": f"recovers {100 * dec.drop:.1f}% of the base; not yet distinguishable from {cfg.min_recovery:g}% "
                        f"after {dec.n} items" + (f"; about {dec.more_items} more items would decide" if dec.more_items else "")}
    return Check(variant, name, dec.status, round(100 * dec.drop, 3), cfg.min_recovery,
                 (round(100 * dec.lo, 3), round(100 * dec.hi, 3)), dec.n, dec.alpha, dec.more_items, msg[dec.status])


def _kl_check(variant: str, row: Row, cfg: GateConfig, alpha: float) -> Check:
    d = row.divergence.get("docs")
    if d is None:
        return _error(variant, "KL", "no KL measured for this row")
    if not math.isfinite(d.mean_kl):
        return _error(variant, "KL", "KL is not a finite number")
    if cfg.point_estimate or len(d.window_kl) < 2:
        if not cfg.point_estimate:
            return _error(variant, "KL", "too few KL windows for an interval; re-run to recompute the row's KL")
        return _point(variant, "KL", d.mean_kl, cfg.max_kl, True, d.tokens)
    lo, hi = sq.kl_interval(np.array(d.window_kl), alpha)
    status = "pass" if hi < cfg.max_kl else "fail" if lo > cfg.max_kl else "undecided"
    msg = f"mean KL {d.mean_kl:.4f} nats, {100 * (1 - alpha):.1f}% bootstrap interval [{lo:.4f}, {hi:.4f}] vs {cfg.max_kl:g}"
    return Check(variant, "KL", status, round(d.mean_kl, 5), cfg.max_kl, (round(lo, 5), round(hi, 5)), d.tokens, alpha,
                 message=msg)


def _average_check(variant: str, base: Row, decisions: dict[str, sq.CheckDecision], row: Row, cfg: GateConfig) -> Check:
    """Average relative drop over the benchmarks, bounded with their simultaneous drop bounds."""
    if row.avg_drop_pct is None:
        return _error(variant, "average", "no benchmark to average")
    if cfg.point_estimate:
        return _point(variant, "average", row.avg_drop_pct, cfg.max_avg_drop, True, None)
    cols = [c for c in row.cells if c in base.cells and base.cells[c].score > 0]
    if any(c not in decisions for c in cols):
        return _error(variant, "average", "the average needs a max_drop margin (e.g. default) on every benchmark")
    lo = sum(100 * decisions[c].lo / base.cells[c].score for c in cols) / len(cols)
    hi = sum(100 * decisions[c].hi / base.cells[c].score for c in cols) / len(cols)
    status = "pass" if hi < cfg.max_avg_drop else "fail" if lo > cfg.max_avg_drop else "undecided"
    return Check(variant, "average", status, round(row.avg_drop_pct, 3), cfg.max_avg_drop, (round(lo, 3), round(hi, 3)),
                 message=f"average relative drop {row.avg_drop_pct:.2f}%, bounds [{lo:.2f}, {hi:.2f}] vs {cfg.max_avg_drop:g}%")


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
        planned = _planned(row, base, cfg)
        alpha = cfg.alpha / max(1, len(planned))
        decisions: dict[str, sq.CheckDecision] = {}
        for kind, col in planned:
            if kind == "drop":
                c, dec = _drop_check(name, col, base, row, cfg, alpha)
                if dec is not None:
                    decisions[col] = dec
                checks.append(c)
            elif kind == "recovery":
                checks.append(_recovery_check(name, col, base, row, cfg, alpha))
            elif kind == "kl":
                checks.append(_kl_check(name, row, cfg, alpha))
            else:
                checks.append(_average_check(name, base, decisions, row, cfg))
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
        s = ET.SubElement(suites, "testsuite", name=variant, tests=str(len(checks)),
                          failures=str(sum(c.status == "fail" for c in checks)),
                          errors=str(sum(c.status in ("error", "undecided") for c in checks)))
        for c in checks:
            case = ET.SubElement(s, "testcase", classname=f"quantpipe.{variant}", name=c.check)
            if c.status == "fail":
                ET.SubElement(case, "failure", message=c.message)
            elif c.status in ("error", "undecided"):
                ET.SubElement(case, "error", message=c.message, type=c.status)
    return ET.tostring(suites, encoding="unicode")
