"""Load an artifact into an lm-eval model: HF family (plain, compressed-tensors, GPTQ/AWQ) via
transformers/GPTQModel here, GGUF via llama.cpp (backends/llamacpp.py).

A reloaded checkpoint whose load report lists missing or unexpected weights is an error:
transformers fills missing weights with random values and only warns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import QuantpipeError
from ..stages.base import Artifact


@dataclass
class LoadedModel:
    lm: object  # an lm_eval.api.model.LM
    evaluated_as: str  # shown in the table: how this row was run
    engine: str


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
    float noise of another summation order into visible changes, so such rows skip prefix reuse."""
    cfg = json.loads((path / "config.json").read_text())
    groups = (cfg.get("quantization_config") or {}).get("config_groups") or {}
    return any((g or {}).get("input_activations") for g in groups.values())


def _check_load_report(info: dict, path: Path) -> None:
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:5]))}{' ...' if len(v) > 5 else ''}" for k, v in bad.items())
        raise QuantpipeError(f"checkpoint {path} did not load cleanly ({detail}); refusing to evaluate random weights")


def _load_transformers(art: Artifact, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype if art.format == "hf" else "auto", "output_loading_info": True}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(art.path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise QuantpipeError(f"cannot load checkpoint {art.path}: {type(e).__name__}: {e}") from None
    _check_load_report(info, art.path)
    model.eval()
    torch.set_grad_enabled(False)
    if art.format == "hf":
        how = f"transformers {str(model.dtype).replace('torch.', '')} on CPU"
    else:
        how = f"{_quant_summary(art.path)}, dequantized on CPU by transformers"
    return model, how


def _load_gptqmodel(art: Artifact):
    from gptqmodel import GPTQModel

    try:
        wrapped = GPTQModel.load(str(art.path), device="cpu")
    except Exception as e:  # noqa: BLE001
        raise QuantpipeError(f"cannot load {art.format} checkpoint {art.path}: {type(e).__name__}: {e}") from None
    model = wrapped.model
    kernel = type(model.get_submodule(next(n for n, m in model.named_modules() if hasattr(m, "qweight")))).__name__
    return model, f"{art.format.upper()} checkpoint, GPTQModel {kernel} kernel on CPU"


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
            raise QuantpipeError(f"artifact names runtime patch '{patch['entry']}', which cannot be imported: {e}") from None
        notes.append(hook(model, patch.get("config", {})))
    return notes


def load_for_eval(art: Artifact, dtype: str, batch_size: int, max_length: int = 4096, engine: str = "default") -> LoadedModel:
    import torch
    from transformers import AutoTokenizer

    from .prefix_cache import PrefixCachingHFLM

    if art.format == "gguf":
        from .llamacpp import LlamaCppLM

        tokenizer = AutoTokenizer.from_pretrained(art.path)
        lm = LlamaCppLM(art.path / "model.gguf", tokenizer, n_ctx=max_length)
        bpw = art.meta.get("bits_per_weight")
        return LoadedModel(lm=lm, evaluated_as=f"GGUF ({bpw} bpw), llama.cpp kernels on CPU (llama-cpp-python, in process)",
                           engine="llama.cpp")
    if engine == "vllm":
        from .vllm import load_vllm

        return load_vllm(art, dtype, batch_size, max_length)
    if art.format in ("hf", "compressed-tensors"):
        model, how = _load_transformers(art, dtype)
    elif art.format in ("gptq", "awq"):
        model, how = _load_gptqmodel(art)
    else:
        raise QuantpipeError(f"no evaluation backend for artifact format '{art.format}' ({art.path})")
    how = "; ".join([how, *apply_runtime_patches(model, art.meta)])
    tokenizer = AutoTokenizer.from_pretrained(art.path)
    torch.manual_seed(1234)
    limit = getattr(model.config, "max_position_embeddings", max_length) or max_length
    # Stock lm-eval batches (no prefix sharing) where a runtime patch owns the KV cache (TurboQuant:
    # its cache cannot be reused) or activations are quantized at run time (see _dynamic_activations).
    share = not art.meta.get("runtime_patches") and not _dynamic_activations(art.path)
    lm = PrefixCachingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu",
                           max_length=min(limit, max_length), share_prefixes=share)
    return LoadedModel(lm=lm, evaluated_as=how, engine="transformers")
