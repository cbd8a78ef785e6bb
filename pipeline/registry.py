"""One small registry for every extension point fed by entry points (stages, backends), as lm-eval's
`lm_eval/api/registry.py` is one for models, tasks, metrics and filters.

quantpipe's own classes register through the same groups a third-party distribution uses. A name
registered twice (a plug-in reusing a built-in's name, or two plug-ins one name) is refused, naming
both distributions: which one won would depend on `sys.path` order, and its results would be
stored under the other's keys. Only what a run needs is imported; a plug-in that cannot be
imported is one line naming its distribution. `identity(name)` says which implementation did
the work (entry point and distribution version): it enters every step key.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from .errors import QuantpipeError

T = TypeVar("T")
BUILTIN = "quantpipe"  # the distribution whose entry points are the built-ins


def _dist(ep: EntryPoint) -> tuple[str, str]:
    d = ep.dist
    return (d.metadata["Name"] or "?", d.version) if d is not None else ("?", "?")


@dataclass(frozen=True)
class Entry:
    name: str
    value: str  # module:attribute
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN

    @property
    def identity(self) -> str:
        return f"{self.value} ({self.distribution} {self.version})"


class Registry(Generic[T]):
    def __init__(self, group: str, kind: str):
        self.group, self.kind = group, kind

    def _eps(self) -> dict[str, EntryPoint]:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=self.group):
            other = found.get(ep.name)
            if other is not None and (other.value, _dist(other)) != (ep.value, _dist(ep)):
                (a, _), (b, _) = _dist(other), _dist(ep)
                raise QuantpipeError(
                    f"{self.kind} '{ep.name}' is registered twice: by {a} ({other.value}) and by {b} ({ep.value}); "
                    f"uninstall one of them (a plug-in may not reuse a registered name)"
                )
            found[ep.name] = ep
        return found

    def entries(self) -> dict[str, Entry]:
        """Name -> where it comes from, without importing anything."""
        return {n: Entry(n, ep.value, *_dist(ep)) for n, ep in sorted(self._eps().items())}

    def identity(self, name: str) -> str:
        return self.entries()[name].identity

    def load(self, name: str) -> type[T]:
        eps = self._eps()
        if name not in eps:
            known = ", ".join(sorted(eps)) or "none (is quantpipe installed with `pip install -e .`?)"
            raise QuantpipeError(f"unknown {self.kind} '{name}'; registered: {known}")
        ep = eps[name]
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - a plug-in may raise anything at import
            raise QuantpipeError(
                f"{self.kind} '{name}' from distribution {_dist(ep)[0]} ({ep.value}) cannot be imported: {type(e).__name__}: {e}"
            ) from e
        if getattr(cls, "name", None) != name:
            raise QuantpipeError(
                f"entry point '{name}' ({ep.value}) loads a class whose .name is {getattr(cls, 'name', None)!r}; they must match"
            )
        return cls
