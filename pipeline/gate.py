"""The deploy gate: turn the degradation table into pass / fail with an exit code.

Thresholds are drops in accuracy points per benchmark (base − variant) and the average
relative drop in %. With `require_significant`, a benchmark fails only when the whole 95%
interval of its drop lies above the threshold, so noise alone never fails a deploy; when the
interval straddles the threshold and the sample is under `min_items`, the gate says the
sample is too small to decide instead of guessing.

Exit codes: 0 every checked variant passes, 1 some variant fails, 2 error or undecided.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from pydantic import BaseModel, ConfigDict, Field

from .errors import QuantpipeError


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_drop: dict[str, float] = Field(default_factory=dict, description="benchmark (or 'default') -> points")
    max_avg_drop: float | None = Field(None, description="average relative drop, %")
    min_recovery: float | None = Field(None, description="per benchmark: variant score / base score, % (e.g. 99)")
    max_kl: float | None = Field(None, description="mean next-token KL to the base on the docs text, nats")
    require_significant: bool = False
    min_items: int = 30
    variants: list[str] | None = None

    def limit(self, bench: str) -> float | None:
        return self.max_drop.get(bench, self.max_drop.get("default"))


@dataclass
class Check:
    variant: str
    check: str
    status: str  # pass | fail | undecided | error
    observed: float | None = None
    threshold: float | None = None
    interval: tuple[float, float] | None = None
    n: int | None = None
    message: str = ""


@dataclass
class Verdict:
    status: str
    exit_code: int
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"status": self.status, "exit_code": self.exit_code, "checks": [asdict(c) for c in self.checks]}


def evaluate_gate(table: dict, cfg: GateConfig) -> Verdict:
    rows = {e["row"]: e for e in table["rows"]}
    if "base" not in rows or not rows["base"]["benchmarks"]:
        raise QuantpipeError("the run has no evaluated base row; nothing to compare against")
    names = cfg.variants or [r for r in rows if r != "base"]
    checks: list[Check] = []
    for name in names:
        e = rows.get(name)
        if e is None:
            checks.append(Check(name, "row", "error", message=f"no variant '{name}' in this run"))
            continue
        if e["error"]:
            checks.append(Check(name, "build", "error", message=e["error"]))
        for bench, cell in e["benchmarks"].items():
            limit = cfg.limit(bench)
            p = cell.get("paired")
            if limit is None or not p or not p["n"]:
                continue
            drop, lo, hi = -100 * p["diff"], -100 * p["ci_high"], -100 * p["ci_low"]
            c = Check(name, bench, "pass", round(drop, 3), limit, (round(lo, 3), round(hi, 3)), p["n"])
            if cfg.require_significant:
                if lo > limit:
                    c.status, c.message = "fail", f"drop {drop:.1f} pts, 95% CI [{lo:.1f}, {hi:.1f}] lies above {limit}"
                elif hi > limit and p["n"] < cfg.min_items:
                    c.status = "undecided"
                    c.message = f"only {p['n']} items: CI [{lo:.1f}, {hi:.1f}] straddles {limit}; sample too small to decide"
            elif drop > limit:
                c.status, c.message = "fail", f"drop {drop:.1f} pts > {limit} (95% CI [{lo:.1f}, {hi:.1f}])"
            checks.append(c)
        if cfg.min_recovery is not None:
            for bench, cell in e["benchmarks"].items():
                base = rows["base"]["benchmarks"].get(bench)
                if not base or base["score"] <= 0:
                    continue
                rec = 100 * cell["score"] / base["score"]
                bad = rec < cfg.min_recovery
                checks.append(Check(name, f"{bench} recovery", "fail" if bad else "pass", round(rec, 2), cfg.min_recovery,
                                    n=cell["n"], message=f"recovers {rec:.1f}% of the base score < {cfg.min_recovery}%" if bad else ""))
        if cfg.max_kl is not None:
            kl = ((e.get("divergence") or {}).get("docs") or {}).get("mean_kl")
            if kl is None:
                checks.append(Check(name, "KL", "error", message="no KL measured for this row"))
            else:
                bad = kl > cfg.max_kl
                checks.append(Check(name, "KL", "fail" if bad else "pass", round(kl, 5), cfg.max_kl,
                                    message=f"mean KL {kl:.4f} nats > {cfg.max_kl}" if bad else ""))
        if cfg.max_avg_drop is not None and e["avg_drop_pct"] is not None:
            bad = e["avg_drop_pct"] > cfg.max_avg_drop
            checks.append(Check(name, "average", "fail" if bad else "pass", round(e["avg_drop_pct"], 3), cfg.max_avg_drop,
                                message=f"average relative drop {e['avg_drop_pct']:.1f}% > {cfg.max_avg_drop}%" if bad else ""))
    statuses = {c.status for c in checks}
    if "fail" in statuses:
        return Verdict("fail", 1, checks)
    if statuses & {"error", "undecided"} or not checks:
        return Verdict("undecided" if "undecided" in statuses else "error", 2, checks)
    return Verdict("pass", 0, checks)


def summary(v: Verdict) -> str:
    lines = [f"quantpipe gate: {v.status.upper()} (exit {v.exit_code})"]
    for c in v.checks:
        if c.status == "pass":
            continue
        lines.append(f"  {c.status.upper():9s} {c.variant} / {c.check}: {c.message}")
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


def load_table(target: Path) -> tuple[dict, GateConfig | None]:
    """A run folder (artifacts/<name>) or a recipe file (its run folder under ./artifacts)."""
    gate_cfg = None
    if target.is_file():
        from .recipe import load_recipe

        recipe = load_recipe(target)
        gate_cfg = GateConfig.model_validate(recipe.gate) if recipe.gate else None
        target = Path("artifacts") / recipe.name
    path = target / "report" / "degradation.json"
    if not path.is_file():
        raise QuantpipeError(f"no table at {path}; run `quantpipe run` (or `quantpipe table {target}`) first")
    table = json.loads(path.read_text())
    if gate_cfg is None and (target / "recipe.json").is_file():
        g = json.loads((target / "recipe.json").read_text()).get("gate")
        gate_cfg = GateConfig.model_validate(g) if g else None
    return table, gate_cfg
