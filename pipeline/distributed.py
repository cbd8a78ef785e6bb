"""Scale-out on Ray: the same plan as the local executor, each step a task on a cluster.

One task per step (a stage build, a (row, task) evaluation or round, the KL reference, a row's
KL); a task starts when the tasks of the steps it depends on have finished. Each declares the
CPUs/GPUs/memory the recipe's `resources` section asks for, so Ray places it. Tasks call the same
`Job.run_step` as the local executor and write to the same content-keyed store, so results are
reused across executors and a lost task is redone by a re-run. The driver holds each recipe
folder's lock for the whole run and writes the tables once every task has ended.

The artifact store must be a path every node sees (one machine, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import traceback
from pathlib import Path

from . import store
from .errors import QuantpipeError
from .job import Job, ModelSlot
from .plan import Step
from .runner import check_sequential, run_rounds

log = logging.getLogger("quantpipe")

# Environment that decides where models, datasets and caches are and what may run.
FORWARDED_ENV = ("QUANTPIPE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TQDM_")


def job_spec(job: Job) -> str:
    """Everything a worker needs to rebuild the driver's Job, as JSON."""
    return json.dumps(
        {
            "recipe": job.recipe.model_dump(mode="json"),
            "source": str(job.recipe.source) if job.recipe.source else None,
            "artifacts_root": str(job.root.parent),
            "allow_code": job.allow_code,
            "variants": job.variants,
            "data_dir": str(job.evaluator.data_dir) if job.evaluator.data_dir else None,
        }
    )


@functools.lru_cache(maxsize=8)
def worker_job(spec: str) -> Job:
    """A prepared Job per worker process and recipe: its setup is paid once per process."""
    from .recipe import parse_recipe

    d = json.loads(spec)
    recipe = parse_recipe(d["recipe"], Path(d["source"]) if d["source"] else None)
    root = Path(d["artifacts_root"])
    job = Job(
        recipe,
        root,
        d["allow_code"],
        Path(d["data_dir"]) if d["data_dir"] else None,
        d["variants"],
        workdir=root / recipe.name / ".work" / f"worker-{os.getpid()}",
    )
    job.prepare()
    return job


def _use_assigned_cpus() -> None:
    """Torch threads = the CPUs Ray gave this task (a reused worker may have had another count).
    GPTQ/AWQ results depend on the BLAS thread count, so equal counts give equal artifacts."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def step_task(spec: str, step: Step, *after) -> str:
    """`after`: the results of the steps this one depends on (Ray starts it once they exist)."""
    _use_assigned_cpus()
    worker_job(spec).run_step(step, ModelSlot(worker_job(spec)))
    return step.id


def _cause(err: Exception) -> Exception:
    return getattr(err, "cause", None) or err


def run_on_ray(jobs: list[Job], address: str | None = None, wait: bool = False) -> list[Path]:
    """Run every recipe's plan on Ray; `address` None starts a cluster on this machine."""
    try:
        import ray
    except ImportError as e:
        raise QuantpipeError("--executor ray needs Ray: pip install -c constraints.txt -e '.[ray]'") from e
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    init = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if address is None:
        init |= {"include_dashboard": False, "num_cpus": os.cpu_count()}
    try:
        ray.init(address=address, **init)
    except Exception as e:  # noqa: BLE001 - Ray raises many types; the message names the problem
        raise QuantpipeError(f"cannot start or reach a Ray cluster at {address or '(local)'}: {e}") from e
    task = ray.remote(step_task)
    try:
        with contextlib.ExitStack() as locks:
            reports = []
            for job in jobs:  # recipes one after another; each recipe's steps spread over the cluster
                locks.enter_context(store.run_lock(job.root, wait=wait))
                sequential = job.recipe.gate is not None and job.recipe.gate.until_decided
                if sequential:
                    check_sequential(job)
                plan = job.start()
                spec, res, refs = job_spec(job), job.recipe.resources, {}

                def execute(steps: list[Step], job=job, spec=spec, res=res, refs=refs) -> None:
                    for step in steps:
                        opts = (res.build if step.kind == "build" else res.evaluate).ray_options()
                        after = [refs[d] for d in step.deps if d in refs]
                        refs[step.id] = task.options(**opts, name=step.id).remote(spec, step, *after)
                    log.info("%s: submitted %d steps to Ray", job.recipe.name, len(steps))
                    ray.wait([refs[s.id] for s in steps], num_returns=len(steps))

                if sequential:
                    run_rounds(job, plan, execute)
                else:
                    execute(plan.steps)
                for row in plan.rows:
                    mine = [refs[s.id] for s in plan.of_row(row) if s.id in refs]
                    art = plan.artifact_step(row)
                    if art is not None and art.row != row:
                        mine.append(refs[art.id])
                    try:
                        ray.get(mine)
                        job.record_outcome(row, None)
                    except ray.exceptions.RayTaskError as e:
                        job.record_outcome(row, _cause(e), str(e))
                    except Exception as e:  # noqa: BLE001 - a lost worker must not sink the other rows
                        job.record_outcome(row, e, traceback.format_exc())
                reports.append(job.finish())
            return reports
    finally:
        ray.shutdown()
