"""The plan: a recipe as a graph of keyed steps.

A step is one unit of stored work: build one stage of a variant's chain, evaluate one row on one
task (or on one round of a task's seeded item order), compute the base's KL reference, or one
row's KL to it. Each step has the store key of its result, derived from the very arguments it runs
with, and the ids of the steps it needs. Executors (local, Ray) only run this graph, in order;
`quantpipe build` runs the same graph cut after the builds. Whether a step's stored result is
reused is decided in one place, `store.cached`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["build", "eval", "kl_reference", "kl"]


@dataclass(frozen=True)
class Step:
    kind: Kind
    row: str
    key: str
    path: Path  # the record's folder in the store
    deps: tuple[str, ...] = ()
    stage: int | None = None  # build: position in the row's chain
    stage_name: str | None = None
    task: str | None = None  # eval
    items: tuple[int, int] | None = None  # eval: [start, end) of the task's seeded item order; None: first-N
    round: int = 0  # eval: the sequential round it belongs to (job.round_ends)

    @property
    def id(self) -> str:
        if self.kind == "build":
            return f"build {self.row}[{self.stage}] {self.stage_name}"
        if self.kind == "eval":
            return f"eval {self.row} {self.task}" + (f" {self.items[0]}-{self.items[1]}" if self.items else "")
        return f"{self.kind.replace('_', '-')} {self.row}"

    def to_dict(self, root: Path) -> dict:
        """JSON form; the record's path relative to the run folder, so the folder can move."""
        return {**asdict(self), "id": self.id, "path": str(self.path.relative_to(root))}


@dataclass
class Plan:
    rows: list[str]  # table order: base first
    steps: list[Step] = field(default_factory=list)  # dependency order

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        return step

    def of_row(self, row: str) -> list[Step]:
        """The steps a row's result needs that are its own (shared chain prefixes belong to the row
        that planned them first)."""
        return [s for s in self.steps if s.row == row]

    def artifact_step(self, row: str) -> Step | None:
        """The last build step of a row's chain (None for the base); it may belong to another row."""
        return self._artifact.get(row)

    def set_artifact(self, row: str, step: Step) -> None:
        self._artifact[row] = step

    def __post_init__(self):
        self._artifact: dict[str, Step] = {}

    def rounds(self) -> int:
        return 1 + max((s.round for s in self.steps), default=0)

    def cut_after_builds(self) -> Plan:
        cut = Plan(self.rows, [s for s in self.steps if s.kind == "build"])
        cut._artifact = dict(self._artifact)
        return cut

    def to_dict(self, root: Path) -> dict:
        return {
            "rows": self.rows,
            "steps": [s.to_dict(root) for s in self.steps],
            "artifacts": {r: s.id for r, s in self._artifact.items()},
        }


def step_keys(steps: list[dict]) -> dict[str, str]:
    """Step id -> key, from plan.json's steps: what a table was built from (a report from another plan is stale)."""
    return {s["id"]: s["key"] for s in steps}
