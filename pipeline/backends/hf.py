"""The in-process backends for the HF family: plain and compressed-tensors checkpoints through
transformers, GPTQ/AWQ checkpoints through GPTQModel's kernels.

A reloaded checkpoint whose load report lists missing or unexpected weights is an error:
transformers fills missing weights with random values and only warns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import QuantpipeError
from ..placement import Placement, Target, checkpoint_dtype
from ..remote_code import trust
from ..tasks import SEEDS
from ..types import Artifact
from .base import Backend, LoadedModel


def _quant_summary(path: Path) -> str:
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") == "compressed-tensors":
        groups = q.get("config_groups", {})
        w = next(iter(groups.values()), {}).get("weights") or {}
        return f"compressed-tensors {q.get('format')} ({w.get('type')}{w.get('num_bits')})"
    return ""


def _dynamic_activations(path: Path) -> bool:
    """Activations quantized at run time (FP8_DYNAMIC, W8A8): an 8-bit rounding step turns the
    float noise of another summation order into visible changes, so such rows are evaluated
    batch-invariantly (batch_invariant.py), or with stock batches where that cannot be done."""
    cfg = json.loads((path / "config.json").read_text())
    groups = (cfg.get("quantization_config") or {}).get("config_groups") or {}
    return any((g or {}).get("input_activations") for g in groups.values())


def _check_load_report(info: dict, path: Path) -> None:
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:5]))}{' ...' if len(v) > 5 else ''}" for k, v in bad.items())
        raise QuantpipeError(f"checkpoint {path} did not load cleanly ({detail}); refusing to evaluate random weights")


def _load_transformers(art: Artifact, placement: Placement):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {**placement.load_kwargs(), "output_loading_info": True}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(art.path, **kwargs, **trust())
    except Exception as e:  # noqa: BLE001 - loaders raise many types; the message names the problem
        raise QuantpipeError(f"cannot load checkpoint {art.path}: {type(e).__name__}: {e}") from e
    _check_load_report(info, art.path)
    model.eval()
    torch.set_grad_enabled(False)
    where = _where(model, placement)
    if art.format == "hf":
        how = f"transformers {str(model.dtype).replace('torch.', '')} on {where}"
    else:
        how = f"{_quant_summary(art.path)}, dequantized on {where} by transformers"
    return model, how


def _where(model, placement: Placement) -> str:
    """The device the table names: CPU, or the GPUs the model was spread over."""
    if placement.device == "cpu":
        return "CPU"
    gpus = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()} or {str(model.device)})
    return f"CUDA ({', '.join(gpus)})"


def _load_gptqmodel(art: Artifact, placement: Placement):
    from gptqmodel import GPTQModel

    device = "cuda:0" if placement.device == "cuda" else "cpu"  # its GPU kernels (Marlin, ExLlama, Triton) on CUDA
    try:
        wrapped = GPTQModel.load(str(art.path), device=device)
    except Exception as e:  # noqa: BLE001 - loaders raise many types; the message names the problem
        raise QuantpipeError(f"cannot load {art.format} checkpoint {art.path}: {type(e).__name__}: {e}") from e
    model = wrapped.model
    kernel = type(model.get_submodule(next(n for n, m in model.named_modules() if hasattr(m, "qweight")))).__name__
    return model, f"{art.format.upper()} checkpoint, GPTQModel {kernel} kernel on {'CUDA' if placement.device == 'cuda' else 'CPU'}"


def placement_for(art: Artifact, dtype: str, target: Target | None) -> Placement:
    """The row's placement: `target` is the run's device (resolved once per run); None is CPU."""
    target = target or Target()
    return target.placement(art.format, dtype, checkpoint_dtype(art.path))


def apply_runtime_patches(model, meta: dict) -> list[str]:
    """Run the patches a stage recorded in the artifact (e.g. a KV-cache quantizer): each entry
    names an importable `module:function(model, config) -> description`."""
    import importlib

    notes = []
    for patch in meta.get("runtime_patches", []):
        module, _, fn = patch["entry"].partition(":")
        try:
            hook = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise QuantpipeError(f"artifact names runtime patch '{patch['entry']}', which cannot be imported: {e}") from e
        notes.append(hook(model, patch.get("config", {})))
    return notes


def _lm(
    model,
    art: Artifact,
    batch_size: int | str,
    max_length: int,
    memory_budget: int | None = None,
    share: bool = True,
    device: str = "cpu",
):
    """lm-eval's HF model around a loaded torch model: stock batches for rows whose KV cache a
    runtime patch owns (TurboQuant) or whose activation quantization is batch-dependent
    (share=False), prefix-sharing otherwise; below float32 only where the model meets the
    contract of low_precision.py at load (its `sharing_note` says which)."""
    import torch
    from transformers import AutoTokenizer

    from .prefix_cache import PrefixCachingHFLM

    tokenizer = AutoTokenizer.from_pretrained(art.path, **trust())
    torch.manual_seed(SEEDS["torch_random_seed"])
    limit = getattr(model.config, "max_position_embeddings", max_length) or max_length
    # Stock lm-eval batches (no prefix sharing) where a runtime patch owns the KV cache (TurboQuant:
    # its cache cannot be reused); every path applies the LM head only where log-probs are read.
    share = share and not art.meta.get("runtime_patches")
    return PrefixCachingHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=device,  # HFLM takes a loaded model's own device (model.device: the first GPU of a device_map)
        max_length=min(limit, max_length),
        share_prefixes=share,
        memory_budget=memory_budget,  # batch_size auto: measured against it (PrefixCachingHFLM)
    )


def _loaded(lm, how: str, backend: Backend, model, batch_size: int | str, memory_budget: int | None) -> LoadedModel:
    if batch_size == "auto":
        within = f"{memory_budget / 2**30:.2f} GiB" if memory_budget else "what is resident plus 80% of available memory"
        how += f"; batch size {lm.batch_size} (auto: measured to fit {within})"
    return LoadedModel(lm, how, "transformers", backend, tensor_bytes(model), batch_size=lm.batch_size)


def tensor_bytes(model) -> int:
    """Bytes of a torch model's parameters and buffers, as they sit in memory."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class _TorchBackend(Backend):
    def next_token_logprobs(self, loaded: LoadedModel, ids: list[int], rows: int) -> Iterator[np.ndarray]:
        import torch

        from .lm_head import hf_next_token_logprobs

        for logp in hf_next_token_logprobs(loaded.lm.model, ids, chunk=rows, dtype=torch.float64):
            yield logp.numpy()


class TransformersBackend(_TorchBackend):
    name = "transformers"
    formats = ("hf", "compressed-tensors")
    libraries = ("torch", "transformers", "compressed-tensors")
    activation_kernel = "batch-invariant-fp8-4"  # batch_invariant.install; bump when what it computes changes

    def load(
        self,
        art: Artifact,
        dtype: str,
        batch_size: int | str,
        max_length: int,
        memory_budget: int | None = None,
        target: Target | None = None,
    ) -> LoadedModel:
        from . import batch_invariant

        placement = placement_for(art, dtype, target)
        model, how = _load_transformers(art, placement)
        share, notes = True, []
        if art.format == "compressed-tensors" and _dynamic_activations(art.path):
            if placement.device == "cuda":  # transformers has no FP8 GEMM: activations are quantized in torch
                notes.append("FP8 activations emulated in torch on the GPU (no FP8 matmuls; engine vllm runs them)")
            # exact batch invariance makes prefix sharing exact; otherwise stock batches
            share = (why := batch_invariant.unsupported(model)) is None
            notes.append(batch_invariant.install(model) if share else f"stock batches ({why})")
        how = "; ".join([how, *notes, *apply_runtime_patches(model, art.meta)])
        lm = _lm(model, art, batch_size, max_length, memory_budget, share, placement.device)
        how = "; ".join([how, *([lm.sharing_note] if lm.sharing_note else [])])  # below float32: shared or not, and why
        return _loaded(lm, how, self, model, batch_size, memory_budget)


class GPTQModelBackend(_TorchBackend):
    name = "gptqmodel"
    formats = ("gptq", "awq")
    libraries = ("torch", "transformers", "gptqmodel")
    revision = "bf16-stock-batches"  # its bfloat16 kernels no longer share prefixes (scores were 1/8 nat off stock)

    def load(
        self,
        art: Artifact,
        dtype: str,
        batch_size: int | str,
        max_length: int,
        memory_budget: int | None = None,
        target: Target | None = None,
    ) -> LoadedModel:
        import torch

        placement = placement_for(art, dtype, target)
        model, how = _load_gptqmodel(art, placement)
        how = "; ".join([how, *apply_runtime_patches(model, art.meta)])
        # stock batches below float32: the low-precision contract of shared prefixes has not been
        # measured on GPTQModel's bfloat16 kernels (scores were 1/8 nat off stock's batch size 3)
        share = model.dtype == torch.float32
        lm = _lm(model, art, batch_size, max_length, memory_budget, share, placement.device)
        return _loaded(lm, how, self, model, batch_size, memory_budget)
