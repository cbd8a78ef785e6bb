"""GPTQ 4-bit weight-only.

backend llmcompressor (default): GPTQModifier, saved as compressed-tensors (vLLM).
backend gptqmodel: GPTQModel, saved in the GPTQ v1 checkpoint format (vLLM, GPTQModel).
"""

from __future__ import annotations

from pathlib import Path

from ._llmcompressor import oneshot_to_compressed_tensors
from ._weight_only import WeightOnlyParams, check_gptqmodel_config, check_group_size, gptqmodel_quantize, int_weight_scheme
from .base import Artifact, ModelInfo, Stage, StageContext


class GPTQParams(WeightOnlyParams):
    symmetric: bool = True
    dampening_frac: float = 0.01
    act_order: bool = False


class GPTQStage(Stage):
    name = "gptq"
    Params = GPTQParams
    libraries = ("llmcompressor", "compressed-tensors", "gptqmodel", "transformers", "torch")

    def check(self, model: ModelInfo) -> None:
        check_group_size(self.params, model)
        if self.params.backend == "gptqmodel":
            check_gptqmodel_config(model)

    def uses_calibration(self) -> bool:
        return True

    def output_format(self, input_format: str = "hf") -> str:
        return "gptq" if self.params.backend == "gptqmodel" else "compressed-tensors"

    def run(self, inp: Artifact, out_dir: Path, ctx: StageContext) -> Artifact:
        p: GPTQParams = self.params
        bits = f"W{p.bits}A16 g{p.group_size}"
        if p.backend == "gptqmodel":
            from gptqmodel import QuantizeConfig

            qc = QuantizeConfig(bits=p.bits, group_size=p.group_size, sym=p.symmetric, desc_act=p.act_order, damp_percent=p.dampening_frac)
            gptqmodel_quantize(inp, out_dir, ctx, qc)
            return Artifact(out_dir, "gptq", key="", bits=bits)

        from llmcompressor.modifiers.quantization import GPTQModifier

        modifier = GPTQModifier(
            config_groups=int_weight_scheme(p, p.symmetric, "static" if p.act_order else None),
            ignore=p.ignore,
            dampening_frac=p.dampening_frac,
        )
        oneshot_to_compressed_tensors(inp, out_dir, ctx, modifier, needs_data=True)
        return Artifact(out_dir, "compressed-tensors", key="", bits=bits)
