"""vLLM: evaluate HF-family artifacts on the kernels they will be served with (GPU only).

`eval.engine: vllm` (or `quantpipe run --engine vllm`) loads every compressed-tensors, GPTQ,
AWQ and plain checkpoint through lm-eval's vLLM model (vLLM picks the FP8 / W4A16 / Marlin
kernels from the checkpoint's quantization config). Its arguments are the recipe's `eval.vllm`
block (tensor/pipeline/data parallelism, memory share, context, KV cache, anything else under
`extra`) and what a stage recorded for vLLM in the artifact's `engine_options["vllm"]` (e.g.
TurboQuant's kv_cache_dtype preset, which wins for its row): `engine_kwargs` builds them, a pure
function. GGUF rows stay on llama.cpp (no vLLM backend is registered for that format). On a
machine without a CUDA GPU or without the vllm package the run stops before any work, naming
what is missing.

vLLM gives no full next-token distributions (prompt logprobs are a top-k), so the KL steps of
vLLM rows are planned on the default engine's backend (job.py), or left out (`eval.vllm.kl:
none`). Each vLLM row runs in a process of its own (pipeline/isolation.py): a process that ends
returns all of its GPU memory, which an engine dropped by reference does not reliably do.
"""

from __future__ import annotations

from ..errors import QuantpipeError
from ..recipe import VLLMSpec
from ..tasks import SEEDS
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


def engine_kwargs(art: Artifact, dtype: str, batch_size: int | str, max_length: int, spec: VLLMSpec, trust_remote_code: bool) -> dict:
    """lm-eval's VLLM(**kwargs) for one artifact: the recipe's eval.vllm, then the stage's own options."""
    kwargs = {
        "pretrained": str(art.path),
        "dtype": dtype if art.format == "hf" else "auto",  # a quantized checkpoint keeps its own dtypes
        "batch_size": batch_size,
        "max_model_len": spec.max_model_len or max_length,
        "seed": SEEDS["torch_random_seed"],
        "trust_remote_code": trust_remote_code,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "data_parallel_size": spec.data_parallel_size,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "kv_cache_dtype": spec.kv_cache_dtype,
    }
    if spec.pipeline_parallel_size > 1:  # a vllm.LLM argument lm-eval passes through
        kwargs["pipeline_parallel_size"] = spec.pipeline_parallel_size
    if spec.max_num_seqs is not None:
        kwargs["max_num_seqs"] = spec.max_num_seqs
    if spec.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = spec.enable_prefix_caching
    return {**kwargs, **spec.extra, **((art.meta.get("engine_options") or {}).get("vllm") or {})}


class VLLMBackend(Backend):
    name = "vllm"
    formats = ("hf", "compressed-tensors", "gptq", "awq")
    engine = "vllm"
    gives_logprobs = False  # prompt logprobs are a top-k: KL steps go to the default engine (job.py)
    libraries = ("vllm", "transformers")

    @classmethod
    def check_available(cls) -> None:
        gpu_name()

    def load(self, art: Artifact, dtype: str, batch_size: int | str, max_length: int, vllm: VLLMSpec | None = None) -> LoadedModel:
        # batch_size auto (vLLM's default here) is lm-eval's VLLM "auto": every request at once, vLLM's
        # scheduler batching within its KV-cache memory.
        from lm_eval.models.vllm_causallms import VLLM

        from ..remote_code import allowed

        gpu = gpu_name()
        options = (art.meta.get("engine_options") or {}).get("vllm") or {}
        if art.meta.get("runtime_patches") and not options:
            raise QuantpipeError(
                f"{art.path} needs a runtime patch ({art.meta['runtime_patches'][0]['entry']}) "
                "that vLLM cannot apply; evaluate it with the default engine"
            )
        spec = vllm or VLLMSpec()
        kwargs = engine_kwargs(art, dtype, batch_size, max_length, spec, allowed())
        try:
            lm = VLLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - vLLM raises many types; the message names the problem
            raise QuantpipeError(f"vLLM cannot load {art.path}: {type(e).__name__}: {e}") from e
        import vllm as vllm_pkg

        par = f", TP {spec.tensor_parallel_size}" if spec.tensor_parallel_size > 1 else ""
        par += f" x PP {spec.pipeline_parallel_size}" if spec.pipeline_parallel_size > 1 else ""
        par += f", DP {spec.data_parallel_size}" if spec.data_parallel_size > 1 else ""
        how = f"vLLM {vllm_pkg.__version__} on {gpu}{par}" + "".join(f", {k} {v}" for k, v in options.items())
        return LoadedModel(lm, how, "vllm", self, batch_size=lm.batch_size)
