"""The local executor: run a job's plan in this process, one step after another.

Steps run in plan order (a row's builds, its evaluations, its KL), so one loaded model serves all
of a row's evaluations. A step that fails marks its row failed (<row>/error.json) and skips the
row's remaining steps; the other rows still finish, and the table shows which failed and why.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from .job import Job, ModelSlot, Progress
from .plan import Plan
from .store import clean_stale_tmp, run_lock

log = logging.getLogger("quantpipe")


def execute(job: Job, plan: Plan) -> set[str]:
    """Run every step; returns the rows that failed."""
    models, progress, failed = ModelSlot(job), Progress(plan.steps), {}
    ids_failed: set[str] = set()
    for step in plan.steps:
        t0 = time.time()
        blocked = [d for d in step.deps if d in ids_failed]
        if blocked or step.row in failed:
            ids_failed.add(step.id)
            progress.finished(step, 0.0, reused=False, failed=True)
            continue
        try:
            reused = job.run_step(step, models)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one row's failure must not sink the others
            ids_failed.add(step.id)
            failed[step.row] = (e, traceback.format_exc())
            job.record_outcome(step.row, e, failed[step.row][1])
            progress.finished(step, time.time() - t0, reused=False, failed=True)
            continue
        progress.finished(step, time.time() - t0, reused)
    for row in plan.rows:
        if row not in failed and not any(d in ids_failed for s in plan.of_row(row) for d in s.deps):
            job.record_outcome(row, None)
    # a row whose artifact step (owned by another row) failed is failed too
    for row in plan.rows:
        art = plan.artifact_step(row)
        if art is not None and art.id in ids_failed and row not in failed:
            failed[row] = (RuntimeError(f"its artifact ({art.id}) failed to build"), "")
            job.record_outcome(row, *failed[row])
    models.release()
    return set(failed)


def run_local(job: Job, wait: bool = False, builds_only: bool = False) -> Path | None:
    """The embedded executor: everything in this process. Returns the report folder."""
    with run_lock(job.root, wait=wait):
        if builds_only:
            clean_stale_tmp(job.root)
            job.prepare(evaluation=False)
            execute(job, job.plan().cut_after_builds())
            return None
        plan = job.start()
        execute(job, plan)
        return job.finish()
