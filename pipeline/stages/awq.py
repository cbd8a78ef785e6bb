"""AWQ 4-bit weight-only: llm-compressor AWQModifier + W4A16_ASYM, saved as compressed-tensors.

`backend: gptqmodel` writes GPTQModel's native AWQ (GEMM) checkpoint instead; GPTQModel 7.6
only quantizes AWQ with CUDA, so that backend is refused up front on a CPU-only machine.
"""

from __future__ import annotations

from ._weight_only import WeightOnlyParams, WeightOnlyStage, _cuda, int_weight_scheme
from .base import ModelInfo


class AWQParams(WeightOnlyParams):
    symmetric: bool = False  # W4A16_ASYM is AWQ's usual scheme (zero points per group)


class AWQStage(WeightOnlyStage):
    name = "awq"
    Params = AWQParams
    libraries = ("llmcompressor", "compressed-tensors", "gptqmodel", "transformers", "torch")
    native_format = "awq"

    def check_gptqmodel(self, model: ModelInfo) -> None:
        if not _cuda():
            raise ValueError("backend 'gptqmodel' quantizes AWQ only with CUDA; use backend 'llmcompressor' on CPU")
        if self.params.symmetric:
            raise ValueError("GPTQModel's AWQ format is asymmetric; set symmetric: false")

    def gptqmodel_config(self):
        from gptqmodel import QuantizeConfig
        from gptqmodel.quantization import FORMAT, METHOD

        p: AWQParams = self.params
        return QuantizeConfig(bits=p.bits, group_size=p.group_size, quant_method=METHOD.AWQ, format=FORMAT.GEMM)

    def modifier(self):
        from llmcompressor.modifiers.awq import AWQModifier

        p: AWQParams = self.params
        return AWQModifier(config_groups=int_weight_scheme(p, p.symmetric), ignore=p.ignore)
