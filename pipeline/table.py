"""The degradation table, typed, built once from a run's stored records.

`build_table(root)` reads the run's index (plan.json: which records make up this run) and only
those records, and returns a `Table`: rows (methods), cells (a benchmark's score for a row, with the
per-item scores and the paired statistics against the base), divergence and memory. Markdown, CSV,
HTML, model cards and the gate all read this one structure; the average drop is computed here
once. `Table.to_dict` / `Table.from_dict` are its JSON form (degradation.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import store
from .errors import QuantpipeError
from .plan import step_keys
from .stats import Paired, mean_stderr, paired
from .tasks import COLUMNS, item_scores


@dataclass
class Cell:
    score: float
    stderr: float
    n: int
    evaluated_as: str | None
    items: dict[str, float]  # item key -> score, in evaluation order (paired with the base by key)
    looks: list[int] = field(default_factory=list)  # items done at the end of each evaluation round
    paired: Paired | None = None  # variant vs base on the same items (None for the base)
    relative_drop_pct: float | None = None
    peak_memory_bytes: int | None = None
    weights_bytes: int | None = None


@dataclass
class Divergence:
    tokens: int
    mean_kl: float
    kl_p99: float
    top1_agreement: float
    ppl_base: float
    ppl: float
    ppl_ratio: float
    base_topk_mass: float
    window_kl: list[float] = field(default_factory=list)  # mean KL per window (the gate's interval)


@dataclass
class Row:
    name: str
    bits: str | None
    format: str | None
    size_bytes: int | None
    chain: list[dict]
    error: str | None
    cells: dict[str, Cell]  # column -> cell
    divergence: dict[str, Divergence]  # text set -> distance to the base
    evaluated_as: str = ""
    avg_drop_pct: float | None = None
    peak_memory_bytes: int | None = None  # the largest of its evaluations
    weights_bytes: int | None = None  # its weights in memory as evaluated
    damaged: list[str] = field(default_factory=list)  # stored records it should have and cannot use, and why

    @property
    def is_base(self) -> bool:
        return self.name == "base"


@dataclass
class ColumnInfo:
    name: str
    task: str
    label: str
    n_shot: int | None  # as lm-eval reported it for the base


@dataclass
class Table:
    recipe: str
    columns: list[ColumnInfo]
    rows: list[Row]
    n_params: int | None = None
    plan_keys: dict[str, str] = field(default_factory=dict)  # step id -> key of the plan it was built from
    base_gguf_type: str | None = None  # the GGUF type the base was dequantized from (its weights lie on that grid)

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    @property
    def base(self) -> Row:
        return self.rows[0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Table:
        """The JSON form back; raises QuantpipeError naming what is missing or malformed."""
        nan = lambda x: float("nan") if x is None else x  # strict JSON stores NaN as null
        try:
            rows = []
            for r in d["rows"]:
                cells = {}
                for c, v in r["cells"].items():
                    p = v.get("paired")
                    p = Paired(**{**p, **{k: nan(p[k]) for k in ("diff", "ci_low", "ci_high", "p_value")}}) if p else None
                    items = {k: nan(x) for k, x in v["items"].items()}
                    cells[c] = Cell(**{**v, "score": nan(v["score"]), "stderr": nan(v["stderr"]), "items": items, "paired": p})
                div = {
                    k: Divergence(**{f: nan(x) if f != "window_kl" else x for f, x in v.items()})
                    for k, v in (r.get("divergence") or {}).items()
                }
                rows.append(Row(**{**r, "cells": cells, "divergence": div}))
            return cls(
                d["recipe"],
                [ColumnInfo(**c) for c in d["columns"]],
                rows,
                d.get("n_params"),
                d.get("plan_keys") or {},
                d.get("base_gguf_type"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise QuantpipeError(f"the table is malformed ({type(e).__name__}: {e})") from e


def load_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def _n_shot(rec: dict, task: str) -> int | None:
    """Few-shot examples per prompt, as lm-eval reported them (a group: its subtasks' common value)."""
    shots = {int(v) for k, v in (rec.get("n_shot") or {}).items() if k == task or k.startswith(f"{task}_")}
    return shots.pop() if len(shots) == 1 else None


def _records(root: Path, index: dict, row: str, kind: str, task: str | None = None) -> tuple[list[store.Record], str | None]:
    """The row's verified records of one kind, in plan order, up to the first one not (yet) there:
    a sequential run stops a (row, task) after the round that decided it, so its evaluation is a
    prefix of its planned chunks. Also what is damaged: a record that exists and fails verification,
    or one missing while a later one is stored (deleted), named with why."""
    out, missing, damaged = [], None, None
    for s in index["steps"]:
        if s["row"] != row or s["kind"] != kind or s.get("task") != task:
            continue
        rec, why = store.verify(root / s["path"], s["key"])
        if rec is None and why != "absent" and damaged is None:
            damaged = f"{s['path']}: {why}"
        elif rec is not None and missing is not None and damaged is None:
            damaged = f"{missing}: deleted (a later record of it is stored)"
        if rec is None:
            missing = missing or s["path"]
        elif missing is None:
            out.append(rec)
    if damaged:
        damaged += f"; {'the row' if task is None else task} uses the {len(out)} record(s) before it"
    return out, damaged


def _scores(root: Path, index: dict, row: str) -> tuple[dict[str, Cell], dict[str, int | None], list[str]]:
    cells, shots, damaged = {}, {}, []
    for task in COLUMNS:
        recs, bad = _records(root, index, row, "eval", task.name)
        if bad:
            damaged.append(bad)
        if not recs:
            continue
        items: dict[str, float] = {}
        looks = []
        for rec in recs:
            items.update(item_scores(load_samples(rec.path / "samples.jsonl"), task))
            looks.append(len(items))
        if not items:
            continue
        mean, se = mean_stderr(list(items.values()))
        peaks = [r.meta.get("peak_memory_bytes") for r in recs if r.meta.get("peak_memory_bytes")]
        cells[task.column.name] = Cell(
            mean,
            se,
            len(items),
            recs[0].meta.get("evaluated_as"),
            items,
            looks,
            peak_memory_bytes=max(peaks) if peaks else None,
            weights_bytes=recs[0].meta.get("weights_bytes"),
        )
        shots[task.column.name] = _n_shot(recs[0].meta, task.name)
    return cells, shots, damaged


def _row_info(root: Path, index: dict, row: str) -> tuple[str | None, str | None, int | None, list[dict]]:
    """(bits, format, size, chain) of a row's artifact."""
    if row == "base":
        base = index.get("base") or {}
        return base.get("dtype"), "hf", base.get("size_bytes"), []
    step_id = index["artifacts"].get(row)
    step = next((s for s in index["steps"] if s["id"] == step_id), None)
    rec = store.verify(root / step["path"], step["key"])[0] if step else None
    if rec is None:
        return None, None, None, []
    return rec.meta.get("bits"), rec.meta.get("format"), store.dir_size(rec.path), rec.meta.get("chain", [])


def build_table(root: Path) -> Table:
    index = store.read_json(root / "plan.json")
    if not isinstance(index, dict) or "steps" not in index:
        raise QuantpipeError(f"{root} holds no run index (plan.json); run `quantpipe run` first")
    base_cells, shots, base_damaged = _scores(root, index, "base")
    columns = [ColumnInfo(t.column.name, t.name, t.column.label, shots.get(t.column.name)) for t in COLUMNS]
    rows = []
    for name in index["rows"]:
        bits, fmt, size, chain = _row_info(root, index, name)
        err = store.read_json(root / name / "error.json")
        cells, _, damaged = (base_cells, shots, base_damaged) if name == "base" else _scores(root, index, name)
        drops = []
        for col, cell in cells.items():
            b = base_cells.get(col)
            if name != "base" and b:
                # every comparison with the base is on the items both rows have (a sequential run
                # stops a variant early): never one row's items against another's
                cell.paired = p = paired(b.items, cell.items)
                if p.n and p.base_mean > 0:
                    cell.relative_drop_pct = 100 * (p.base_mean - p.variant_mean) / p.base_mean
                    drops.append(cell.relative_drop_pct)
        kl, kl_damaged = _records(root, index, name, "kl")
        damaged = [*damaged, kl_damaged] if kl_damaged else damaged
        divergence = {k: Divergence(**v) for k, v in kl[0].meta["sets"].items()} if kl else {}
        evaluated = {c.evaluated_as for c in cells.values() if c.evaluated_as}
        peaks = [c.peak_memory_bytes for c in cells.values() if c.peak_memory_bytes]
        weights = [c.weights_bytes for c in cells.values() if c.weights_bytes]
        rows.append(
            Row(
                name,
                bits,
                fmt,
                size,
                chain,
                (err or {}).get("error"),
                cells,
                divergence,
                "; ".join(sorted(evaluated)),
                sum(drops) / len(drops) if drops else None,
                max(peaks) if peaks else None,
                max(weights) if weights else None,
                damaged,
            )
        )
    base = index.get("base") or {}
    return Table(root.name, columns, rows, base.get("n_params"), step_keys(index["steps"]), base.get("gguf_type"))


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
