"""What a stage is: a name, a typed parameter model, and run(input artifact) -> artifact.

A stage writes its output into the empty directory it is given; the runner moves that
directory into place only after the stage returns and the manifest is written, so a crash
never leaves a half-written artifact that looks complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from ..types import Artifact, ModelInfo

__all__ = ["Artifact", "ModelInfo", "Stage", "StageContext", "StageParams"]


class StageParams(BaseModel):
    """Base for a stage's parameters. Unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StageContext:
    """Shared inputs a stage may use; calibration text is loaded lazily and only once."""

    calibration: Callable[[], list[str]]
    calibration_seq_len: int
    seed: int


class Stage:
    """Subclass this, set `name` and `Params`, implement `run`. See stages/fp8.py."""

    name: ClassVar[str]
    Params: ClassVar[type[StageParams]] = StageParams
    # Python distributions whose versions enter the artifact key (a new release rebuilds).
    libraries: ClassVar[tuple[str, ...]] = ()
    # Bump when what run() writes changes for the same inputs: it enters the artifact key (stale outputs rebuild).
    revision: ClassVar[str] = ""
    # Input formats this stage can consume; the recipe validator checks chains against it.
    accepts: ClassVar[tuple[str, ...]] = ("hf",)

    def __init__(self, params: StageParams):
        self.params = params

    def check(self, model: ModelInfo) -> None:
        """Raise ValueError naming the parameter when it cannot work for this model."""

    def uses_calibration(self) -> bool:
        """True when run() reads ctx.calibration(): the calibration text's identity joins the key."""
        return False

    def quantizes_activations(self) -> bool:
        """True when the output quantizes activations at run time (its backend may evaluate it its own way)."""
        return False

    def output_format(self, input_format: str = "hf") -> str:
        """The format run() will produce from `input_format`, known before running (chain validation)."""
        return "hf"

    def run(self, inp: Artifact, out_dir: Path, ctx: StageContext) -> Artifact:
        raise NotImplementedError
