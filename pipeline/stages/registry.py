"""Stages, fed by the `quantpipe.stages` entry-point group (pipeline.registry).

Built-in stages are declared in quantpipe's own pyproject.toml under that group, exactly
as a third-party distribution would declare its stages: there is no second path in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import Registry

if TYPE_CHECKING:
    from .base import Stage

GROUP = "quantpipe.stages"
STAGES: Registry[Stage] = Registry(GROUP, "stage")


def get_stage(name: str) -> type[Stage]:
    return STAGES.load(name)
