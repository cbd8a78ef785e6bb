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
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal
from xml.etree import ElementTree as ET

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import sequential as sq
from .errors import QuantpipeError
from .table import Cell, Row, Table
from .tasks import COLUMN_SIZES, COLUMNS

CheckKind = Literal["drop", "recovery", "kl", "average", "row", "build", "record"]


class GateConfig(BaseModel):
    """The deploy gate's thresholds (a non-inferiority test per check, see docs/statistics.md): the
    recipe's `gate:` section, with the command line's flags over it (`resolve_config`)."""

    model_config = ConfigDict(extra="forbid")

    max_drop: dict[str, float] = Field(default_factory=dict, description="benchmark (or 'default') -> points")
    max_avg_drop: float | None = Field(None, description="average relative drop, % (point estimate, reported)")
    min_recovery: float | None = Field(None, gt=0, le=200, description="per benchmark: variant / base score, %")
    max_kl: float | None = Field(None, ge=0, description="mean next-token KL to the base on the docs text, nats")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="family-wise error rate per variant, across its checks")
    point_estimate: bool = Field(False, description="decide on point estimates: not a test, and labelled so")
    until_decided: bool = Field(False, description="evaluate in rounds (eval.order: random) until every check is decided")
    method: Literal["agrapa", "betting", "eb"] = Field(
        "agrapa",
        description="confidence sequence (docs/statistics.md): agrapa: betting with bets tuned to the margin "
        "(fewest items); betting: predictable plug-in hedged; eb: empirical Bernstein",
    )
    variants: list[str] | None = None

    @field_validator("max_drop")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        known = {c.column.name for c in COLUMNS}
        for k, x in v.items():
            if k != "default" and k not in known:
                raise ValueError(f"max_drop: '{k}' is not a benchmark (use one of {', '.join(sorted(known))}, or default)")
            if not (math.isfinite(x) and 0 <= x < 100):
                raise ValueError(f"max_drop.{k}: {x} is not a number of points in [0, 100)")
        return v

    @field_validator("max_avg_drop")
    @classmethod
    def _finite_avg(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    def limit(self, bench: str) -> float | None:
        return self.max_drop.get(bench, self.max_drop.get("default"))

    def has_thresholds(self) -> bool:
        return bool(self.max_drop) or any(x is not None for x in (self.max_avg_drop, self.min_recovery, self.max_kl))


def resolve_config(recipe_gate: GateConfig | dict | None, flags: dict | None = None, max_drop: list[str] | None = None) -> GateConfig:
    """The one place the gate's settings are put together: the recipe's (or the run's stored recipe's)
    `gate:` section, then the command line's flags (None: not given), then --max-drop BENCH=POINTS;
    validated, one line if bad."""
    settings = recipe_gate.model_dump() if isinstance(recipe_gate, GateConfig) else dict(recipe_gate or {})
    settings |= {k: v for k, v in (flags or {}).items() if v is not None}
    settings["max_drop"] = dict(settings.get("max_drop") or {})
    for item in max_drop or []:
        bench, _, value = item.partition("=")
        try:
            settings["max_drop"][bench.strip()] = float(value)
        except ValueError as e:
            raise QuantpipeError(f"--max-drop expects BENCH=POINTS (e.g. GSM8K=2 or default=3), got '{item}'") from e
    try:
        return GateConfig.model_validate(settings)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "gate"
        raise QuantpipeError(f"gate setting {where}: {err['msg'].removeprefix('Value error, ')}") from e


def stored_config(root: Path) -> GateConfig | None:
    """The gate section of the recipe a run folder was run with (recipe.json), if any."""
    from .store import read_json

    g = (read_json(root / "recipe.json") or {}).get("gate")
    return resolve_config(g) if g else None


@dataclass
class Check:
    variant: str
    check: str  # its name as shown ("MMLU", "MMLU recovery", "KL", "average")
    status: str  # pass | fail | undecided | error
    observed: float | None = None
    threshold: float | None = None
    interval: tuple[float, float] | None = None
    n: int | None = None
    alpha: float | None = None
    more_items: int | None = None  # undecided: further items the observed variance suggests
    message: str = ""
    kind: CheckKind = "row"
    column: str | None = None  # the benchmark column it tests (drop and recovery checks)

    def interval_text(self) -> str:
        return "" if self.interval is None else f"[{self.interval[0]:.2f}, {self.interval[1]:.2f}]"


@dataclass
class Verdict:
    status: str
    exit_code: int
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"status": self.status, "exit_code": self.exit_code, "checks": [asdict(c) for c in self.checks]}


def _error(variant: str, name: str, message: str, kind: CheckKind = "row", column: str | None = None) -> Check:
    return Check(variant, name, "error", message=message, kind=kind, column=column)


_UNITS = {"drop": ("drop", "pts", 2), "point": ("drop", "pts", 2), "recovery": ("recovery", "%", 1), "kl": ("mean KL", "nats", 4)}


def _message(d: sq.CheckDecision, scale: float, column: str | None = None) -> str:
    what, unit, digits = _UNITS[d.kind]
    est, lo, hi, thr = (x * scale for x in (d.estimate, d.lo, d.hi, d.threshold))
    head = f"{what} {est:.{digits}f} {unit}"
    if not d.is_test:
        return f"{head} vs {thr:g} (point estimate: not a statistical test)"
    interval = f"interval [{lo:.{digits}f}, {hi:.{digits}f}]"
    higher_is_better = d.kind == "recovery"
    if d.status == "undecided":
        more = f"; about {d.more_items} more items would decide" if d.more_items else ""
        size = COLUMN_SIZES.get(column)
        if d.more_items and size and d.n + d.more_items > size:
            more += f", more than the {size} {column} has: widen its margin or decide it on a larger benchmark"
        return f"{head}, {interval} still contains {thr:g} after {d.n} items{more}"
    side = "above" if (d.status == "pass") == higher_is_better else "below"
    return f"{head}, {interval} lies {side} {thr:g} (alpha {d.alpha:g} per check, Holm over the variant's checks)"


def _from_decision(variant: str, name: str, d: sq.CheckDecision, scale: float, column: str | None) -> Check:
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
        _message(d, scale, column),
        "kl" if d.kind == "kl" else "recovery" if d.kind == "recovery" else "drop",
        column,
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


def _family(name: str, base: Row, row: Row, cfg: GateConfig) -> tuple[dict[str, object], dict[str, float], dict[str, str], list[Check]]:
    """The variant's checks as the statistics module takes them (one family: its error is held at
    alpha across them), their display scales and columns, and the checks that are errors before any test."""
    family, scale, column, errors = {}, {}, {}, []
    cols = list(dict.fromkeys([*base.cells, *row.cells, *(c for c in cfg.max_drop if c != "default")]))
    for col in cols:
        wants = [(col, "drop", cfg.limit(col))] if cfg.limit(col) is not None else []
        if cfg.min_recovery is not None and (col in base.cells or col in row.cells):
            wants.append((f"{col} recovery", "recovery", cfg.min_recovery))
        for check, kind, threshold in wants:
            if col not in base.cells or col not in row.cells:
                who = "the base" if col not in base.cells else "this variant"
                errors.append(_error(name, check, f"no {col} results for {who}", kind, col))
                continue
            b, v, looks = paired_items(base.cells[col], row.cells[col])
            if not len(b) or not (np.isfinite(b).all() and np.isfinite(v).all()):
                errors.append(_error(name, check, f"{col}: no paired items, or a non-finite score", kind, col))
                continue
            if kind == "recovery" and not b.any():
                errors.append(
                    _error(name, check, f"{col}: recovery is undefined, the base scores 0 on the {len(b)} paired items", kind, col)
                )
                continue
            column[check], scale[check] = col, 100
            if kind == "drop":
                family[check] = sq.DropCheck(b - v, threshold / 100, looks)
            else:
                family[check] = sq.RecoveryCheck(b, v, threshold / 100, looks)
    if cfg.max_kl is not None:
        d = row.divergence.get("docs")
        if d is None or not math.isfinite(d.mean_kl):
            errors.append(_error(name, "KL", "no KL measured for this row", "kl"))
        elif len(d.window_kl) < 2:
            errors.append(_error(name, "KL", "too few KL windows for an interval; re-run to recompute the row's KL", "kl"))
        else:
            family["KL"], scale["KL"], column["KL"] = sq.KLCheck(np.array(d.window_kl), cfg.max_kl), 1, None
    return family, scale, column, errors


def _average(name: str, row: Row, cfg: GateConfig, drops: dict[str, sq.CheckDecision]) -> Check:
    """Average relative drop over the benchmarks, bounded by the benchmarks' own (corrected) bounds;
    every benchmark's drop is relative to the base's score on the same (paired) items."""
    base_mean = {c: cell.paired.base_mean for c, cell in row.cells.items() if cell.paired and cell.paired.n and cell.paired.base_mean}
    cols = [c for c in row.cells if base_mean.get(c, 0) > 0]
    if row.avg_drop_pct is None or not cols:
        return _error(name, "average", "no benchmark to average", "average")
    if cfg.point_estimate:
        bad = row.avg_drop_pct > cfg.max_avg_drop
        return Check(
            name,
            "average",
            "fail" if bad else "pass",
            round(row.avg_drop_pct, 3),
            cfg.max_avg_drop,
            message=f"average relative drop {row.avg_drop_pct:.2f}% vs {cfg.max_avg_drop:g}% (point estimate: not a statistical test)",
            kind="average",
        )
    if any(c not in drops for c in cols):
        return _error(name, "average", "the average needs a max_drop margin (e.g. default) on every benchmark", "average")
    lo = sum(100 * drops[c].lo / base_mean[c] for c in cols) / len(cols)
    hi = sum(100 * drops[c].hi / base_mean[c] for c in cols) / len(cols)
    status = "pass" if hi < cfg.max_avg_drop else "fail" if lo > cfg.max_avg_drop else "undecided"
    return Check(
        name,
        "average",
        status,
        round(row.avg_drop_pct, 3),
        cfg.max_avg_drop,
        (round(lo, 3), round(hi, 3)),
        message=f"average relative drop {row.avg_drop_pct:.2f}%, bounds [{lo:.2f}, {hi:.2f}] vs {cfg.max_avg_drop:g}%",
        kind="average",
    )


def _row_errors(row: Row) -> list[Check]:
    """A failed row or a damaged stored record is an error, never a pass (the base's included)."""
    out = [_error(row.name, "build" if not row.is_base else "row", row.error, "build")] if row.error else []
    return out + [_error(row.name, "record", f"damaged record {d}", "record") for d in row.damaged]


def evaluate_gate(t: Table, cfg: GateConfig) -> Verdict:
    base = t.row("base")
    checks: list[Check] = []
    if base is None or not base.cells:
        checks.append(_error("base", "row", "the run has no evaluated base row; nothing to compare against"))
        return Verdict("error", 2, checks)
    checks += _row_errors(base)
    names = cfg.variants or [r.name for r in t.rows if not r.is_base]
    if not names:
        checks.append(_error("-", "row", "the run has no variant rows"))
    for name in names:
        row = t.row(name)
        if row is None:
            checks.append(_error(name, "row", f"no variant '{name}' in this run"))
            continue
        checks += _row_errors(row)
        family, scale, column, errors = _family(name, base, row, cfg)
        if cfg.point_estimate:
            decided = {k: sq.point_estimate(c.d, c.margin) for k, c in family.items() if isinstance(c, sq.DropCheck)}
            errors += [
                _error(name, k, "point-estimate mode covers max_drop and max_avg_drop only", "recovery" if column[k] else "kl", column[k])
                for k in family
                if k not in decided
            ]
        else:
            decided = sq.decide_family(family, cfg.alpha, cfg.method) if family else {}
        checks += [_from_decision(name, k, d, scale[k], column[k]) for k, d in decided.items()] + errors
        if cfg.max_avg_drop is not None:
            drops = {column[k]: d for k, d in decided.items() if isinstance(family[k], sq.DropCheck)}
            checks.append(_average(name, row, cfg, drops))
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


_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(s: str) -> str:
    """XML 1.0 cannot carry most control characters, escaped or not: each becomes U+FFFD."""
    return _XML_INVALID.sub("\ufffd", s)


def junit_xml(v: Verdict) -> str:
    suites = ET.Element("testsuites", name="quantpipe-gate")
    by_variant: dict[str, list[Check]] = {}
    for c in v.checks:
        by_variant.setdefault(c.variant, []).append(c)
    for variant, checks in by_variant.items():
        s = ET.SubElement(
            suites,
            "testsuite",
            name=_xml_text(variant),
            tests=str(len(checks)),
            failures=str(sum(c.status == "fail" for c in checks)),
            errors=str(sum(c.status in ("error", "undecided") for c in checks)),
        )
        for c in checks:
            case = ET.SubElement(s, "testcase", classname=_xml_text(f"quantpipe.{variant}"), name=_xml_text(c.check))
            if c.status == "fail":
                ET.SubElement(case, "failure", message=_xml_text(c.message))
            elif c.status in ("error", "undecided"):
                ET.SubElement(case, "error", message=_xml_text(c.message), type=c.status)
    return ET.tostring(suites, encoding="unicode")
