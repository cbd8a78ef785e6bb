"""lm-eval's HF model with shared-prefix key/value reuse for log-likelihood requests.

Few-shot tasks send the same long prefix with every item: MMLU's subject description and five
dev examples, TruthfulQA's six-question preamble (and each question again for each of its
answers). Stock HFLM runs the whole prompt for every request and applies the LM head to every
position. Here, as vLLM's prefix caching does, requests are sorted by token sequence, those that
share a prefix are grouped, the prefix is run once and its key/value cache is reused for each
request's remaining tokens, batched by length, and the LM head is applied only at the positions
whose log-probabilities are read. Request inputs, truncation and the returned (log-prob,
is-greedy) pairs are exactly stock HFLM's; only the floating-point summation order differs.

Generation is stock HFLM's `generate` with one change of storage, not of arithmetic: the KV
cache appends new tokens into spare capacity (AppendLayer) instead of concatenating the whole
cache at every step, which on CPU cost as much as the matmuls of a decode step. Attention sees
the same values in the same shapes; the generated tokens are identical (tested).
"""

from __future__ import annotations

import copy
import inspect

import torch
from lm_eval.models.huggingface import HFLM
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# A prefix shorter than this is not worth a separate forward pass.
MIN_SHARED = 32


def _common_prefix(a: tuple, b: tuple) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_groups(seqs: list[tuple], starts: list[int], min_shared: int = MIN_SHARED) -> list[tuple[int, list[int]]]:
    """Split sequences into (prefix_length, member indices) groups.

    seqs[i] is a model input; positions >= starts[i] are the ones whose logits are needed, so a
    group's prefix never reaches past any member's start. Sequences are visited in sorted order,
    where a shared prefix makes them adjacent; a sequence joins the current group while the
    group keeps a prefix of at least `min_shared` tokens and at least half of what it had.
    """
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    groups: list[tuple[int, list[int]]] = []
    for i in order:
        if groups:
            p, members = groups[-1]
            first = seqs[members[0]]
            joined = min(p, _common_prefix(first, seqs[i]), starts[i])
            keep = min_shared if len(members) == 1 else max(min_shared, p // 2)
            if joined >= keep:
                groups[-1] = (joined, members + [i])
                continue
        groups.append((starts[i], [i]))
    # a group of one shares nothing: its "prefix" is just a split of its own sequence
    return [(p if len(m) > 1 else 0, m) for p, m in groups]


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
            buf = tuple(torch.empty((b, h, max(2 * n, n + 256), d), dtype=key_states.dtype, device=key_states.device)
                        for _ in range(2))
            if n0:
                buf[0][..., :n0, :] = self.keys
                buf[1][..., :n0, :] = self.values
            self._buf = buf
        buf[0][..., n0:n, :] = key_states
        buf[1][..., n0:n, :] = value_states
        self.keys, self.values = buf[0][..., :n, :], buf[1][..., :n, :]
        return self.keys, self.values


def append_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = AppendLayer
    return cache


class PrefixCachingHFLM(HFLM):
    """HFLM whose log-likelihood path reuses shared-prefix KV state (see module docstring)."""

    def __init__(self, *args, min_shared: int = MIN_SHARED, share_prefixes: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_shared = min_shared
        params = inspect.signature(self.model.forward).parameters
        self.causal = self.backend == "causal"
        self.prefix_caching = share_prefixes and self.causal and "logits_to_keep" in params

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if self.causal and "past_key_values" not in generation_kwargs:
            generation_kwargs["past_key_values"] = append_cache()
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self.prefix_caching or self.batch_size == "auto":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

        # Inputs exactly as stock HFLM builds them: left-truncated to max_length, last token dropped.
        inputs, conts = [], []
        for _, ctx, cont in requests:
            assert len(ctx) > 0 and 0 < len(cont) <= self.max_length
            inputs.append(tuple((ctx + cont)[-(self.max_length + 1):][:-1]))
            conts.append(cont)
        # Identical inputs (MMLU's one-token answers) run once, reading the widest window needed.
        unique: dict[tuple, int] = {}
        for inp, cont in zip(inputs, conts):
            start = len(inp) - len(cont)
            unique[inp] = min(unique.get(inp, start), start)
        seqs = list(unique)
        starts = [unique[s] for s in seqs]
        logprobs: dict[tuple, torch.Tensor] = {}  # input -> log-softmax rows from its start
        for prefix_len, members in plan_groups(seqs, starts, self.min_shared):
            cache = self._prefix_cache(seqs[members[0]][:prefix_len]) if prefix_len else None
            # batch by length, longest first (as stock lm-eval does)
            members = sorted(members, key=lambda i: -len(seqs[i]))
            for b in range(0, len(members), self.batch_size):
                batch = members[b:b + self.batch_size]
                rows = self._suffix_logprobs([seqs[i] for i in batch], [starts[i] for i in batch], prefix_len, cache)
                for i, row in zip(batch, rows):
                    logprobs[seqs[i]] = row
        res = []
        for (request_str, _, _), inp, cont in zip(requests, inputs, conts):
            window = logprobs[inp][-len(cont):]  # rows predicting the continuation tokens
            cont_t = torch.tensor(cont, dtype=torch.long)
            answer = (float(window.gather(1, cont_t[:, None]).sum()), bool((window.argmax(-1) == cont_t).all()))
            res.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return res

    def _prefix_cache(self, prefix: tuple):
        with torch.no_grad():
            out = self.model(torch.tensor([prefix], device=self.device), use_cache=True, logits_to_keep=1)
        return out.past_key_values

    def _suffix_logprobs(self, seqs, starts, prefix_len: int, cache):
        """Log-softmax rows for positions start..end of each sequence, run after the shared prefix."""
        import torch.nn.functional as F

        suffixes = [s[prefix_len:] for s in seqs]
        width = max(len(s) for s in suffixes)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)  # right padding: causal, so inert
        for r, s in enumerate(suffixes):
            ids[r, :len(s)] = torch.tensor(s)
        first = min(st - prefix_len for st in starts)
        keep = torch.arange(first, width)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            if len(seqs) > 1:
                past.batch_repeat_interleave(len(seqs))
        with torch.no_grad():
            logits = self.model(ids.to(self.device), past_key_values=past, use_cache=past is not None,
                                logits_to_keep=keep.to(self.device)).logits
        logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype).cpu()
        return [logp[r, st - prefix_len - first:len(s) - first]
                for r, (s, st) in enumerate(zip(suffixes, starts))]
