"""Calibration text for the stages that need it, and the rule that it is never evaluation data."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

from .errors import QuantpipeError, RecipeError
from .tasks import evaluation_folders, refused_calibration_ids

# Stdlib modules whose docstrings form the offline default corpus: English prose about code,
# present on every Python install, and disjoint from every benchmark we evaluate.
_DOC_MODULES = (
    "collections",
    "json",
    "re",
    "string",
    "textwrap",
    "pathlib",
    "functools",
    "itertools",
    "argparse",
    "logging",
    "subprocess",
    "threading",
    "asyncio",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "email",
    "http.client",
    "urllib.request",
    "csv",
    "sqlite3",
    "tarfile",
    "zipfile",
    "unittest",
    "typing",
)


def _local_path(recipe, dataset: str) -> Path:
    p = Path(dataset).expanduser()
    if not p.is_absolute() and recipe.source is not None:
        p = recipe.source.parent / p
    return p.resolve()


def _looks_local(dataset: str) -> bool:
    return dataset.startswith((".", "/", "~")) or dataset.endswith((".txt", ".jsonl", ".json"))


def refuse_evaluation_data(recipe) -> None:
    ds = recipe.calibration.dataset
    if ds.startswith("builtin:"):
        if ds != "builtin:python-docs":
            raise RecipeError("calibration.dataset", f"unknown builtin corpus '{ds}'; use builtin:python-docs")
        return
    if _looks_local(ds):
        parts = {x.lower() for x in _local_path(recipe, ds).parts}
        hit = parts & evaluation_folders()
    else:
        hit = {ds.lower()} & refused_calibration_ids()
    if hit:
        raise RecipeError(
            "calibration.dataset",
            f"'{ds}' is an evaluation set ({', '.join(sorted(hit))}); calibrating on it would leak the test "
            "data into the quantized weights. Use a general corpus (e.g. builtin:python-docs, wikitext, ultrachat)",
        )


def stdlib_docstrings(modules, min_chars: int) -> list[str]:
    """Distinct docstrings longer than min_chars of the modules' public members, in a fixed order."""
    import importlib

    docs = []
    for name in modules:
        mod = importlib.import_module(name)
        for attr, obj in sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
            # private names get patched by libraries, and which submodules are attributes depends
            # on what else was imported: both would make the corpus depend on the process
            if attr.startswith("_") or inspect.ismodule(obj):
                continue
            d = inspect.getdoc(obj)
            if d and len(d) > min_chars:
                docs.append(d)
    return list(dict.fromkeys(docs))  # many members share a docstring


def _python_docs() -> list[str]:
    return stdlib_docstrings(_DOC_MODULES, 200)


def _read_local(path: Path, text_field: str) -> list[str]:
    if not path.is_file():
        raise QuantpipeError(f"calibration file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().split("\n"), 1):
            if line.strip():
                row = json.loads(line)
                if text_field not in row:
                    raise QuantpipeError(f"{path}:{n} has no field '{text_field}' (set calibration.text_field)")
                rows.append(str(row[text_field]))
        return rows
    return [b.strip() for b in path.read_text().split("\n\n") if b.strip()]


def _read_hub(dataset: str, split: str, text_field: str) -> list[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(dataset, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise QuantpipeError(f"cannot load calibration dataset '{dataset}' split '{split}': {e}") from e
    if text_field not in ds.column_names:
        raise QuantpipeError(f"calibration dataset '{dataset}' has no column '{text_field}' (has {ds.column_names})")
    return [str(t) for t in ds[text_field]]


def calibration_fingerprint(recipe) -> str:
    """What the calibration text is, without loading it: part of calibrated stages' keys."""
    import hashlib
    import platform

    spec = recipe.calibration
    if spec.dataset == "builtin:python-docs":  # stdlib docstrings: they change with the Python version
        return f"builtin:python-docs-v2:python-{platform.python_version()}"
    if _looks_local(spec.dataset):
        path = _local_path(recipe, spec.dataset)
        if not path.is_file():
            raise QuantpipeError(f"calibration file not found: {path}")
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return f"hub:{spec.dataset}:{spec.split}"


def load_calibration(recipe) -> list[str]:
    """num_samples texts of about seq_len tokens each (4 characters per token as a rough guide)."""
    spec = recipe.calibration
    if spec.dataset == "builtin:python-docs":
        texts = _python_docs()
    elif _looks_local(spec.dataset):
        texts = _read_local(_local_path(recipe, spec.dataset), spec.text_field)
    else:
        texts = _read_hub(spec.dataset, spec.split, spec.text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QuantpipeError(f"calibration set '{spec.dataset}' is empty")
    # Pack short documents into windows so every sample fills the sequence length.
    target = spec.seq_len * 4
    windows, cur = [], ""
    for t in texts:
        cur = f"{cur}\n\n{t}" if cur else t
        while len(cur) >= target:
            windows.append(cur[:target])
            cur = cur[target:]
    if cur:
        windows.append(cur)
    random.Random(spec.seed).shuffle(windows)
    return windows[: spec.num_samples]
