"""Shared llm-compressor plumbing: load, oneshot with calibration data, save compressed-tensors."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..remote_code import trust
from .base import Artifact, StageContext


@contextlib.contextmanager
def cpu_safe_pinning():
    """llm-compressor's AWQ pins cached activations unconditionally, which raises
    "Cannot access accelerator device" on a CPU-only torch. Pinning only speeds up
    host-to-device copies, so without an accelerator it is safely skipped."""
    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def tokenized_calibration(tokenizer, ctx: StageContext):
    from datasets import Dataset

    texts = ctx.calibration()
    ids = [tokenizer(t, truncation=True, max_length=ctx.calibration_seq_len).input_ids for t in texts]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})


def oneshot_to_compressed_tensors(inp: Artifact, out_dir: Path, ctx: StageContext, modifiers, needs_data: bool) -> None:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inp.path, **trust())
    model = AutoModelForCausalLM.from_pretrained(inp.path, dtype="auto", **trust())
    kwargs = {}
    if needs_data:
        data = tokenized_calibration(tokenizer, ctx)
        kwargs = dict(dataset=data, max_seq_length=ctx.calibration_seq_len, num_calibration_samples=len(data))
    torch.manual_seed(ctx.seed)
    with cpu_safe_pinning():
        oneshot(model=model, recipe=modifiers, **kwargs)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
