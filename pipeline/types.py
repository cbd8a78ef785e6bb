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
    """What stages may check before any work starts (from the base model's config and tokenizer files)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_type: str
    num_heads: int = 0
    architecture: str = ""  # config.architectures[0], e.g. "Phi3ForCausalLM"; the model_type when absent
    layer_types: tuple[str, ...] = ()  # per layer, when the config lists them: "full_attention", "sliding_attention", ...
    sliding_window: int | None = None  # tokens seen by a windowed layer; None when no layer is windowed
    tokenizer: str = ""  # "sentencepiece" (a tokenizer.model file), else tokenizer_config.json's tokenizer_class; "" unknown
    config: dict[str, Any] = field(default_factory=dict)  # the (text) config, for family-specific checks

    @property
    def attention_width(self) -> int:
        """Input width of the attention output projection (num_heads x head_dim; not always hidden_size)."""
        return self.num_heads * self.head_dim

    def input_widths(self) -> list[tuple[str, int]]:
        """The input widths of the model's linear layers: what a group or block size must divide."""
        widths = [("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size)]
        if self.num_heads and self.attention_width != self.hidden_size:  # o_proj reads num_heads x head_dim
            widths.append(("attention width (num_heads x head_dim)", self.attention_width))
        return widths
