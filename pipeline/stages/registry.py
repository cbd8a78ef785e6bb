"""Stage registry, fed by the `quantpipe.stages` entry-point group.

Built-in stages are declared in quantpipe's own pyproject.toml under that group, exactly
as a third-party distribution would declare its stages: there is no second path in.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from ..errors import QuantpipeError

if TYPE_CHECKING:
    from .base import Stage

GROUP = "quantpipe.stages"


def available_stages() -> dict[str, object]:
    """Name -> entry point, without importing any stage module (imports are heavy)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def get_stage(name: str) -> type[Stage]:
    eps = available_stages()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none (is quantpipe installed with `pip install -e .`?)"
        raise QuantpipeError(f"unknown stage '{name}'; registered stages: {known}")
    cls = eps[name].load()
    if getattr(cls, "name", None) != name:
        raise QuantpipeError(
            f"entry point '{name}' ({eps[name].value}) loads a class whose .name is {getattr(cls, 'name', None)!r}; they must match"
        )
    return cls
