"""Evaluation backends: how each artifact format is loaded for lm-eval, the way it is served."""

from __future__ import annotations

from .hf import LoadedModel, load_for_eval

__all__ = ["LoadedModel", "load_for_eval"]
