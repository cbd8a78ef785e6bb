"""GPTQ 4-bit weight-only.

backend llmcompressor (default): GPTQModifier, saved as compressed-tensors (vLLM).
backend gptqmodel: GPTQModel, saved in the GPTQ v1 checkpoint format (vLLM, GPTQModel).
"""

from __future__ import annotations

from ._weight_only import WeightOnlyParams, WeightOnlyStage, check_gptqmodel_config, int_weight_scheme
from .base import ModelInfo


class GPTQParams(WeightOnlyParams):
    symmetric: bool = True
    dampening_frac: float = 0.01
    act_order: bool = False


class GPTQStage(WeightOnlyStage):
    name = "gptq"
    Params = GPTQParams
    libraries = ("llmcompressor", "compressed-tensors", "gptqmodel", "transformers", "torch")
    native_format = "gptq"

    def check_gptqmodel(self, model: ModelInfo) -> None:
        check_gptqmodel_config(model)

    def gptqmodel_config(self):
        from gptqmodel import QuantizeConfig

        p: GPTQParams = self.params
        return QuantizeConfig(bits=p.bits, group_size=p.group_size, sym=p.symmetric, desc_act=p.act_order, damp_percent=p.dampening_frac)

    def modifier(self):
        from llmcompressor.modifiers.quantization import GPTQModifier

        p: GPTQParams = self.params
        return GPTQModifier(
            config_groups=int_weight_scheme(p, p.symmetric, "static" if p.act_order else None),
            ignore=p.ignore,
            dampening_frac=p.dampening_frac,
        )
