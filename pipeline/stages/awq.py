"""AWQ 4-bit weight-only: llm-compressor AWQModifier + W4A16_ASYM, saved as compressed-tensors.

`backend: gptqmodel` writes GPTQModel's native AWQ (GEMM) checkpoint instead; GPTQModel 7.6
only quantizes AWQ with CUDA, so that backend is refused up front on a CPU-only machine.
"""

from __future__ import annotations

from pathlib import Path

from ._llmcompressor import oneshot_to_compressed_tensors
from ._weight_only import WeightOnlyParams, _cuda, check_group_size, gptqmodel_quantize, int_weight_scheme
from .base import Artifact, ModelInfo, Stage, StageContext


class AWQParams(WeightOnlyParams):
    symmetric: bool = False  # W4A16_ASYM is AWQ's usual scheme (zero points per group)


class AWQStage(Stage):
    name = "awq"
    Params = AWQParams
    libraries = ("llmcompressor", "compressed-tensors", "gptqmodel", "transformers", "torch")

    def check(self, model: ModelInfo) -> None:
        check_group_size(self.params, model)
        if self.params.backend == "gptqmodel" and not _cuda():
            raise ValueError("backend 'gptqmodel' quantizes AWQ only with CUDA; use backend 'llmcompressor' on CPU")
        if self.params.backend == "gptqmodel" and self.params.symmetric:
            raise ValueError("GPTQModel's AWQ format is asymmetric; set symmetric: false")

    def uses_calibration(self) -> bool:
        return True

    def output_format(self, input_format: str = "hf") -> str:
        return "awq" if self.params.backend == "gptqmodel" else "compressed-tensors"

    def run(self, inp: Artifact, out_dir: Path, ctx: StageContext) -> Artifact:
        p: AWQParams = self.params
        bits = f"W{p.bits}A16 g{p.group_size}"
        if p.backend == "gptqmodel":
            from gptqmodel import QuantizeConfig
            from gptqmodel.quantization import FORMAT, METHOD

            qc = QuantizeConfig(bits=p.bits, group_size=p.group_size, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
            gptqmodel_quantize(inp, out_dir, ctx, qc)
            return Artifact(out_dir, "awq", key="", bits=bits)

        from llmcompressor.modifiers.awq import AWQModifier

        modifier = AWQModifier(config_groups=int_weight_scheme(p, p.symmetric), ignore=p.ignore)
        oneshot_to_compressed_tensors(inp, out_dir, ctx, modifier, needs_data=True)
        return Artifact(out_dir, "compressed-tensors", key="", bits=bits)
