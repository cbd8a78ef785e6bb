"""The batch size of a log-likelihood evaluation, measured against a memory budget."""

from __future__ import annotations

import torch

from ..errors import QuantpipeError
from ..memory import peak_memory_bytes
from .lm_head import check_head, head_inputs, head_logprobs, head_rows


def auto_batch_size(model, tokenizer, max_len: int, budget_bytes: int, max_batch: int = 64) -> int:
    """The largest batch (at most max_batch) whose evaluation step at max_len tokens per row keeps
    this process's peak resident memory (weights included; on a GPU: torch's allocated bytes)
    within budget_bytes. Call it on the model as it will be evaluated (PrefixCachingHFLM does, for
    batch_size="auto").

    Measured, not modelled, under peak_memory_bytes:
    - the forward of a step: [b, max_len] tokens, keeping the KV cache (as generation's prefill and
      the prefix cache do) and the LM-head input of every position, gathered as a rolling
      log-likelihood window reads them; run at b = 1, 2 and 4 (4 only if its predicted peak fits).
      Its peak grows linearly in b: from b = 1 to 2 by a little less than later (allocator reuse),
      so the slope is taken from the largest two measured;
    - one full LM-head chunk (logits and log-softmax), a fixed cost, measured once and added on top
      (the chunk partly reuses memory the forward freed, so the sum is an upper bound).
    Costs up to seven sequences of max_len through the model."""
    check_head(model)
    gen = torch.Generator().manual_seed(0)

    def forward_peak(b: int) -> int:
        ids = torch.randint(len(tokenizer), (b, max_len), generator=gen).to(model.device)
        with peak_memory_bytes(model.device.type) as m, torch.no_grad():
            with head_inputs(model) as seen:
                out = model(ids, use_cache=True)
            read = seen[0].reshape(-1, seen[0].shape[-1]).clone()  # as _read gathers the positions it reads
            del out, seen, read
        return m.bytes

    def chunk_cost() -> int:
        rows, width = head_rows(model.config.get_text_config().vocab_size), model.config.get_text_config().hidden_size
        with peak_memory_bytes(model.device.type) as m, torch.no_grad():
            next(head_logprobs(model, torch.zeros(rows, width, dtype=model.dtype, device=model.device)))
        return m.grown_bytes

    one, chunk = forward_peak(1), chunk_cost()
    if one + chunk > budget_bytes:
        raise QuantpipeError(
            f"{type(model).__name__}: one sequence of {max_len} tokens peaks at "
            f"{(one + chunk) / 2**30:.2f} GiB, over the memory budget of {budget_bytes / 2**30:.2f} GiB"
        )
    at, peak = 2, forward_peak(2)
    slope = peak - one
    if max_batch >= 4 and peak + 2 * slope + chunk <= budget_bytes:
        at, peak, before = 4, forward_peak(4), peak
        slope = (peak - before) / 2
    return int(max(1, min(max_batch, at + (budget_bytes - chunk - peak) // max(slope, 1))))
