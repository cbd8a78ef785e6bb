"""What the 4-bit weight-only stages (AWQ, GPTQ) share: parameters, checks, and the two ways they
run: llm-compressor (saved as compressed-tensors) or GPTQModel (its native checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..remote_code import trust
from ._llmcompressor import oneshot_to_compressed_tensors
from .base import Artifact, ModelInfo, Stage, StageContext, StageParams


class WeightOnlyParams(StageParams):
    bits: Literal[4, 8] = 4
    group_size: int = Field(128, description="-1 for one scale per output channel")
    ignore: list[str] = ["lm_head"]
    backend: Literal["llmcompressor", "gptqmodel"] = "llmcompressor"


def check_group_size(p: WeightOnlyParams, model: ModelInfo) -> None:
    if p.group_size == -1:
        return
    if p.group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {p.group_size}")
    for what, width in model.input_widths():
        if width % p.group_size:
            raise ValueError(
                f"group_size {p.group_size} does not divide the model's {what} ({width}); use a divisor of {width} or -1 (per channel)"
            )


def check_gptqmodel_config(model: ModelInfo) -> None:
    """GPTQModel rewrites a config's rope_parameters as one flat dict before saving; a config with
    one RoPE per layer type (Gemma-3: sliding and global layers) then fails transformers' validation
    ('str' object has no attribute 'get') after the whole quantization has run."""
    rope = model.config.get("rope_parameters")
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
        raise ValueError(
            f"backend 'gptqmodel' cannot save {model.architecture}: its config has one RoPE per layer type "
            f"({', '.join(sorted(rope))}), which GPTQModel flattens into an invalid config; use backend 'llmcompressor'"
        )


def int_weight_scheme(p: WeightOnlyParams, symmetric: bool, actorder: str | None = None) -> dict:
    """llm-compressor config_groups for W{bits}A16 integer weights, grouped or per channel."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=p.bits,
        type="int",
        symmetric=symmetric,
        strategy="group" if p.group_size > 0 else "channel",
        group_size=p.group_size if p.group_size > 0 else None,
        actorder=actorder,
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def gptqmodel_quantize(inp: Artifact, out_dir: Path, ctx: StageContext, quantize_config) -> None:
    """Quantize with GPTQModel and save its native checkpoint (GPTQ v1 / AWQ layout)."""
    # GPTQModel sizes its CPU worker pools from this; on 2-core machines it must not exceed the cores.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    from gptqmodel import GPTQModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(inp.path, **trust())
    rows = []
    for text in ctx.calibration():
        enc = tok(text, truncation=True, max_length=ctx.calibration_seq_len)
        rows.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    model = GPTQModel.load(str(inp.path), quantize_config, device="cpu" if not _cuda() else "cuda")
    model.quantize(rows, batch_size=1)
    model.save(str(out_dir))
    tok.save_pretrained(out_dir)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class WeightOnlyStage(Stage):
    """A weight-only stage with its two backends: llm-compressor's `modifier()`, saved as
    compressed-tensors, or GPTQModel with `gptqmodel_config()`, saved in `native_format`."""

    native_format: str  # the format GPTQModel saves this method in

    def check(self, model: ModelInfo) -> None:
        check_group_size(self.params, model)
        if self.params.backend == "gptqmodel":
            self.check_gptqmodel(model)

    def check_gptqmodel(self, model: ModelInfo) -> None:
        """Refuse (ValueError) what GPTQModel cannot quantize or save for this stage."""

    def gptqmodel_config(self):
        """GPTQModel's QuantizeConfig for these parameters."""
        raise NotImplementedError

    def modifier(self):
        """llm-compressor's modifier for these parameters."""
        raise NotImplementedError

    def uses_calibration(self) -> bool:
        return True

    def output_format(self, input_format: str = "hf") -> str:
        return self.native_format if self.params.backend == "gptqmodel" else "compressed-tensors"

    def run(self, inp: Artifact, out_dir: Path, ctx: StageContext) -> Artifact:
        p: WeightOnlyParams = self.params
        bits = f"W{p.bits}A16 g{p.group_size}"
        if p.backend == "gptqmodel":
            gptqmodel_quantize(inp, out_dir, ctx, self.gptqmodel_config())
            return Artifact(out_dir, self.native_format, key="", bits=bits)
        oneshot_to_compressed_tensors(inp, out_dir, ctx, self.modifier(), needs_data=True)
        return Artifact(out_dir, "compressed-tensors", key="", bits=bits)
