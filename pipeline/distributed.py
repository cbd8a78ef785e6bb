"""Scale-out on Ray: the same plan as the local executor, each step a task on a cluster.

One task per step (a stage build, a (row, task) evaluation or round, the KL reference, a row's
KL); a task starts when the tasks of the steps it depends on have finished. Each declares the
CPUs/GPUs/memory it needs (`task_options`): when the cluster has GPUs, every step asks for one and
a vLLM evaluation for its engine's (tensor x pipeline x data parallel) on one node; the recipe's
`resources` section overrides, but never below what a vLLM step needs. Tasks call the same
`Job.run_step` as the local executor and write to the same content-keyed store, so results are
reused across executors and a lost task is redone by a re-run. The driver holds each recipe
folder's lock for the whole run and writes the tables once every task has ended.

At the start, one task per node (`check_nodes`) checks that the node sees the artifact store (a
token the driver wrote, and a file it writes itself), the data directory and a local base model
at the driver's paths, and resolves (fetches or converts) the base model there once, so the
step tasks find it; workers take the driver's base key instead of hashing the weights again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
import uuid
from pathlib import Path
from typing import Any

from . import store
from .errors import QuantpipeError
from .isolation import ModelSlot, job_spec, worker_job
from .job import Job
from .plan import Plan, Step
from .runner import check_sequential, run_rounds

log = logging.getLogger("quantpipe")

# Environment that decides where models, datasets and caches are and what may run.
FORWARDED_ENV = ("QUANTPIPE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TQDM_")


def _use_assigned_cpus() -> None:
    """Torch threads = the CPUs Ray gave this task (a reused worker may have had another count).
    GPTQ/AWQ results depend on the BLAS thread count, so equal counts give equal artifacts."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def step_task(spec: str, step: Step, *after) -> str:
    """`after`: the results of the steps this one depends on (Ray starts it once they exist)."""
    _use_assigned_cpus()
    job = worker_job(spec)
    models = ModelSlot(job)
    try:
        job.run_step(step, models)
    finally:
        models.release()  # a vLLM row's process ends with the task: Ray may hand its GPUs on at once
    return step.id


# -- what each task asks Ray for ---------------------------------------------------------------
def gpus_needed(job: Job, step: Step) -> int:
    """GPUs a step cannot run without, on one node: a vLLM evaluation's engine (TP x PP x DP)."""
    if step.kind == "eval" and job.eval_backend(step.row).engine == "vllm":
        return job.recipe.eval.vllm.gpus()
    return 0


def task_options(job: Job, step: Step, cluster_gpus: float, node_gpus: float) -> dict[str, Any]:
    """Ray options of a step's task. cluster_gpus: GPUs in the cluster; node_gpus: the most on one node.
    When the cluster has GPUs, every step asks for one (a vLLM evaluation for its engine's);
    `resources.build` / `resources.evaluate` override what they set."""
    res = job.recipe.resources.build if step.kind == "build" else job.recipe.resources.evaluate
    opts = res.ray_options()
    need = gpus_needed(job, step)
    if need and job.recipe.eval.vllm.data_parallel_size > 1:
        # lm-eval runs each replica as a Ray actor of its own asking for GPUs: inside a task that holds them, it would wait forever
        raise QuantpipeError(
            "eval.vllm.data_parallel_size > 1 starts lm-eval's own Ray actors, which cannot run inside a Ray task; "
            "with --executor ray use data_parallel_size: 1 (rows already run in parallel, one task each)"
        )
    if "num_gpus" not in res.model_fields_set:
        opts["num_gpus"] = max(need, 1) if cluster_gpus > 0 else need
    if opts["num_gpus"] < need:
        raise QuantpipeError(
            f"{step.id} needs {need} GPU(s) (eval.vllm: tensor x pipeline x data parallel) but resources.evaluate.num_gpus "
            f"is {opts['num_gpus']}; raise it or leave it out"
        )
    if opts["num_gpus"] > node_gpus:
        have = f"the largest node has {node_gpus:g}" if node_gpus else "the cluster has none"
        raise QuantpipeError(f"{step.id} asks for {opts['num_gpus']:g} GPU(s) on one node and {have}; Ray would never start it")
    return opts


def request_summary(plan: Plan, options: dict[str, dict[str, Any]]) -> str:
    """One line: how many steps of each kind ask for what."""
    groups: dict[tuple, int] = {}
    for step in plan.steps:
        o = options[step.id]
        what = (step.kind, o["num_cpus"], o["num_gpus"], o.get("memory"))
        groups[what] = groups.get(what, 0) + 1
    parts = []
    for (kind, cpus, gpus, mem), n in groups.items():
        ask = f"{cpus:g} CPU, {gpus:g} GPU" + (f", {mem / 2**30:g} GiB" if mem else "")
        parts.append(f"{n} {kind} x ({ask})")
    return "; ".join(parts)


def cluster_gpus(nodes: list[dict]) -> tuple[float, float]:
    """(GPUs in the cluster, the most on one node) among the live nodes of `ray.nodes()`."""
    gpus = [float(n.get("Resources", {}).get("GPU", 0)) for n in nodes if n.get("Alive")]
    return sum(gpus), max(gpus, default=0.0)


# -- every node sees the store, the data and the model; the model is fetched once per node -------
def node_check(token_path: str, token: str, paths: list[str], models: list[tuple[str, bool, dict[str, int] | None]]) -> str | None:
    """Run once on each node: None if everything is there at the driver's paths, else why not."""
    import socket

    here = socket.gethostname()
    tok = Path(token_path)
    try:
        if tok.read_text() != token:
            return f"{here}: {tok.parent} is another folder than the driver's (its check token differs)"
        mine = tok.with_name(f"{tok.name}.{here}.{os.getpid()}")
        mine.write_text(token)  # tasks write records there too
        mine.unlink()
    except OSError as e:
        return f"{here}: cannot read and write the artifact store at {tok.parent} ({e.strerror or e})"
    for p in paths:
        if not Path(p).exists():
            return f"{here}: {p} does not exist"
    from .models import resolve_model

    for model_id, offline, listing in models:
        try:
            path = resolve_model(model_id, offline)  # a built-in is converted here once, for every task on this node
        except QuantpipeError as e:
            return f"{here}: {e}"
        if listing is not None and Path(str(path)).is_dir():
            mine = {f.name: f.stat().st_size for f in Path(path).iterdir() if f.is_file()}
            if mine != listing:
                return f"{here}: base model {model_id} at {path} differs from the driver's (file names or sizes)"
    return None


def _listing(path) -> dict[str, int] | None:
    p = Path(str(path))
    return {f.name: f.stat().st_size for f in p.iterdir() if f.is_file()} if p.is_dir() else None


def check_nodes(ray, jobs: list[Job]) -> None:
    """One task per live node (pinned to it): refuse the run in one line where a node cannot see
    the store, the data or the base model at the driver's paths."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    paths = sorted({str(j.data_dir or j.evaluator.data_dir) for j in jobs if (j.data_dir or j.evaluator.data_dir)})
    paths += sorted({str(j.base_dir) for j in jobs if j.base_dir is not None and not j.recipe.model.id.startswith("builtin:")})
    models = sorted({(j.recipe.model.id, j.recipe.offline, None) for j in jobs}, key=str)
    models = [(m, off, _listing(next(j.model_path for j in jobs if j.recipe.model.id == m))) for m, off, _ in models]
    tokens = []
    for root in sorted({j.root.parent for j in jobs}):
        root.mkdir(parents=True, exist_ok=True)
        tok = root / f".node-check-{token}"
        tok.write_text(token)
        tokens.append(tok)
    try:
        task = ray.remote(node_check)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = []
        for n in nodes:
            pin = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
            for tok in tokens:
                refs.append(task.options(num_cpus=0, scheduling_strategy=pin, name="node check").remote(str(tok), token, paths, models))
        problems = [p for p in ray.get(refs) if p]
    finally:
        for tok in tokens:
            tok.unlink(missing_ok=True)
    if problems:
        raise QuantpipeError(
            f"every Ray node must see the artifact store, data and base model at the driver's paths; {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    log.debug("%d Ray node(s) see the store, data and base model", len(nodes))


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
        gpus, node_gpus = cluster_gpus(ray.nodes())
        with contextlib.ExitStack() as locks:
            reports = []
            for job in jobs:  # recipes one after another; each recipe's steps spread over the cluster
                locks.enter_context(store.run_lock(job.root, wait=wait))
                sequential = job.recipe.gate is not None and job.recipe.gate.until_decided
                if sequential:
                    check_sequential(job)
                plan = job.start()
                check_nodes(ray, [job])  # before any step: every node sees the store, data and model
                spec, refs = job_spec(job), {}
                options = {s.id: task_options(job, s, gpus, node_gpus) for s in plan.steps}  # refused before any task runs
                log.info("%s: Ray requests: %s", job.recipe.name, request_summary(plan, options))

                def execute(steps: list[Step], spec=spec, refs=refs, options=options, job=job) -> None:
                    for step in steps:
                        opts = options[step.id]
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
