"""What `quantpipe doctor RECIPE` says of each row before a run: where it will be evaluated (device,
engine, GPUs), the memory its weights will take there, and a time estimate.

The estimate is arithmetic over two rates measured on this machine in about a second: the matrix
product rate at the row's compute dtype and device (prompt tokens: 2 x parameters FLOPs each) and
the memory copy rate (each generation step reads the weights once per batch). Token counts per
item are typical figures of the stock prompts (`TASK_TOKENS`), not counted from the data: the
estimate is good to a factor of about two, enough to tell an hour from a day.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .placement import BYTES, Device, Target

# task -> (items in the full split, subjects (per-subject limits), prompt tokens per item as scored
# at num_fewshot 0 and per few-shot example, generated tokens per item at the stock cap)
TASK_TOKENS: dict[str, tuple[int, int, int, int, int]] = {
    "mmlu": (14042, 57, 110, 100, 0),  # one context per item (single-token choices share it)
    "gsm8k": (1319, 1, 110, 150, 130),
    "humaneval": (164, 1, 150, 0, 200),
    "truthfulqa_mc1": (817, 1, 1000, 0, 0),  # QA preamble + question, once per choice (~4)
    "truthfulqa_mc2": (817, 1, 1800, 0, 0),  # ~7 choices
}
DEFAULT_FEWSHOT = {"gsm8k": 5}


@dataclass(frozen=True)
class RowForecast:
    row: str
    device: Device
    engine: str  # the backend that evaluates it (transformers, gptqmodel, llamacpp, vllm)
    gpus: int
    dtype: str
    weights_bytes: int
    seconds: float | None

    def line(self) -> str:
        where = "CPU" if self.device == "cpu" else f"CUDA x{self.gpus}"
        t = "" if self.seconds is None else f", ~{_duration(self.seconds)} to evaluate"
        return f"row {self.row}: {where}, {self.engine} ({self.dtype}), weights ~{_size(self.weights_bytes)}{t}"


def _size(b: int) -> str:
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def workload(tasks: dict) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of one row over the recipe's tasks."""
    prompt = gen = 0
    for name, spec in tasks.items():
        full, subjects, base, per_shot, g = TASK_TOKENS.get(name, (1000, 1, 300, 0, 0))
        items = len(spec.samples) if spec.samples is not None else (min(full, spec.limit * subjects) if spec.limit else full)
        shots = spec.num_fewshot if spec.num_fewshot is not None else DEFAULT_FEWSHOT.get(name, 0)
        prompt += items * (base + per_shot * shots)
        gen += items * min(g, spec.max_gen_toks or g)
    return prompt, gen


@dataclass(frozen=True)
class Rates:
    flops: float  # matrix-product FLOP/s at the compute dtype
    bytes: float  # memory copy bytes/s (read + write)


def measure_rates(device: Device, dtype: str, seconds: float = 0.4) -> Rates:
    import torch

    dt = getattr(torch, dtype if dtype in BYTES else ("bfloat16" if device == "cuda" else "float32"))
    n = 4096 if device == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    big = torch.empty(64 << 20 if device == "cuda" else 16 << 20, dtype=torch.uint8, device=device)

    def rate(fn, work: float) -> float:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            k += 1
            if device == "cuda":
                torch.cuda.synchronize()
        return k * work / (time.perf_counter() - t0)

    return Rates(rate(lambda: a @ b, 2 * n**3), rate(lambda: big.clone(), 2 * big.numel()))


def weights_bytes(n_params: int, fmt: str, dtype: str, bits: float | None, activations: bool) -> int:
    """The row's weights as the backend holds them: dequantized for transformers (float32 FP8
    codes for batch-invariant FP8 rows), packed for GPTQModel and llama.cpp."""
    if fmt == "hf":
        return n_params * BYTES.get(dtype, 4)
    if fmt == "compressed-tensors":
        return n_params * (4 if activations else BYTES.get(dtype, 2))
    return int(n_params * ((bits or 4) / 8 + 0.06))  # packed weights + scales and 16-bit embeddings, roughly


def estimate_seconds(n_params: int, prompt: int, gen: int, batch: int, rates: Rates, weight_bytes: int) -> float:
    return 2 * n_params * (prompt + gen) / rates.flops + (gen / max(1, batch)) * weight_bytes / (rates.bytes / 2)


def row_format(recipe, row: str) -> str:
    fmt = "hf"
    for stage in [] if row == "base" else recipe.stages(row):
        fmt = stage.output_format(fmt)
    return fmt


def forecast(recipe, base_dtype: str | None, n_params: int | None, target: Target, gpus: int, measure: bool = True) -> list[RowForecast]:
    """One RowForecast per row of the recipe (base first)."""
    from .backends import backend_for
    from .backends.base import accepts_target
    from .evaluation import resolve_tasks

    batch, tasks = resolve_tasks(recipe)
    prompt, gen = workload(tasks)
    rates: dict[tuple[str, str], Rates] = {}
    out = []
    for row in ["base", *recipe.variants]:
        fmt = row_format(recipe, row)
        backend = backend_for(fmt, recipe.eval.engine)
        placed = accepts_target(backend)
        device: Device = target.device if placed else ("cuda" if recipe.eval.engine == "vllm" else "cpu")
        dtype = target.placement(fmt, recipe.model.dtype, base_dtype).dtype if placed else "auto"
        if dtype == "auto":  # quantized formats: their non-quantized tensors stay in the checkpoint's dtype
            dtype = base_dtype or "bfloat16"
        stages = [] if row == "base" else recipe.stages(row)
        bits = next((float(b) for s in stages if isinstance(b := getattr(s.params, "bits", None), int | float)), None)
        wb = weights_bytes(n_params or 0, fmt, dtype, bits, any(s.quantizes_activations() for s in stages))
        seconds = None
        if n_params and measure and device == target.device:
            if (device, dtype) not in rates:
                rates[(device, dtype)] = measure_rates(device, dtype)
            seconds = estimate_seconds(n_params, prompt, gen, batch if isinstance(batch, int) else 16, rates[(device, dtype)], wb)
        out.append(RowForecast(row, device, backend.name, gpus if device == "cuda" else 0, dtype, wb, seconds))
    return out
