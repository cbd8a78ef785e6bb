"""GGUF for llama.cpp: convert with llama.cpp's converter, quantize with llama.cpp's quantizer.

HF checkpoint -> GGUF F16/BF16/F32 (convert_hf_to_gguf.py) -> any LLAMA_FTYPE_MOSTLY_* type
(llama_cpp.llama_model_quantize). The output folder holds model.gguf plus the HF tokenizer
files, so the evaluator can tokenize exactly as the HF rows do. The per-tensor types are read
back with gguf.GGUFReader: rows whose widths are not multiples of 256 fall back from k-quants
to other types, and the Bits column shows the real bits per weight, not the nominal ones.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

from pydantic import field_validator

from .base import Artifact, ModelInfo, Stage, StageContext, StageParams

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "config.json",
)


def ftype_names() -> list[str]:
    import llama_cpp

    return sorted(n[len("LLAMA_FTYPE_MOSTLY_") :] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))


class GGUFParams(StageParams):
    type: str = "Q4_K_M"  # any llama.cpp type name: Q4_K_M, Q8_0, Q5_K_M, Q6_K, Q4_0, F16, ...
    base_type: str = "f16"  # what the converter writes before quantizing: f16, bf16 or f32
    pre_tokenizer: str | None = None  # only for tokenizers llama.cpp does not recognise (e.g. test models)

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        v = v.upper()
        try:
            names = ftype_names()
        except ImportError:  # checked again when the stage runs
            return v
        if v not in names:
            raise ValueError(f"unknown llama.cpp type '{v}'; known: {', '.join(names)}")
        return v

    @field_validator("base_type")
    @classmethod
    def _base(cls, v: str) -> str:
        if v not in ("f16", "bf16", "f32"):
            raise ValueError("base_type must be f16, bf16 or f32")
        return v


def tensor_report(path: Path) -> dict:
    """Per-tensor types and the real bits per weight of a .gguf file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    types, elements, nbytes = Counter(), 0, 0
    weight_types = Counter()
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        elements += int(t.n_elements)
        nbytes += int(t.n_bytes)
        if len(t.shape) >= 2 and int(t.shape[0]) > 1 and int(t.shape[1]) > 1:
            weight_types[t.tensor_type.name] += 1
    return {
        "tensor_types": dict(types),
        "matrix_types": dict(weight_types),
        "n_tensors": len(reader.tensors),
        "bits_per_weight": round(8 * nbytes / elements, 3),
    }


GEMMA3_SWA_PATTERN = 6  # llama.cpp's Gemma-3 graph: every 6th layer global, the others sliding (not read from the GGUF)


def llamacpp_mismatch(model: ModelInfo) -> str | None:
    """Why llama.cpp would run this model differently from transformers, or None. Each case was
    measured on a tiny model of the family (tests/test_architecture_stages.py): log-likelihoods
    1-5 nats off the HF model's where the converted model is otherwise within 0.01."""
    cfg = model.config
    if model.model_type in ("gemma3", "gemma3_text"):
        want = tuple("full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention" for i in range(model.num_layers))
        if model.layer_types and model.layer_types != want:
            return (
                f"llama.cpp fixes Gemma-3's layer pattern at {GEMMA3_SWA_PATTERN - 1} sliding-window layers then one global layer "
                f"and ignores layer_types ({', '.join(model.layer_types)})"
            )
        scalar = cfg.get("query_pre_attn_scalar")
        # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B, and never reads the scalar
        allowed = {model.head_dim} | ({model.hidden_size // model.num_heads} if model.num_layers == 62 else set())
        if scalar is not None and scalar not in allowed:
            return f"llama.cpp ignores query_pre_attn_scalar ({scalar}) and scales queries by 1/sqrt(head_dim {model.head_dim})"
        return None
    if model.sliding_window:  # mistral: the converter drops the window; phi3: it writes it, llama.cpp still scores 3 nats off
        return f"llama.cpp does not reproduce its {model.sliding_window}-token sliding window, so its scores would not be this model's"
    if model.model_type == "phi3" and model.tokenizer not in ("sentencepiece", "GPT2Tokenizer", ""):
        return (
            "llama.cpp's converter reads a phi3 vocabulary from tokenizer.model (SentencePiece) or, with tokenizer_class "
            f"GPT2Tokenizer (Phi-4), from tokenizer.json; this model has neither (tokenizer_class {model.tokenizer})"
        )
    return None


class GGUFStage(Stage):
    name = "gguf"
    Params = GGUFParams
    libraries = ("llama-cpp-python", "transformers", "torch")
    revision = "byte-level-bpe-as-gpt2"  # such vocabularies were written as SentencePiece, which llama.cpp cannot tokenize with

    def check(self, model: ModelInfo) -> None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ValueError("the gguf stage needs llama-cpp-python (pip install -e '.[gguf]', see README)") from None
        if why := llamacpp_mismatch(model):
            raise ValueError(f"{model.architecture} cannot be converted to GGUF faithfully: {why}")

    def output_format(self, input_format: str = "hf") -> str:
        return "gguf"

    def run(self, inp: Artifact, out_dir: Path, ctx: StageContext) -> Artifact:
        import llama_cpp

        from ._llamacpp_tools import convert

        p: GGUFParams = self.params
        base = out_dir / f"model-{p.base_type}.gguf"
        convert(Path(inp.path), base, p.base_type, p.pre_tokenizer)
        target = out_dir / "model.gguf"
        if p.type.lower() == p.base_type:
            base.rename(target)
        else:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{p.type}")
            params.nthread = os.cpu_count() or 1
            rc = llama_cpp.llama_model_quantize(str(base).encode(), str(target).encode(), params)
            base.unlink()
            if rc != 0 or not target.is_file():
                raise RuntimeError(f"llama_model_quantize to {p.type} failed (code {rc})")
        copied = [name for name in TOKENIZER_FILES if (Path(inp.path) / name).is_file()]
        for name in copied:
            shutil.copy2(Path(inp.path) / name, out_dir / name)
        if copied:  # evaluation feeds this tokenizer's ids to llama.cpp, and a server tokenizes with the file's own vocabulary
            from transformers import AutoTokenizer

            from ..remote_code import trust
            from ..tokenizer_check import check_gguf_tokenizer

            check_gguf_tokenizer(target, AutoTokenizer.from_pretrained(out_dir, **trust()), f"the tokenizer written beside {target.name}")
        report = tensor_report(target)
        # k-quants need rows that are multiples of 256; narrower matrices fall back to legacy types.
        wanted_k = "_K" in p.type
        report["fallback_matrices"] = sum(
            n for t, n in report["matrix_types"].items() if (("_K" not in t and not t.startswith(("F", "BF"))) if wanted_k else t != p.type)
        )
        return Artifact(out_dir, "gguf", key="", bits=f"GGUF {p.type} ({report['bits_per_weight']:.2f} bpw)", meta=report)
