"""Generation as stock HFLM's `generate`, with two changes that leave every computed value alone:

- the KV cache of full-attention layers appends new tokens into spare capacity (AppendLayer)
  instead of concatenating the whole cache at every step, which on CPU cost as much as the
  matmuls of a decode step; sliding-window layers keep transformers' own window cache;
- a batch stops as soon as every row's returned text is settled (RowsSettled). Stock stops a
  batch only when one stop string has appeared in all rows, so a batch whose rows end on
  different stop strings runs to the token cap, and lm-eval then cuts each text at its first
  stop string. Here a row is settled once that cut cannot move: a stop string was found and
  enough characters follow it that no stop string could still complete earlier, or the row
  emitted EOS and only skipped padding follows. The batch keeps its shape, so every step that
  runs computes exactly what stock computes; it just runs fewer of them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, StoppingCriteria
from transformers.cache_utils import DynamicLayer


class AppendLayer(DynamicLayer):
    """DynamicLayer whose update writes into preallocated capacity (doubling when full) and
    exposes views of the filled part: O(new tokens) per step instead of O(cache length)."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        buf = getattr(self, "_buf", None)
        n0 = self.get_seq_length()
        n = n0 + key_states.shape[-2]
        # crop / batch_select / repeat_interleave replace self.keys: then rebuild from it
        ours = buf is not None and self.keys.data_ptr() == buf[0].data_ptr() and self.keys.shape[0] == buf[0].shape[0]
        if not ours or n > buf[0].shape[-2]:
            b, h, _, d = key_states.shape
            buf = tuple(torch.empty((b, h, max(2 * n, n + 256), d), dtype=key_states.dtype, device=key_states.device) for _ in range(2))
            if n0:
                buf[0][..., :n0, :] = self.keys
                buf[1][..., :n0, :] = self.values
            self._buf = buf
        buf[0][..., n0:n, :] = key_states
        buf[1][..., n0:n, :] = value_states
        self.keys, self.values = buf[0][..., :n, :], buf[1][..., :n, :]
        return self.keys, self.values


def append_cache(config=None) -> DynamicCache:
    """transformers' default generation cache for this config (sliding-window layers keep only their
    window), with AppendLayer for the full-attention layers."""
    cache = DynamicCache(config=config)
    if cache.layers:
        cache.layers = [AppendLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:
        cache.layer_class_to_replicate = AppendLayer
    return cache


class RowsSettled(StoppingCriteria):
    """True once no row's returned text can change: lm-eval decodes each row's generated tokens
    (special tokens skipped) and cuts the text at the earliest stop string. The cut is final
    when a stop string starts at q and the text reaches past q + the longest stop string (so
    none can still complete before q), or when the row emitted EOS and the padding generate
    appends after it is skipped by the decode. Rows are checked until settled, then left alone."""

    MARGIN = 2  # characters: the decode of a token prefix may end in a partial UTF-8 character

    def __init__(self, tokenizer, stop: list[str], prompt_len: int, eos_token_id, pad_token_id):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len
        self.stop = [s for s in stop if s]
        self.reach = max((len(s) for s in self.stop), default=0) + self.MARGIN
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.eos = {e for e in eos if e is not None}
        self.pad_skipped = pad_token_id in set(tokenizer.all_special_ids)
        self.settled: set[int] = set()

    def _row_settled(self, tokens: list[int]) -> bool:
        if self.pad_skipped and self.eos.intersection(tokens):
            return True
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return bool(cuts) and len(text) - min(cuts) >= self.reach

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        generated = input_ids[:, self.prompt_len :].tolist()
        for row, tokens in enumerate(generated):
            if row not in self.settled and self._row_settled(tokens):
                self.settled.add(row)
        return len(self.settled) == len(generated)
