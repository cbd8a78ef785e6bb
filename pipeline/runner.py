"""The batch job: build every variant's stage chain, evaluate base and variants, write the table.

Work is resumable at two grains: a stage output and a (row, task) evaluation. Each is stored
under a key of everything that determines it and reused when the key and files match. A
variant that fails is recorded in <variant>/error.json; the others still finish.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

from . import artifacts as store
from .calibration import calibration_fingerprint, load_calibration
from .errors import QuantpipeError
from .evaluation import Evaluator
from .models import count_parameters, fingerprint, model_info, resolve_model
from .recipe import Recipe, check_against_model
from .stages.base import Artifact, StageContext


def log(msg: str) -> None:
    print(f"[quantpipe] {msg}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, recipe: Recipe, artifacts_root: Path, allow_code_execution: bool = False,
                 data_dir: Path | None = None, variants: list[str] | None = None, workdir: Path | None = None):
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

    # -- setup: everything that can fail on bad input fails here, before any work -----------------
    def prepare(self) -> None:
        self.prepare_model()
        self.evaluator = Evaluator(self.recipe, self.workdir, self.allow_code, self.data_dir)

    def prepare_model(self) -> None:
        import os

        if self.recipe.offline:
            for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
                os.environ[var] = "1"
        self.model_path = resolve_model(self.recipe.model.id, offline=self.recipe.offline)
        self.info = model_info(self.model_path)
        check_against_model(self.recipe, self.info)
        # a local folder, or (online) a hub id that transformers resolves itself
        self.base_dir = Path(self.model_path) if Path(str(self.model_path)).exists() else None
        self.base = Artifact(self.base_dir or self.model_path, "hf",
                             key=store.content_key("base", fingerprint(self.model_path), self.recipe.model.dtype))

    def calibration(self) -> list[str]:
        if self._calibration is None:
            self._calibration = load_calibration(self.recipe)
            log(f"calibration: {len(self._calibration)} samples from {self.recipe.calibration.dataset}")
        return self._calibration

    # -- stages ---------------------------------------------------------------------------------
    def build(self, variant: str) -> Artifact:
        ctx = StageContext(self.calibration, self.recipe.calibration.seq_len, self.recipe.calibration.seed)
        art = self.base
        chain = []
        for i, stage in enumerate(self.recipe.stages(variant)):
            params = stage.params.model_dump(mode="json")
            chain.append({"stage": stage.name, "params": params})
            versions = store.lib_versions(stage.libraries)
            calib = [calibration_fingerprint(self.recipe)] if stage.uses_calibration() else []
            key = store.content_key(art.key, stage.name, params, versions, self.recipe.calibration.model_dump(), *calib)
            final = self.root / variant / "stages" / f"{i:02d}-{stage.name}"
            manifest, why = store.verify(final, key)
            if manifest is None:  # another variant with the same chain prefix may have built it
                for other in sorted(self.root.glob(f"*/stages/{i:02d}-{stage.name}")):
                    found, _ = store.verify(other, key)
                    if found is not None:
                        final, manifest = other, found
                        break
            if manifest is not None:
                log(f"{variant}: stage {i} '{stage.name}' reused ({final})")
                art = Artifact(final, manifest["format"], key, manifest.get("bits"), manifest.get("meta", {}))
                continue
            if why != "absent":
                log(f"{variant}: stage {i} '{stage.name}' at {final} is not usable ({why}); rebuilding")
            log(f"{variant}: running stage {i} '{stage.name}' {params}")
            tmp = store.fresh_tmp(final)
            out = stage.run(art, tmp, ctx)
            manifest = {"key": key, "stage": stage.name, "params": params, "chain": list(chain),
                        "input_key": art.key, "format": out.format, "bits": out.bits, "meta": out.meta,
                        "versions": versions}
            store.commit_dir(tmp, final, manifest)
            art = Artifact(final, out.format, key, out.bits, out.meta)
        store.atomic_write_json(self.root / variant / "row.json", {
            "variant": variant, "chain": chain, "format": art.format, "bits": art.bits, "key": art.key,
            "path": str(art.path), "size_bytes": store.dir_size(art.path), "meta": art.meta,
        })
        return art

    # -- evaluation -----------------------------------------------------------------------------
    def _load(self, row: str, art: Artifact):
        from .backends import load_for_eval

        log(f"{row}: loading {art.path} for evaluation")
        return load_for_eval(art, self.recipe.model.dtype, self.evaluator.batch_size, engine=self.evaluator.engine)

    def divergence(self, row: str, art: Artifact, loaded):
        """KL / top-1 agreement / perplexity ratio against the base's stored top-K reference."""
        from . import divergence as dv

        texts = dv.corpus(self.evaluator.data_dir)
        ref_path = self.root / "base" / "divergence-reference.npz"
        ref_key = store.content_key(self.base.key, dv.corpus_key(texts))
        key_file = ref_path.with_suffix(".key")
        if not (ref_path.is_file() and key_file.is_file() and key_file.read_text() == ref_key):
            if row != "base":
                raise QuantpipeError("base divergence reference missing; re-run so the base row computes it")
            loaded = loaded or self._load(row, art)
            log("base: computing the top-K reference distribution for KL")
            dv.save_reference(dv.base_reference(loaded, loaded.lm.tokenizer, texts), ref_path)
            store.atomic_write_text(key_file, ref_key)
            return loaded
        if row == "base":
            return loaded
        if self.evaluator.engine == "vllm" and art.format != "gguf":
            log(f"{row}: no KL on vLLM (it returns top-20 prompt logprobs, not distributions)")
            return loaded
        out = self.root / row / "divergence.json"
        key = store.content_key(art.key, ref_key)
        old = store.read_json(out)
        if old and old.get("key") == key:
            return loaded
        loaded = loaded or self._load(row, art)
        log(f"{row}: KL divergence to base")
        store.atomic_write_json(out, {"key": key, "top_k": dv.TOP_K, **dv.compare(loaded, dv.load_reference(ref_path))})
        return loaded

    def evaluate_task(self, row: str, art: Artifact, task: str, loaded=None):
        """One (row, task) evaluation, reused when its key matches; returns the loaded model (if any)."""
        settings = self.evaluator.settings(task)
        key = store.content_key(art.key, settings)
        path = self.root / row / "eval" / f"{task}.json"
        old = store.read_json(path)
        if old and old.get("key") == key and (path.with_suffix(".samples.jsonl")).is_file():
            log(f"{row}: {task} reused")
            return loaded
        loaded = loaded or self._load(row, art)
        log(f"{row}: evaluating {task} ({loaded.evaluated_as})")
        record, samples = self.evaluator.run(loaded, task)
        # samples first, the record last: the record is what marks the evaluation complete
        store.atomic_write_text(path.with_suffix(".samples.jsonl"), "".join(json.dumps(s) + "\n" for s in samples))
        store.atomic_write_json(path, {"key": key, "settings": settings, **record})
        return loaded

    def evaluate(self, row: str, art: Artifact) -> None:
        loaded = None  # one load serves every task of the row
        for task in self.evaluator.tasks:
            loaded = self.evaluate_task(row, art, task, loaded)
        self.divergence(row, art, loaded)

    # -- a run: start (setup + base row record), rows, finish (report) ---------------------------
    def start(self) -> None:
        store.clean_stale_tmp(self.root)
        self.prepare()
        store.atomic_write_json(self.root / "recipe.json", {
            **self.recipe.model_dump(mode="json"), "variant_order": list(self.recipe.variants)})
        store.atomic_write_json(self.root / "base" / "row.json", {
            "variant": "base", "chain": [], "format": "hf", "bits": None, "key": self.base.key,
            "path": str(self.base.path), "size_bytes": store.dir_size(self.base_dir) if self.base_dir else None,
            "model": self.recipe.model.id, "dtype": self.recipe.model.dtype,
            "n_params": count_parameters(self.base_dir) if self.base_dir else None,
        })

    def record_outcome(self, variant: str, error: BaseException | None, tb: str = "") -> None:
        """A failed variant keeps <variant>/error.json (shown in the table); a finished one loses it."""
        err_path = self.root / variant / "error.json"
        if error is None:
            err_path.unlink(missing_ok=True)
            return
        msg = f"{type(error).__name__}: {error}"
        log(f"{variant}: FAILED: {msg}")
        store.atomic_write_json(err_path, {"error": msg, "traceback": tb})

    def finish(self) -> Path:
        from .report import write_report

        shutil.rmtree(self.workdir / "datasets-cache", ignore_errors=True)
        return write_report(self.root, self.recipe.name, ["base", *self.recipe.variants])

    def run(self, wait: bool = False) -> Path:
        """The embedded executor: everything in this process, one row after another."""
        with store.run_lock(self.root, wait=wait):
            self.start()
            self.evaluate("base", self.base)
            for variant in self.variants:
                try:
                    self.evaluate(variant, self.build(variant))
                    self.record_outcome(variant, None)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - one variant's failure must not sink the others
                    self.record_outcome(variant, e, traceback.format_exc())
            return self.finish()
