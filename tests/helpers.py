"""Helpers shared by tests: KL between two models' next-token distributions on fixed text."""

from __future__ import annotations

import torch

FIXED_TEXT = (
    "Return a new list containing all items from the iterable in ascending order. A custom key function "
    "can be supplied to customize the sort order, and the reverse flag can be set to request the result "
    "in descending order. The sort is guaranteed to be stable."
)


def token_logprobs(model, tokenizer, text: str = FIXED_TEXT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float().log_softmax(-1)[0]


def mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over positions of KL(P || Q), P the reference."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
