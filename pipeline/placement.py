"""Where and in which dtype a row's model is evaluated: one decision, made in `resolve_placement`.

`eval.device` (auto | cpu | cuda) picks the device; auto is CUDA when torch sees a GPU. On CUDA a
transformers row loads with `device_map="auto"` over the visible GPUs (capped per GPU by
`eval.max_memory` when the recipe sets it), straight from the checkpoint files to the GPUs, in the
checkpoint's own dtype unless `model.dtype` says otherwise: the base is evaluated in the dtype it
is served in. On CPU float32 stays the compute dtype (`model.dtype: auto`), and a model whose copy
in that dtype does not fit host memory is refused before any work (`check_host_memory`).

The decision takes "is CUDA visible" as a parameter, so it is tested on machines without a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import QuantpipeError

Device = Literal["cpu", "cuda"]
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HOST_HEADROOM = 1.15  # loading and evaluating take more than the weights (activations, tokenizer, lm-eval)


@dataclass(frozen=True)
class Placement:
    """How a backend loads one row's model."""

    device: Device
    device_map: str | None  # "auto": accelerate spreads the layers over the visible GPUs; None: one device (CPU)
    max_memory: dict[int, str] | None  # per GPU index, e.g. {0: "70GiB"}; None: accelerate's default
    dtype: str  # what from_pretrained gets: "float32", "bfloat16", "float16", or "auto" (the checkpoint's own)

    def load_kwargs(self) -> dict:
        """The keyword arguments transformers' from_pretrained gets for placement and dtype."""
        kw: dict = {"dtype": self.dtype}
        if self.device_map is not None:
            kw["device_map"] = self.device_map
        if self.max_memory is not None:
            kw["max_memory"] = dict(self.max_memory)
        return kw

    def describe(self, gpus: int | None = None) -> str:
        if self.device == "cpu":
            return "CPU"
        caps = f", at most {', '.join(f'{v} on GPU {k}' for k, v in self.max_memory.items())}" if self.max_memory else ""
        n = f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus is not None else "the visible GPUs"
        return f"CUDA ({n}, device_map auto{caps})"


def cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str, cuda_is_visible: bool) -> Device:
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" and not cuda_is_visible:
        raise QuantpipeError("eval.device is cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False); use auto or cpu")
    return "cuda" if cuda_is_visible else "cpu"


def checkpoint_dtype(path: Path | str) -> str | None:
    """The dtype a checkpoint's config.json declares (transformers writes `dtype`, older ones `torch_dtype`)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for c in (cfg, text):
        for k in ("dtype", "torch_dtype"):
            if isinstance(c.get(k), str):
                return c[k].replace("torch.", "")
    return None


def compute_dtype(fmt: str, device: Device, recipe_dtype: str, ckpt_dtype: str | None) -> str:
    """The dtype a row is loaded in. Quantized formats load as their checkpoint says ("auto");
    a plain checkpoint follows model.dtype, whose auto means float32 on CPU and the checkpoint's
    own dtype on CUDA (bfloat16 for a bfloat16 checkpoint: as it is served)."""
    if fmt != "hf":
        return "auto"
    if recipe_dtype != "auto":
        return recipe_dtype
    if device == "cpu":
        return "float32"
    return ckpt_dtype if ckpt_dtype in BYTES else "auto"


def resolve_placement(
    requested: str,
    cuda_is_visible: bool,
    *,
    fmt: str,
    recipe_dtype: str,
    ckpt_dtype: str | None,
    max_memory_gib: dict[int, float] | None = None,
) -> Placement:
    """The placement of one row: `requested` is eval.device, `cuda_is_visible` whether torch sees a GPU."""
    device = resolve_device(requested, cuda_is_visible)
    dtype = compute_dtype(fmt, device, recipe_dtype, ckpt_dtype)
    if device == "cpu":
        return Placement("cpu", None, None, dtype)
    caps = {int(k): f"{v:g}GiB" for k, v in sorted(max_memory_gib.items())} if max_memory_gib else None
    return Placement("cuda", "auto", caps, dtype)


@dataclass(frozen=True)
class Target:
    """The run's device, resolved once (eval.device against what torch sees), and the per-GPU caps."""

    device: Device = "cpu"
    max_memory_gib: dict[int, float] | None = None

    @classmethod
    def from_eval(cls, requested: str, max_memory_gib: dict[int, float] | None, cuda_is_visible: bool) -> Target:
        return cls(resolve_device(requested, cuda_is_visible), max_memory_gib)

    def placement(self, fmt: str, recipe_dtype: str, ckpt_dtype: str | None) -> Placement:
        return resolve_placement(
            self.device,
            self.device == "cuda",
            fmt=fmt,
            recipe_dtype=recipe_dtype,
            ckpt_dtype=ckpt_dtype,
            max_memory_gib=self.max_memory_gib,
        )

    def key(self, fmt: str, recipe_dtype: str, ckpt_dtype: str | None) -> dict:
        return key_fields(self.device, fmt, recipe_dtype, ckpt_dtype)


# Transformers rows below float32 share prefixes under backends/low_precision.py's contract (they
# ran stock batches before); a new contract gets a new tag.
SHARED_BELOW_FLOAT32 = "shared-prefixes-within-2eps-of-stock-bs1"


def key_fields(device: Device, fmt: str, recipe_dtype: str, ckpt_dtype: str | None) -> dict:
    """What enters a row's result keys: nothing where a row computes what it computed before
    placement existed (CPU, and the dtype `model.dtype` gave then), else the device and dtype."""
    dtype = compute_dtype(fmt, device, recipe_dtype, ckpt_dtype)
    if device == "cuda":
        return {"device": "cuda", "dtype": dtype}
    legacy = recipe_dtype if fmt == "hf" else "auto"  # auto then meant the checkpoint's own dtype on CPU too
    same = dtype == legacy or (legacy == "auto" and dtype == ckpt_dtype)
    out = {} if same else {"dtype": dtype}
    if fmt in ("hf", "compressed-tensors") and (ckpt_dtype if dtype == "auto" else dtype) in ("bfloat16", "float16"):
        out["loglikelihoods"] = SHARED_BELOW_FLOAT32  # these rows ran stock batches before: other numbers now
    return out


@dataclass(frozen=True)
class HostNeed:
    """The host memory a CPU row needs, and what there is."""

    weights_bytes: int
    need_bytes: int
    available_bytes: int

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.available_bytes


def host_need(n_params: int, dtype: str, available_bytes: int) -> HostNeed:
    weights = n_params * BYTES.get(dtype, 4)
    return HostNeed(weights, int(weights * HOST_HEADROOM), available_bytes)


def check_host_memory(n_params: int | None, placement: Placement, available_bytes: int, ckpt_dtype: str | None) -> None:
    """Refuse, before any work, a CPU row whose weights in its compute dtype do not fit host memory."""
    if placement.device != "cpu" or not n_params:
        return
    dtype = placement.dtype if placement.dtype in BYTES else (ckpt_dtype or "float32")
    need = host_need(n_params, dtype, available_bytes)
    if need.fits:
        return
    hint = "eval.device: cuda on a GPU machine"
    if dtype == "float32" and ckpt_dtype in ("bfloat16", "float16"):
        hint = f"model.dtype: {ckpt_dtype} (the checkpoint's own dtype: half of it), or " + hint
    raise QuantpipeError(
        f"the base model evaluated on CPU in {dtype} needs about {need.need_bytes / 2**30:.1f} GiB of host memory "
        f"({n_params / 1e9:.2f}B parameters x {BYTES.get(dtype, 4)} bytes, plus {HOST_HEADROOM - 1:.0%}); "
        f"{available_bytes / 2**30:.1f} GiB is available. Set {hint}"
    )


def run_target(recipe, base_dir: Path | None) -> Target:
    """The run's target, before any work: eval.device resolved against this machine, and the base
    refused when it cannot fit host memory on CPU."""
    from .memory import memory_available_bytes
    from .models import count_parameters

    target = Target.from_eval(recipe.eval.device, recipe.eval.max_memory, cuda_visible())
    if base_dir is not None:
        ckpt = checkpoint_dtype(base_dir)
        check_host_memory(count_parameters(base_dir), target.placement("hf", recipe.model.dtype, ckpt), memory_available_bytes(), ckpt)
    return target
