"""Where a row's model lives: `ModelSlot` (one loaded model at a time, here or in a process of
the row's own), a Job rebuilt in another process, and that process.

`job_spec` is everything another process needs to rebuild the driver's Job (the Ray workers and
the row processes below both use it); `worker_job` rebuilds and prepares it once per process.

`RowProcess`: vLLM keeps GPU memory in its engine (and, with tensor parallelism, in worker
processes) that dropping the `LLM` object does not reliably return, so the next row's engine
would start on a partly full GPU. With `eval.engine: vllm` the model steps of each (row,
backend) run in a spawned process that rebuilds the Job and runs `Job.run_step` there (its store
writes are the same atomic commits); the process is ended, and waited for, before the next row's
starts, so each row starts with a fresh process's GPU memory. Not daemonic: vLLM starts
processes of its own, which a daemonic process may not.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from . import remote_code, store

if TYPE_CHECKING:
    from .backends import Backend, LoadedModel
    from .job import Job
    from .plan import Step

log = logging.getLogger("quantpipe")


class ModelSlot:
    """One loaded model at a time: consecutive steps of a row on the same backend share it.

    `isolate` (default: when the recipe's engine is vLLM): the model steps of each (row, backend)
    run in a spawned process of their own (isolation.RowProcess), ended when the next step needs
    another row or backend, so every row starts with a fresh process's GPU memory."""

    def __init__(self, job: Job, isolate: bool | None = None):
        self.job, self.row, self.loaded = job, None, None
        self.isolate = job.recipe.eval.engine == "vllm" if isolate is None else isolate
        self.process = None  # isolation.RowProcess serving self.row
        self.held_before: dict[str, int] = {}  # per device: held before the row's model loaded (memory.held_bytes)

    def get(self, row: str, backend: type[Backend]) -> LoadedModel:
        if self.row != (row, backend.name):
            from .memory import held_bytes

            self.release()
            self.held_before = {d: held_bytes(d) for d in ("cpu", "cuda")}
            art = self.job.artifact(row)
            log.debug("%s: loading %s for evaluation (%s)", row, art.path, backend.name)
            self.loaded = backend().load(art, **self.job.load_args(row, backend))
            if remote_code.allowed():
                self.loaded.evaluated_as += "; runs the model folder's own code (model.trust_remote_code)"
            self.row = (row, backend.name)
        return self.loaded

    def run_isolated(self, step: Step) -> bool:
        """Run a model step in the process of its (row, backend), started if needed (not for a stored result)."""
        if store.verify(step.path, step.key)[0] is not None:  # a re-run starts no process for what is stored
            return True
        who = (step.row, self.job.step_backend(step).name)
        if self.process is None or self.process.who != who:
            self.release()
            self.process = RowProcess(self.job, who)
        return self.process.run(step)

    def release(self) -> None:
        if self.process is not None:
            self.process.close()  # returns once the process (and its GPU memory) is gone
        self.row, self.loaded, self.process = None, None, None


JOIN_S = 120  # how long a row process may take to shut its engine down before it is killed


def job_spec(job: Job) -> str:
    """Everything another process needs to rebuild the driver's Job, as JSON."""
    return json.dumps(
        {
            "recipe": job.recipe.model_dump(mode="json"),
            "source": str(job.recipe.source) if job.recipe.source else None,
            "artifacts_root": str(job.root.parent),
            "allow_code": job.allow_code,
            "variants": job.variants,
            "data_dir": str(job.evaluator.data_dir) if job.evaluator.data_dir else None,
            "base_key": job.base.key,  # hashed once, by the driver
        }
    )


@functools.lru_cache(maxsize=8)
def worker_job(spec: str) -> Job:
    """A prepared Job per process and recipe: its setup is paid once per process."""
    from .job import Job
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
    job.prepare(base_key=d.get("base_key"))
    return job


def _serve(spec: str, conn, level: int) -> None:
    """The row process: run each step it is sent, reply (reused, None) or (None, exception)."""
    from . import log as qlog

    qlog.setup(1 if level <= logging.DEBUG else (0 if level <= logging.INFO else -1))  # as quiet as the parent
    job, slot = None, None
    try:
        job = worker_job(spec)
        slot = ModelSlot(job, isolate=False)
        while (step := conn.recv()) is not None:
            try:
                conn.send((job.run_step(step, slot), None))
            except Exception as e:  # noqa: BLE001 - the parent records it as the step's failure
                _send_error(conn, e)
    except (KeyboardInterrupt, EOFError):  # Ctrl-C reaches the whole process group; EOF: the parent is gone
        pass
    except Exception as e:  # noqa: BLE001 - e.g. preparing the job failed: the parent's step fails with it
        _send_error(conn, e)
    finally:
        if slot is not None:
            slot.release()
        if job is not None:
            shutil.rmtree(job.workdir, ignore_errors=True)


def _send_error(conn, e: Exception) -> None:
    tb = traceback.format_exc()
    try:
        conn.send((None, (e, tb)))
    except Exception:  # noqa: BLE001 - not picklable: its type and message still reach the parent
        conn.send((None, (RuntimeError(f"{type(e).__name__}: {e}"), tb)))


class RowProcessError(RuntimeError):
    """A row process ended without answering (killed, out of memory, a crash in native code)."""


class RowProcess:
    """A spawned process serving one (row, backend)'s model steps; `close()` ends it."""

    def __init__(self, job: Job, who: tuple[str, str]):
        self.who = who
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self.conn, child = ctx.Pipe()
        level = logging.getLogger("quantpipe").getEffectiveLevel()
        self.proc = ctx.Process(target=_serve, args=(job_spec(job), child, level), name=f"quantpipe {who[0]} ({who[1]})")
        self.proc.start()
        child.close()
        log.debug("%s: process %d serves its %s steps", who[0], self.proc.pid, who[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, step: Step) -> bool:
        """Run `step` in the process; True when its result was reused. Its exception is re-raised here."""
        if not self.proc.is_alive():
            raise RowProcessError(f"{self.who[0]}'s process ({self.who[1]}) has ended (exit code {self.proc.exitcode})")
        try:
            self.conn.send(step)
            reused, error = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            self.proc.join(5)
            raise RowProcessError(
                f"{self.who[0]}'s process ({self.who[1]}) ended without an answer (exit code {self.proc.exitcode})"
            ) from e
        if error is not None:
            exc, tb = error
            log.debug("%s failed in process %d:\n%s", step.id, self.pid, tb)
            raise exc
        return reused

    def close(self) -> None:
        """Ask the process to finish and wait until it and every process it started (vLLM's engine
        and tensor-parallel workers) are gone: their GPU memory is free then."""
        from .memory import descendants

        left = descendants(self.pid) if self.proc.is_alive() else set()
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(JOIN_S)
            if self.proc.is_alive():
                log.warning("%s: process %d did not exit in %d s; killing it", self.who[0], self.pid, JOIN_S)
                self.proc.kill()
                self.proc.join()
        self.conn.close()
        deadline = time.monotonic() + JOIN_S
        while (left := {p for p in left if _alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:  # started by the row process (their parent is gone): ours to end
            log.warning("%s: process %d (started by its row process) is still running; killing it", self.who[0], pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it holds no memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
