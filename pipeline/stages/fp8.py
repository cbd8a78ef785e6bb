"""FP8 weights and activations with llm-compressor, saved as compressed-tensors (vLLM loads it).

This is the smallest complete stage: a parameter model, a check, and run().
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ._llmcompressor import oneshot_to_compressed_tensors
from .base import Artifact, Stage, StageContext, StageParams


class FP8Params(StageParams):
    # FP8_DYNAMIC: per-channel weight scales, per-token activation scales, no calibration data.
    # FP8: static per-tensor activation scales, calibrated on the recipe's calibration text.
    scheme: Literal["FP8_DYNAMIC", "FP8"] = "FP8_DYNAMIC"
    ignore: list[str] = ["lm_head"]


class FP8Stage(Stage):
    name = "fp8"
    Params = FP8Params
    libraries = ("llmcompressor", "compressed-tensors", "transformers", "torch")

    def uses_calibration(self) -> bool:
        return self.params.scheme == "FP8"

    def quantizes_activations(self) -> bool:
        return True

    def output_format(self, input_format: str = "hf") -> str:
        return "compressed-tensors"

    def run(self, inp: Artifact, out_dir: Path, ctx: StageContext) -> Artifact:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        p: FP8Params = self.params
        modifier = QuantizationModifier(targets="Linear", scheme=p.scheme, ignore=p.ignore)
        oneshot_to_compressed_tensors(inp, out_dir, ctx, modifier, needs_data=p.scheme == "FP8")
        return Artifact(out_dir, "compressed-tensors", key="", bits="W8A8-FP8")
