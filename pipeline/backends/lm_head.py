"""The LM head applied only where log-probs are read, a bounded number of rows at a time.

Stock HFLM materializes float32 logits for every position of a batch and then a log-softmax copy
(8 x 700 x 262,144 x 4 B = 5.9 GB each, for a 262k vocabulary). Here the model runs with its LM
head swapped for a recorder (`head_inputs`), so the forward stops at the head's input (hidden
states, `hidden_size` wide); the head, what the model's forward does to its output
(`finish_logits`, checked against the model's own logits by `check_head`) and the log-softmax then
run on the positions whose log-probs are read, at most `head_rows(vocab)` rows at a time (64 MiB of
logits). The head sees at least MIN_HEAD_ROWS rows per call (padded with zeros): oneDNN/MKL switch
to other kernels, with another summation order, below about 12 rows, and stock applies the head to
a whole batch at once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import QuantpipeError

# Logits computed at once: rows x vocab x 4 bytes (a log-softmax copy of the same size follows).
LOGITS_CHUNK_BYTES = 64 << 20
# Fewest rows per LM-head call: with fewer than 12 rows (not a multiple of 4) MKL's float32 GEMM
# takes kernels with another summation order (measured, AVX-512), so fewer rows would not
# reproduce stock's values, which come from the head applied to a whole batch at once.
MIN_HEAD_ROWS = 16


def head_rows(vocab: int) -> int:
    """Positions whose logits are computed together: LOGITS_CHUNK_BYTES of float32 logits."""
    return max(MIN_HEAD_ROWS, LOGITS_CHUNK_BYTES // (4 * vocab))


@contextmanager
def head_inputs(model) -> Iterator[list[torch.Tensor]]:
    """Within the block the model's LM head records its input and returns zero-width logits, so a
    forward computes everything but the [batch, positions, vocab] matrix."""
    head = model.get_output_embeddings()
    seen: list[torch.Tensor] = []

    def record(hidden, *args, **kwargs):
        seen.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    saved = head.__dict__.get("forward")  # an instance-level forward (e.g. a quantization wrapper) comes back after
    head.forward = record
    try:
        yield seen
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def finish_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """What transformers' causal-LM forwards do to the LM head's output, in their order of operations."""
    cfg = model.config.get_text_config()
    if getattr(cfg, "logit_scale", None) is not None and hasattr(model, "logit_scale"):  # Cohere
        logits = logits * model.logit_scale
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite
        logits = logits / cfg.logits_scaling
    if (cap := getattr(cfg, "final_logit_softcapping", None)) is not None:  # Gemma 2 and 3
        logits = torch.tanh(logits / cap) * cap
    return logits


_head_checked: weakref.WeakSet = weakref.WeakSet()


def check_head(model) -> None:
    """Refuse a model whose logits are not `finish_logits(head(hidden))`: on a few tokens, the model's
    own logits must equal ours bit for bit (same head input, so only the finishing can differ)."""
    if model in _head_checked:
        return
    arch = type(model).__name__
    head = model.get_output_embeddings()
    if head is None:
        raise QuantpipeError(
            f"{arch}: no LM head module (get_output_embeddings() is None); quantpipe applies the "
            "LM head itself to keep logits memory bounded, so it cannot evaluate this model"
        )
    ids = (torch.arange(1, 9) % model.config.get_text_config().vocab_size)[None].to(model.device)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        with head_inputs(model) as seen:
            model(ids, use_cache=False)
        got = finish_logits(model, head(seen[0])) if len(seen) == 1 else None
    if got is None or got.shape != want.shape or not torch.equal(got, want):
        raise QuantpipeError(
            f"{arch}: its forward transforms the LM head's output in a way quantpipe does not "
            "reproduce (it knows final_logit_softcapping, logit_scale and logits_scaling), so its "
            "log-probs cannot be computed with the bounded LM head"
        )
    _head_checked.add(model)


def head_logprobs(
    model, hidden: torch.Tensor, dtype: torch.dtype | None = None, rows: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, log-softmax of that chunk's logits) for hidden [n, hidden_size], `rows` at a time.
    dtype None keeps the logits' dtype, as stock HFLM's log_softmax does."""
    head = model.get_output_embeddings()
    rows = rows or head_rows(model.config.get_text_config().vocab_size)
    for a in range(0, hidden.shape[0], rows):
        h = hidden[a : a + rows]
        n = h.shape[0]
        if n < MIN_HEAD_ROWS:
            h = torch.cat([h, h.new_zeros(MIN_HEAD_ROWS - n, h.shape[1])])
        logits = finish_logits(model, head(h))[:n]
        yield a, F.log_softmax(logits, dim=-1, dtype=dtype)


def hf_next_token_logprobs(model, ids: list[int], chunk: int | None = None, dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """Next-token log-probs for positions 0..len(ids)-2 of one sequence, [<= chunk, vocab] at a time
    (dtype: the log-softmax's; the logits are cast to it first, as `logits.to(dtype).log_softmax()`)."""
    check_head(model)
    with torch.no_grad():
        with head_inputs(model) as seen:
            model(torch.tensor([ids], device=model.device), use_cache=False)
        for _, logp in head_logprobs(model, seen[0][0, :-1], dtype=dtype, rows=chunk):
            yield logp
