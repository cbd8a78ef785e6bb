"""What an evaluation backend is, and the registry that picks one per artifact format and engine.

A backend loads an artifact into an lm-eval model the way it will be served, and gives the
next-token log-probabilities the KL table needs. Backends register through the
`quantpipe.backends` entry-point group, exactly as stages do through `quantpipe.stages`
(quantpipe's own are declared in its pyproject.toml): a plug-in stage that writes a new format
ships a backend for it the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import QuantpipeError
from ..registry import Registry

if TYPE_CHECKING:
    import numpy as np

    from ..placement import Target
    from ..types import Artifact

GROUP = "quantpipe.backends"
DEFAULT_ENGINE = "default"


@dataclass
class LoadedModel:
    lm: object  # an lm_eval.api.model.LM
    evaluated_as: str  # shown in the table: how this row was run
    engine: str
    backend: Backend
    weights_bytes: int | None = None  # the model's weights as loaded for evaluation (dequantized or not)
    batch_size: int | str | None = None  # what it evaluates with: batch_size auto resolved (None: the backend does not say)

    def next_token_logprobs(self, ids: list[int], rows: int = 32) -> Iterator[np.ndarray] | np.ndarray:
        """float64 log-probs of the token after each position but the last, [<= rows, vocab] at a time
        (or one (len(ids) - 1, vocab) array)."""
        return self.backend.next_token_logprobs(self, ids, rows)


class Backend:
    """Subclass, set the class attributes, implement `load` (and `next_token_logprobs`)."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # artifact formats it loads
    engine: ClassVar[str] = DEFAULT_ENGINE  # the `eval.engine` it serves
    gives_logprobs: ClassVar[bool] = True  # full next-token distributions (the KL table needs them)
    libraries: ClassVar[tuple[str, ...]] = ()  # distributions whose versions enter every result's key
    # How it computes rows whose stages quantize activations at run time (Stage.quantizes_activations),
    # when that differs from stock: enters those rows' result keys only.
    activation_kernel: ClassVar[str | None] = None
    # Set (or change) when what the backend computes for every row changes: enters all its rows' result keys.
    revision: ClassVar[str | None] = None

    @classmethod
    def check_available(cls) -> None:
        """Raise QuantpipeError naming what is missing (run before any work)."""

    def load(self, art: Artifact, dtype: str, batch_size: int | str, max_length: int) -> LoadedModel:
        """batch_size is a positive int or "auto" (the largest that fits; a backend that sizes batches
        by measurement also takes a keyword `memory_budget`, bytes, passed only when the recipe sets one)."""
        raise NotImplementedError

    def next_token_logprobs(self, loaded: LoadedModel, ids: list[int], rows: int) -> Iterator[np.ndarray] | np.ndarray:
        """Chunks of at most `rows` positions keep memory bounded for large vocabularies."""
        raise QuantpipeError(f"backend '{self.name}' gives no next-token distributions")


BACKENDS: Registry[Backend] = Registry(GROUP, "backend")


def _serving(classes: list[type[Backend]], fmt: str, engine: str) -> type[Backend] | None:
    return next((c for c in classes if c.engine == engine and fmt in c.formats), None)


def backend_for(fmt: str, engine: str = DEFAULT_ENGINE) -> type[Backend]:
    """The backend for (format, engine). Built-ins serve their formats on their engines, and a plug-in
    that claims a built-in format is used only when the recipe names the plug-in's engine; an engine
    without a backend for this format (vLLM and GGUF) falls back to the default engine's. Plug-ins are
    imported only when a built-in does not serve the request."""
    entries = BACKENDS.entries()
    builtin = [BACKENDS.load(n) for n, e in entries.items() if e.builtin]
    plugin_names = [n for n, e in entries.items() if not e.builtin]
    builtin_engines = {c.engine for c in builtin} | {DEFAULT_ENGINE}
    plugins: list[type[Backend]] | None = None

    def plugin_classes() -> list[type[Backend]]:
        nonlocal plugins
        if plugins is None:
            plugins = [BACKENDS.load(n) for n in plugin_names]
        return plugins

    if engine in builtin_engines:
        found = _serving(builtin, fmt, engine) or _serving(builtin, fmt, DEFAULT_ENGINE)
        found = found or _serving(plugin_classes(), fmt, engine) or _serving(plugin_classes(), fmt, DEFAULT_ENGINE)
    else:
        engines = builtin_engines | {c.engine for c in plugin_classes()}
        if engine not in engines:
            raise QuantpipeError(f"unknown eval engine '{engine}'; registered engines: {', '.join(sorted(engines))}")
        found = _serving(plugin_classes(), fmt, engine) or _serving(builtin, fmt, DEFAULT_ENGINE)
        found = found or _serving(plugin_classes(), fmt, DEFAULT_ENGINE)
    if found is not None:
        return found
    known = ", ".join(sorted({f for c in [*builtin, *plugin_classes()] for f in c.formats})) or "none"
    raise QuantpipeError(
        f"no evaluation backend for artifact format '{fmt}' (registered formats: {known}); "
        f"a plug-in stage that writes it must also register a '{GROUP}' entry point"
    )


def load(
    art: Artifact,
    dtype: str,
    batch_size: int | str,
    engine: str = DEFAULT_ENGINE,
    max_length: int = 4096,
    memory_budget: int | None = None,
    target: Target | None = None,
) -> LoadedModel:
    """`target`: the run's device (placement.Target), for backends whose `load` takes one."""
    cls = backend_for(art.format, engine)
    extra = {"memory_budget": memory_budget} if memory_budget is not None else {}  # plug-ins without it keep working
    if target is not None and accepts_target(cls):
        extra["target"] = target
    return cls().load(art, dtype, batch_size, max_length, **extra)


def accepts_target(cls: type[Backend]) -> bool:
    """Whether a backend places its rows by the run's device (a `target` keyword of its `load`)."""
    import inspect

    return "target" in inspect.signature(cls.load).parameters
