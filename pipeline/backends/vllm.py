"""vLLM: evaluate HF-family artifacts on the kernels they will be served with (GPU only).

`eval.engine: vllm` (or `quantpipe run --engine vllm`) loads every compressed-tensors, GPTQ,
AWQ and plain checkpoint through lm-eval's vLLM model (vLLM picks the FP8 / W4A16 / Marlin
kernels from the checkpoint's quantization config), and passes what a stage recorded for vLLM in
the artifact's `engine_options["vllm"]` (e.g. TurboQuant's --kv-cache-dtype preset) as engine
arguments. GGUF rows stay on llama.cpp (no vLLM backend is registered for that format). On a machine without a CUDA GPU or
without the vllm package the run stops before any work, naming what is missing.

The KL table needs full next-token distributions, which vLLM does not return (prompt
logprobs are capped at a top-20); vLLM rows are left out of it.
"""

from __future__ import annotations

from ..benchmarks import SEEDS
from ..errors import QuantpipeError
from ..types import Artifact
from .base import Backend, LoadedModel


def gpu_name() -> str:
    """The GPU's name, or a QuantpipeError saying why vLLM cannot run here."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise QuantpipeError(
            "eval engine 'vllm' needs a CUDA GPU and this machine has none; "
            "use the default engine (transformers / GPTQModel / llama.cpp on CPU)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise QuantpipeError("eval engine 'vllm' needs the vllm package (pip install vllm, on a CUDA machine)")
    return torch.cuda.get_device_name()


class VLLMBackend(Backend):
    name = "vllm"
    formats = ("hf", "compressed-tensors", "gptq", "awq")
    engine = "vllm"
    gives_logprobs = False  # prompt logprobs are capped at a top-20: no KL on vLLM rows
    libraries = ("vllm", "transformers")

    @classmethod
    def check_available(cls) -> None:
        gpu_name()

    def load(self, art: Artifact, dtype: str, batch_size: int | str, max_length: int) -> LoadedModel:
        # batch_size auto is lm-eval's VLLM "auto": every request at once, vLLM's scheduler batching
        # within its KV-cache memory (a memory budget is refused before any work, in Evaluator).
        from lm_eval.models.vllm_causallms import VLLM

        gpu = gpu_name()
        options = (art.meta.get("engine_options") or {}).get("vllm") or {}
        if art.meta.get("runtime_patches") and not options:
            raise QuantpipeError(
                f"{art.path} needs a runtime patch ({art.meta['runtime_patches'][0]['entry']}) "
                "that vLLM cannot apply; evaluate it with the default engine"
            )
        kwargs = {
            "pretrained": str(art.path),
            "dtype": dtype if art.format == "hf" else "auto",
            "batch_size": batch_size,
            "max_model_len": max_length,
            "seed": SEEDS["torch_random_seed"],
            "gpu_memory_utilization": 0.85,
            **options,
        }
        try:
            lm = VLLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - vLLM raises many types; the message names the problem
            raise QuantpipeError(f"vLLM cannot load {art.path}: {type(e).__name__}: {e}") from e
        import vllm

        how = f"vLLM {vllm.__version__} on {gpu}" + "".join(f", {k} {v}" for k, v in options.items())
        return LoadedModel(lm, how, "vllm", self, batch_size=lm.batch_size)
