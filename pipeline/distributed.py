"""Scale-out on Ray: the same run as Runner.run, as tasks on a cluster sharing the artifact store.

One task builds a variant's stage chain; one task evaluates a (row, benchmark) pair; one task
computes a row's KL to the base. Each declares the CPUs/GPUs/memory the recipe's `resources`
section asks for, so Ray places it. Tasks call the same Runner methods as the embedded executor
and write to the same content-keyed store, so results are reused across executors and a lost
task is redone by a re-run. The driver holds each recipe folder's lock for the whole run and
writes the tables once every task has ended.

The artifact store must be a path every node sees (one machine, or a shared filesystem).
"""

from __future__ import annotations

import functools
import json
import os
import traceback
from pathlib import Path

from .errors import QuantpipeError
from .runner import Runner, log

# Environment that decides where models, datasets and caches are and what may run.
FORWARDED_ENV = ("QUANTPIPE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


def runner_spec(runner: Runner) -> str:
    """Everything a worker needs to rebuild the driver's Runner, as JSON."""
    return json.dumps({
        "recipe": runner.recipe.model_dump(mode="json"),
        "source": str(runner.recipe.source) if runner.recipe.source else None,
        "artifacts_root": str(runner.root.parent), "allow_code": runner.allow_code,
        "data_dir": str(runner.evaluator.data_dir) if runner.evaluator.data_dir else None,
    })


@functools.lru_cache(maxsize=8)
def worker_runner(spec: str) -> Runner:
    """A prepared Runner per worker process and recipe: task setup is paid once per process."""
    from .recipe import parse_recipe

    d = json.loads(spec)
    recipe = parse_recipe(d["recipe"], Path(d["source"]) if d["source"] else None)
    root = Path(d["artifacts_root"])
    runner = Runner(recipe, root, d["allow_code"], Path(d["data_dir"]) if d["data_dir"] else None,
                    workdir=root / recipe.name / ".work" / f"worker-{os.getpid()}")
    runner.prepare()
    return runner


def _use_assigned_cpus() -> None:
    """Torch threads = the CPUs Ray gave this task (a reused worker may have had another count).
    GPTQ/AWQ results depend on the BLAS thread count, so equal counts give equal artifacts."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def build_task(spec: str, variant: str):
    _use_assigned_cpus()
    return worker_runner(spec).build(variant)


def evaluate_task(spec: str, row: str, art, task: str) -> str:
    _use_assigned_cpus()
    worker_runner(spec).evaluate_task(row, art, task)
    return task


def divergence_task(spec: str, row: str, art, *after) -> str:
    """`after`: results this one must wait for (a variant's KL needs the base's reference)."""
    _use_assigned_cpus()
    worker_runner(spec).divergence(row, art, None)
    return row


def _cause(err: Exception) -> Exception:
    return getattr(err, "cause", None) or err


def run_on_ray(runners: list[Runner], address: str | None = None, wait: bool = False) -> list[Path]:
    """Run every recipe's rows on Ray; `address` None starts a cluster on this machine."""
    import contextlib

    try:
        import ray
    except ImportError:
        raise QuantpipeError("--executor ray needs Ray: pip install -c constraints.txt -e '.[ray]'") from None
    from . import artifacts as store

    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    init = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if address is None:
        init |= {"include_dashboard": False, "num_cpus": os.cpu_count()}
    try:
        ray.init(address=address, **init)
    except Exception as e:  # noqa: BLE001
        raise QuantpipeError(f"cannot start or reach a Ray cluster at {address or '(local)'}: {e}") from None
    build, evaluate, divergence = (ray.remote(f) for f in (build_task, evaluate_task, divergence_task))
    try:
        with contextlib.ExitStack() as locks:
            submitted = []
            for runner in runners:
                locks.enter_context(store.run_lock(runner.root, wait=wait))
                runner.start()
                spec = runner_spec(runner)
                res = runner.recipe.resources
                bd = build.options(**res.build.ray_options())
                ev = evaluate.options(**res.evaluate.ray_options())
                dv = divergence.options(**res.evaluate.ray_options())
                base = [ev.remote(spec, "base", runner.base, t) for t in runner.evaluator.tasks]
                base_ref = dv.remote(spec, "base", runner.base)
                rows = {}
                for variant in runner.variants:
                    art = bd.remote(spec, variant)
                    rows[variant] = (art, [ev.remote(spec, variant, art, t) for t in runner.evaluator.tasks]
                                     + [dv.remote(spec, variant, art, base_ref)])
                log(f"{runner.recipe.name}: submitted {1 + len(rows)} rows x {len(runner.evaluator.tasks)} tasks to Ray")
                submitted.append((runner, base + [base_ref], rows))
            reports = []
            for runner, base, rows in submitted:
                try:
                    ray.get(base)
                except ray.exceptions.RayTaskError as e:
                    raise QuantpipeError(f"{runner.recipe.name}: base row failed: {_cause(e)}") from None
                for variant, (art, rest) in rows.items():
                    try:
                        ray.get(art)
                        ray.get(rest)
                        runner.record_outcome(variant, None)
                    except ray.exceptions.RayTaskError as e:
                        runner.record_outcome(variant, _cause(e), str(e))
                    except Exception as e:  # noqa: BLE001 - a lost worker must not sink the other rows
                        runner.record_outcome(variant, e, traceback.format_exc())
                reports.append(runner.finish())
            return reports
    finally:
        ray.shutdown()
