"""The local executor: run a job's plan in this process, and the sequential rounds of a run that
stops when the gate decides.

Steps run in plan order (a row's builds, its evaluations, its KL), so one loaded model serves all
of a row's evaluations of a round. A step that fails marks its row failed (<row>/error.json) and
skips the row's remaining steps; the other rows still finish, and the table shows which failed.

With `until_decided` (a random-order run with a gate), evaluation goes in rounds of doubling size
(plan.Step.round): after each round the gate is evaluated on everything stored so far, and the
next round evaluates only the (variant, benchmark) pairs still undecided, and the base where some
variant needs it. Its confidence sequences are anytime-valid, so looking after every round keeps
the error rates (docs/statistics.md).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .errors import QuantpipeError
from .isolation import ModelSlot
from .job import Job
from .plan import Plan, Step
from .progress import Progress
from .store import clean_stale_tmp, run_lock
from .tasks import COLUMNS

log = logging.getLogger("quantpipe")


class Execution:
    """Runs steps in this process; remembers which steps and rows failed across calls."""

    def __init__(self, job: Job, plan: Plan):
        self.job, self.plan, self.models = job, plan, ModelSlot(job)
        self.failed_steps: set[str] = set()
        self.failed_rows: dict[str, tuple[BaseException, str]] = {}

    def __call__(self, steps: list[Step]) -> None:
        progress = Progress(steps)
        for step in steps:
            t0 = time.time()
            if step.row in self.failed_rows or any(d in self.failed_steps for d in step.deps):
                self.failed_steps.add(step.id)
                progress.finished(step, 0.0, reused=False, failed=True)
                continue
            try:
                reused = self.job.run_step(step, self.models)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one row's failure must not sink the others
                self.failed_steps.add(step.id)
                self.failed_rows[step.row] = (e, traceback.format_exc())
                self.job.record_outcome(step.row, e, self.failed_rows[step.row][1])
                progress.finished(step, time.time() - t0, reused=False, failed=True)
                continue
            progress.finished(step, time.time() - t0, reused)
        self.models.release()

    def record_outcomes(self) -> None:
        for row in self.plan.rows:
            art = self.plan.artifact_step(row)
            if row not in self.failed_rows and art is not None and art.id in self.failed_steps:
                self.failed_rows[row] = (RuntimeError(f"its artifact ({art.id}) failed to build"), "")
                self.job.record_outcome(row, *self.failed_rows[row])
            elif row not in self.failed_rows:
                self.job.record_outcome(row, None)


def run_rounds(job: Job, plan: Plan, execute: Callable[[list[Step]], None], max_rounds: int | None = None) -> None:
    """Round 0 of everything, then each next round for what the gate has not decided yet."""
    from .gate import evaluate_gate
    from .table import build_table

    cfg = job.recipe.gate
    task_of = {t.column.name: t.name for t in COLUMNS}
    execute([s for s in plan.steps if s.kind != "eval" or s.round == 0])
    for r in range(1, min(plan.rounds(), max_rounds or plan.rounds())):
        verdict = evaluate_gate(build_table(job.root), cfg)
        open_checks = [c for c in verdict.checks if c.status == "undecided" and c.column in task_of]
        if not open_checks:
            log.info("every check is decided after round %d", r - 1)
            return
        pairs = {(c.variant, task_of[c.column]) for c in open_checks}
        tasks = {t for _, t in pairs}
        steps = [
            s
            for s in plan.steps
            if s.kind == "eval" and s.round == r and ((s.row, s.task) in pairs or (s.row == "base" and s.task in tasks))
        ]
        if not steps:
            break
        log.info(
            "round %d: %d undecided check(s): %s", r, len(open_checks), ", ".join(sorted(f"{c.variant}/{c.check}" for c in open_checks))
        )
        execute(steps)
    log.info("item budget reached")


def check_sequential(job: Job) -> None:
    cfg = job.recipe.gate
    if cfg is None or not cfg.has_thresholds():
        raise QuantpipeError("--until-decided needs gate thresholds: a recipe `gate:` section with max_drop (or min_recovery)")
    if job.recipe.eval.order != "random":
        raise QuantpipeError("--until-decided needs `eval.order: random` (a first-N prefix is not a random sample)")


def run_local(job: Job, wait: bool = False, builds_only: bool = False, max_rounds: int | None = None) -> Path | None:
    """The embedded executor: everything in this process. Returns the report folder.
    max_rounds: stop a sequential run after this many rounds (a pilot)."""
    with run_lock(job.root, wait=wait):
        if builds_only:
            clean_stale_tmp(job.root)
            job.prepare(evaluation=False)
            execute = Execution(job, job.plan().cut_after_builds())
            execute(execute.plan.steps)
            return None
        sequential = job.recipe.gate is not None and job.recipe.gate.until_decided
        if sequential:
            check_sequential(job)
        plan = job.start()
        execute = Execution(job, plan)
        if sequential:
            run_rounds(job, plan, execute, max_rounds)
        else:
            execute(plan.steps)
        execute.record_outcomes()
        return job.finish()
