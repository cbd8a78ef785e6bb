"""Evaluation backends: how each artifact format is loaded for lm-eval, the way it is served."""

from .base import Backend, LoadedModel, backend_for, load

__all__ = ["Backend", "LoadedModel", "backend_for", "load"]
