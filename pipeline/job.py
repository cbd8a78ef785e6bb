"""A job: one recipe prepared once per process, its plan, and how each kind of step runs.

Executors (runner.run_local, distributed.run_on_ray) call `Job.plan()` and then `Job.run_step`
for each step. A step reads its inputs from the store (the records of the steps it depends on)
and writes its result through `store.cached`, so a step runs the same in any process.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import shutil
import traceback
from pathlib import Path
from typing import Protocol

from . import remote_code, store
from .backends import Backend, LoadedModel, backend_for
from .backends.base import BACKENDS, DEFAULT_ENGINE, accepts_target
from .calibration import calibration_fingerprint, load_calibration
from .errors import QuantpipeError
from .evaluation import Evaluator
from .models import count_parameters, fingerprint, model_info, resolve_model
from .placement import Target, checkpoint_dtype, run_target
from .plan import Plan, Step
from .recipe import Recipe, check_against_model
from .stages.base import StageContext
from .stages.registry import STAGES
from .types import Artifact

log = logging.getLogger("quantpipe")

MAX_LENGTH = 4096  # context length of every evaluation (vLLM: eval.vllm.max_model_len may set its own)


class Models(Protocol):
    """Where a step gets its row's loaded model (isolation.ModelSlot, one level up, implements it)."""

    held_before: dict[str, int]  # per device: what the process held before the row's model loaded

    def get(self, row: str, backend: type[Backend]) -> LoadedModel: ...


def built(step: Step, who: str) -> Artifact:
    """The artifact a build step stored (verified), for `who` (a row or a step) that needs it."""
    rec, why = store.verify(step.path, step.key)
    if rec is None:
        raise QuantpipeError(f"{who}: its artifact at {step.path} is not built ({why})")
    return Artifact(rec.path, rec.meta["format"], rec.key, rec.meta.get("bits"), rec.meta.get("meta") or {})


def _device(loaded: LoadedModel) -> str:
    """Where the row's evaluation allocates: the GPU for engines on CUDA, else this process's memory.
    vLLM allocates in its engine processes (and, with tensor parallelism, on several GPUs)."""
    if loaded.engine == "vllm":
        return "gpu-process-tree"
    model = getattr(loaded.lm, "model", None)
    device = getattr(model, "device", None)
    return str(device) if device is not None and str(device).startswith("cuda") else "cpu"


def round_ends(n_chunks: int, growth: float) -> list[int]:
    """Cumulative chunks at the end of each round: 1, then x growth (at least one more chunk) per round."""
    ends = [1]
    while ends[-1] < n_chunks:
        ends.append(min(n_chunks, max(ends[-1] + 1, math.ceil(ends[-1] * growth))))
    return ends


class Job:
    def __init__(
        self,
        recipe: Recipe,
        artifacts_root: Path,
        allow_code_execution: bool = False,
        data_dir: Path | None = None,
        variants: list[str] | None = None,
        workdir: Path | None = None,
    ):
        self.recipe = recipe
        self.root = Path(artifacts_root) / recipe.name
        self.workdir = workdir or self.root / ".work"  # task configs and datasets cache of this process
        self.allow_code = allow_code_execution
        self.data_dir = data_dir
        self.variants = variants or list(recipe.variants)
        unknown = set(self.variants) - set(recipe.variants)
        if unknown:
            raise QuantpipeError(f"no variant named {', '.join(sorted(unknown))} in recipe '{recipe.name}'")
        self._calibration: list[str] | None = None
        self._plan: Plan | None = None
        self.evaluator: Evaluator | None = None
        self.target = Target()  # where rows are evaluated: resolved by prepare (placement.py)

    # -- setup: everything that can fail on bad input fails here, before any work -----------------
    def prepare(self, evaluation: bool = True, base_key: str | None = None) -> None:
        """base_key: the driver's key of the base model (a worker process then does not re-hash it)."""
        remote_code.allow(self.recipe.model.trust_remote_code)
        remote_code.guard()
        if self.recipe.offline:
            for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
                os.environ[var] = "1"
        self.model_path = resolve_model(self.recipe.model.id, offline=self.recipe.offline)
        self.info = model_info(self.model_path)
        check_against_model(self.recipe, self.info)
        # a local folder, or (online) a hub id that transformers resolves itself
        self.base_dir = Path(self.model_path) if Path(str(self.model_path)).exists() else None
        self.base_dtype = checkpoint_dtype(self.base_dir) if self.base_dir else None
        self.base = Artifact(
            self.base_dir or self.model_path,
            "hf",
            key=base_key or store.content_key("base", fingerprint(self.model_path), self.recipe.model.dtype),
        )
        if evaluation:
            self.target = run_target(self.recipe, self.base_dir)
            for row in self.rows():  # e.g. vLLM without a GPU: refused now
                for backend in {self.eval_backend(row), self.kl_backend(row) or self.eval_backend(row)}:
                    backend.check_available()
            self.check_kl()
            self.evaluator = Evaluator(self.recipe, self.workdir, self.allow_code, self.data_dir)

    def rows(self) -> list[str]:
        return ["base", *self.variants]

    def _stages(self, row: str) -> list:
        return [] if row == "base" else self.recipe.stages(row)

    def _row_format(self, row: str) -> str:
        fmt = "hf"
        for stage in self._stages(row):
            fmt = stage.output_format(fmt)
        return fmt

    # -- which backend runs what ----------------------------------------------------------------
    def eval_backend(self, row: str) -> type[Backend]:
        return backend_for(self._row_format(row), self.recipe.eval.engine)

    def kl_backend(self, row: str) -> type[Backend] | None:
        """The backend that gives the row's next-token distributions: its own, or for an engine
        that gives none (vLLM) the default engine's for its format (eval.vllm.kl), else None."""
        own = self.eval_backend(row)
        if own.gives_logprobs:
            return own
        if own.engine == "vllm" and self.recipe.eval.vllm.kl == "none":
            return None
        fallback = backend_for(self._row_format(row), DEFAULT_ENGINE)
        return fallback if fallback.gives_logprobs else None

    def reference_backend(self) -> type[Backend]:
        """The base's KL reference is always computed on the default engine (never on one that
        may give no distributions)."""
        return backend_for("hf", DEFAULT_ENGINE)

    def kl_rows(self) -> list[str]:
        return [r for r in self.variants if self.kl_backend(r) is not None]

    def step_backend(self, step: Step) -> type[Backend]:
        if step.kind == "eval":
            return self.eval_backend(step.row)
        if step.kind == "kl_reference":
            return self.reference_backend()
        return self.kl_backend(step.row)

    def load_args(self, row: str, backend: type[Backend]) -> dict:
        """Backend.load's arguments for a row's model (the artifact aside)."""
        ev = self.evaluator
        # a backend that serves only a row's KL steps (vLLM rows) evaluates nothing: no batch to size
        batch = ev.batch_size if backend is self.eval_backend(row) else 1
        args = {"dtype": self.recipe.model.dtype, "batch_size": batch, "max_length": MAX_LENGTH}
        if batch == "auto" and (budget := ev.memory_budget_bytes()) is not None:  # plug-ins without the keyword keep working
            args["memory_budget"] = budget
        if backend.engine == "vllm":
            args["vllm"] = self.recipe.eval.vllm
        if accepts_target(backend):  # the run's device (placement.py), for backends whose load takes one
            args["target"] = self.target
        return args

    def check_kl(self) -> None:
        """A recipe that asks for KL where no backend can give it is refused before any work."""
        gate = self.recipe.gate
        if gate is not None and gate.max_kl is not None:
            for row in gate.variants or self.variants:
                if row in self.variants and self.kl_backend(row) is None:
                    own = self.eval_backend(row)
                    why = "eval.vllm.kl is none" if own.engine == "vllm" else f"backend '{own.name}' gives no next-token distributions"
                    raise QuantpipeError(f"gate.max_kl needs a KL entry for '{row}', which gets none ({why})")
        ref = self.reference_backend()
        if self.kl_rows() and not ref.gives_logprobs:
            raise QuantpipeError(
                f"rows {', '.join(self.kl_rows())} need the base's KL reference, and the default engine's backend "
                f"for 'hf' ('{ref.name}') gives no next-token distributions"
            )

    def calibration(self) -> list[str]:
        if self._calibration is None:
            self._calibration = load_calibration(self.recipe)
            log.debug("calibration: %d samples from %s", len(self._calibration), self.recipe.calibration.dataset)
        return self._calibration

    # -- the plan ---------------------------------------------------------------------------------
    def plan(self) -> Plan:
        """Every step of this job, keyed; a chain prefix shared by variants is one step."""
        if self._plan is not None:
            return self._plan
        plan = Plan(self.rows())
        by_key: dict[str, Step] = {}
        for row in self.variants:
            key, prev = self.base.key, None
            for i, stage in enumerate(self.recipe.stages(row)):
                params = stage.params.model_dump(mode="json")
                calib = [calibration_fingerprint(self.recipe)] if stage.uses_calibration() else []
                # which implementation did the work: a plug-in of another distribution never shares its keys
                versions = {**store.lib_versions(stage.libraries), "implementation": STAGES.identity(stage.name)}
                if stage.revision:  # only where set, so other stages keep their keys
                    versions = {**versions, "stage_revision": stage.revision}
                key = store.content_key(key, stage.name, params, versions, self.recipe.calibration.model_dump(), *calib)
                if key not in by_key:
                    by_key[key] = plan.add(
                        Step(
                            "build",
                            row,
                            key,
                            self.root / row / "stages" / f"{i:02d}-{stage.name}",
                            deps=(prev.id,) if prev else (),
                            stage=i,
                            stage_name=stage.name,
                        )
                    )
                prev = by_key[key]
            plan.set_artifact(row, prev)
        if self.evaluator is None:
            self._plan = plan
            return plan
        ev = self.evaluator
        kl_ref, kl_rows = None, self.kl_rows()
        for row in plan.rows:
            art_step = plan.artifact_step(row)
            art_key = art_step.key if art_step else self.base.key
            deps = (art_step.id,) if art_step else ()
            backend = self.eval_backend(row)
            versions = self._versions(backend, row)
            if backend.engine == "vllm":  # its engine arguments change its numbers (and only its rows')
                versions = {**versions, "vllm": self.recipe.eval.vllm.engine_args()}
            for task in ev.tasks:
                chunks = self._chunks(task)
                ends = round_ends(len(chunks), self.recipe.eval.round_growth)
                for items in chunks:
                    settings = ev.settings(task, None if items is None else ev.selection(task, *items))
                    path = self._eval_path(row, task, items)
                    rnd = bisect.bisect_right(ends, items[0] // self.recipe.eval.chunk_items) if items else 0
                    key = store.content_key(art_key, settings, versions)
                    plan.add(Step("eval", row, key, path, deps=deps, task=task, items=items, round=rnd))
            if not kl_rows:
                continue
            if kl_ref is None:  # after the base's evaluations, on the default engine
                from . import divergence as dv

                self.kl_texts = dv.corpus(ev.data_dir)
                ref_versions = self._versions(self.reference_backend(), "base")
                ref_key = store.content_key(self.base.key, dv.corpus_key(self.kl_texts), ref_versions)
                kl_ref = plan.add(Step("kl_reference", "base", ref_key, self.root / "base" / "kl-reference"))
            if row in kl_rows:
                versions = self._versions(self.kl_backend(row), row)
                plan.add(Step("kl", row, store.content_key(art_key, kl_ref.key, versions), self.root / row / "kl", deps=(*deps, kl_ref.id)))
            elif row != "base":
                log.debug("%s: no KL (eval.vllm.kl: none)", row)
        self._plan = plan
        return plan

    def _eval_path(self, row: str, task: str, items: tuple[int, int] | None) -> Path:
        """A first-N record at <row>/eval/<task>; a random-order chunk beside it, never inside it (records
        never nest), under its order's seed, so both seeds' chunks live side by side."""
        if items is None:
            return self.root / row / "eval" / task
        return self.root / row / "eval-random" / f"seed-{self.recipe.eval.seed}" / task / f"items-{items[0]:06d}-{items[1]:06d}"

    def _versions(self, backend: type[Backend], row: str) -> dict:
        """What of a backend enters its steps' keys: a new torch or llama.cpp re-evaluates; so does
        another implementation of the same backend name (a plug-in), or another device or dtype."""
        versions = {**store.lib_versions(backend.libraries), "implementation": BACKENDS.identity(backend.name)}
        if backend.revision:
            versions = {**versions, "backend_revision": backend.revision}
        if accepts_target(backend):  # CUDA, or a dtype model.dtype did not give before: other numbers
            versions = {**versions, **self.target.key(self._row_format(row), self.recipe.model.dtype, self.base_dtype)}
        if backend.activation_kernel and any(s.quantizes_activations() for s in self._stages(row)):
            versions = {**versions, "activation_kernel": backend.activation_kernel}  # e.g. FP8 rows evaluated batch-invariantly
        return versions

    def _chunks(self, task: str) -> list[tuple[int, int] | None]:
        """[start, end) of each stored chunk of a random-order task; [None] for a first-N task."""
        if self.recipe.eval.order != "random":
            return [None]
        size, n = self.recipe.eval.chunk_items, self.evaluator.n_items(task)
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    # -- steps ------------------------------------------------------------------------------------
    def artifact(self, row: str) -> Artifact:
        """The row's model: the base, or the stored output of its chain's last stage."""
        step = self.plan().artifact_step(row)
        return self.base if step is None else built(step, row)

    def run_step(self, step: Step, models: Models) -> bool:
        """Run one step (or reuse its stored result); True when it was reused."""
        if step.kind == "build":
            return self._build(step)
        if models.isolate:  # vLLM: the row's model steps run in a process of their own
            return models.run_isolated(step)
        if step.kind == "eval":
            return self._evaluate(step, models)
        if step.kind == "kl_reference":
            return self._kl_reference(step, models)
        return self._kl(step, models)

    def _input_artifact(self, step: Step) -> Artifact:
        if not step.deps:
            return self.base
        return built(next(s for s in self.plan().steps if s.id == step.deps[0]), step.id)

    def _build(self, step: Step) -> bool:
        stage = self.recipe.stages(step.row)[step.stage]

        def compute(tmp: Path) -> dict:
            inp = self._input_artifact(step)
            ctx = StageContext(self.calibration, self.recipe.calibration.seq_len, self.recipe.calibration.seed)
            out = stage.run(inp, tmp, ctx)
            chain = [{"stage": s.name, "params": s.params.model_dump(mode="json")} for s in self.recipe.stages(step.row)[: step.stage + 1]]
            return {
                "format": out.format,
                "bits": out.bits,
                "meta": out.meta,
                "chain": chain,
                "input_key": inp.key,
                "versions": store.lib_versions(stage.libraries),
            }

        return store.cached(step.path, step.key, compute, step.id)[1]

    def _evaluate(self, step: Step, models: Models) -> bool:
        from .memory import peak_memory_bytes

        def compute(tmp: Path) -> dict:
            loaded = models.get(step.row, self.eval_backend(step.row))
            selection = None if step.items is None else self.evaluator.selection(step.task, *step.items)
            with peak_memory_bytes(_device(loaded)) as peak:
                record, samples = self.evaluator.run(loaded, step.task, selection)
            (tmp / "samples.jsonl").write_text("".join(store.dumps(s) + "\n" for s in samples))
            settings = self.evaluator.settings(step.task, selection)
            return {
                **record,
                "settings": settings,
                "n_items": len(samples),
                "items": step.items,
                # above what the process held before this row's model loaded: independent of execution order
                "peak_memory_bytes": max(0, peak.bytes - models.held_before.get(_device(loaded).split(":")[0], 0)),
                "weights_bytes": loaded.weights_bytes,
                "batch_size": loaded.batch_size,  # as evaluated: batch_size auto resolved
            }

        return store.cached(step.path, step.key, compute, step.id)[1]

    def _kl_reference(self, step: Step, models: Models) -> bool:
        from . import divergence as dv

        def compute(tmp: Path) -> dict:
            loaded = models.get("base", self.reference_backend())
            dv.save_reference(dv.base_reference(loaded, loaded.lm.tokenizer, self.kl_texts), tmp / "reference.npz")
            return {"top_k": dv.TOP_K, "sets": sorted(self.kl_texts)}

        return store.cached(step.path, step.key, compute, step.id)[1]

    def _kl(self, step: Step, models: Models) -> bool:
        from . import divergence as dv

        ref = next(s for s in self.plan().steps if s.kind == "kl_reference")

        def compute(tmp: Path) -> dict:
            rec, why = store.verify(ref.path, ref.key)
            if rec is None:
                raise QuantpipeError(f"the base's KL reference at {ref.path} is not computed ({why})")
            return {
                "top_k": dv.TOP_K,
                "sets": dv.compare(models.get(step.row, self.kl_backend(step.row)), dv.load_reference(rec.path / "reference.npz")),
            }

        return store.cached(step.path, step.key, compute, step.id)[1]

    # -- a run: start (setup + the run's index), steps, finish (report) ----------------------------
    def start(self) -> Plan:
        store.clean_stale_tmp(self.root)
        self.prepare()
        older = [*self.root.glob("*/eval/*.json"), *self.root.glob("*/divergence.json"), *self.root.glob("base/divergence-reference.*")]
        if older:  # quantpipe before the store's record format 2: never mixed into a table
            log.warning(
                "%d results stored by an older quantpipe (one JSON file per evaluation) in %s are not reused; their steps are recomputed",
                len(older),
                self.root,
            )
        plan = self.plan()
        store.atomic_write_json(
            self.root / "recipe.json", {**self.recipe.model_dump(mode="json"), "variant_order": list(self.recipe.variants)}
        )
        # the run's index: which records make up its table (the table never reads anything else)
        store.atomic_write_json(
            self.root / "plan.json",
            {
                **plan.to_dict(self.root),
                "base": {
                    "model": self.recipe.model.id,
                    "dtype": self.recipe.model.dtype,
                    "path": str(self.base.path),
                    "size_bytes": store.dir_size(self.base_dir) if self.base_dir else None,
                    "n_params": count_parameters(self.base_dir) if self.base_dir else None,
                    # a base dequantized from a GGUF lies on that type's grid (the table says so)
                    "gguf_type": (store.read_json(self.base_dir / "quantpipe-source.json") or {}).get("file_type")
                    if self.base_dir
                    else None,
                },
            },
        )
        return plan

    def record_outcome(self, row: str, error: BaseException | None, tb: str = "") -> None:
        """A failed row keeps <row>/error.json (shown in the table); a finished one loses it."""
        err_path = self.root / row / "error.json"
        if error is None:
            err_path.unlink(missing_ok=True)
            return
        msg = f"{type(error).__name__}: {error}"
        log.error("%s: FAILED: %s", row, msg)
        try:
            store.atomic_write_json(err_path, {"error": msg, "traceback": tb or traceback.format_exc()})
        except OSError as e:  # e.g. a full disk: the failure is still reported above
            log.error("%s: could not record the failure in %s: %s", row, err_path, e)

    def finish(self) -> Path:
        from .report import write_report

        shutil.rmtree(self.workdir / "datasets-cache", ignore_errors=True)
        return write_report(self.root)
