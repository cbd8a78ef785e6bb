"""vLLM: evaluate HF-family artifacts on the kernels they will be served with (GPU only).

`eval.engine: vllm` (or `quantpipe run --engine vllm`) loads every compressed-tensors, GPTQ,
AWQ and plain checkpoint through lm-eval's vLLM model (vLLM picks the FP8 / W4A16 / Marlin
kernels from the checkpoint's quantization config), and passes a TurboQuant stage's preset as
vLLM's --kv-cache-dtype. GGUF rows stay on llama.cpp. On a machine without a CUDA GPU or
without the vllm package the run stops before any work, naming what is missing.

The KL table needs full next-token distributions, which vLLM does not return (prompt
logprobs are capped at a top-20); vLLM rows are left out of it.
"""

from __future__ import annotations

from ..errors import QuantpipeError
from ..stages.base import Artifact


def check_available() -> str:
    """The GPU's name, or a QuantpipeError saying why vLLM cannot run here."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise QuantpipeError("eval engine 'vllm' needs a CUDA GPU and this machine has none; "
                             "use the default engine (transformers / GPTQModel / llama.cpp on CPU)")
    if importlib.util.find_spec("vllm") is None:
        raise QuantpipeError("eval engine 'vllm' needs the vllm package (pip install vllm, on a CUDA machine)")
    return torch.cuda.get_device_name()


def kv_cache_dtype(art: Artifact) -> str | None:
    """A TurboQuant stage's vLLM preset name, when the artifact carries one."""
    return art.meta.get("vllm_kv_cache_dtype")


def load_vllm(art: Artifact, dtype: str, batch_size: int, max_length: int):
    from lm_eval.models.vllm_causallms import VLLM

    from .hf import LoadedModel

    gpu = check_available()
    if art.meta.get("runtime_patches") and not kv_cache_dtype(art):
        raise QuantpipeError(f"{art.path} needs a runtime patch ({art.meta['runtime_patches'][0]['entry']}) "
                             "that vLLM cannot apply; evaluate it with the default engine")
    kwargs = {"pretrained": str(art.path), "dtype": dtype if art.format == "hf" else "auto",
              "batch_size": batch_size, "max_model_len": max_length, "seed": 1234, "gpu_memory_utilization": 0.85}
    if kv_cache_dtype(art):
        kwargs["kv_cache_dtype"] = kv_cache_dtype(art)
    try:
        lm = VLLM(**kwargs)
    except Exception as e:  # noqa: BLE001 - vLLM raises many types; the message names the problem
        raise QuantpipeError(f"vLLM cannot load {art.path}: {type(e).__name__}: {e}") from None
    import vllm

    how = f"vLLM {vllm.__version__} on {gpu}" + (f", KV cache {kwargs['kv_cache_dtype']}" if "kv_cache_dtype" in kwargs else "")
    return LoadedModel(lm=lm, evaluated_as=how, engine="vllm")
