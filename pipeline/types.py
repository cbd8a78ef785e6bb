"""The core types that cross module boundaries: an artifact on disk and what stages may know of a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Artifact:
    """A model on disk in one serving format.

    format: "hf" (plain transformers), "compressed-tensors" (vLLM), "gptq" / "awq"
    (GPTQModel native checkpoints, vLLM), "gguf" (llama.cpp), or a plug-in's own format
    (with a backend registered for it).
    bits: nominal weight bits, shown in the table's Bits column (None for the base row).
    meta: anything later stages or backends need (e.g. a KV-cache quantizer config, runtime
    patches, `engine_options` per serving engine).
    """

    path: Path
    format: str
    key: str
    bits: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelInfo:
    """What stages may check before any work starts (from the base model's config)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_type: str
