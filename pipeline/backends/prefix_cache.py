"""lm-eval's HF model with shared-prefix key/value reuse for log-likelihood requests.

Few-shot tasks send the same long prefix with every item: MMLU's subject description and five
dev examples, TruthfulQA's six-question preamble (and each question again for each of its
answers). Stock HFLM runs the whole prompt for every request and applies the LM head to every
position. Here, as vLLM's prefix caching does, requests are sorted by token sequence, those that
share a prefix are grouped, the prefix is run once and its key/value cache is reused for each
request's remaining tokens, batched by length, and the LM head is applied only at the positions
whose log-probabilities are read. Request inputs, truncation and the returned (log-prob,
is-greedy) pairs are exactly stock HFLM's; only the floating-point summation order differs.

Generation is stock HFLM's `generate` with two changes that leave every computed value alone:
- the KV cache appends new tokens into spare capacity (AppendLayer) instead of concatenating the
  whole cache at every step, which on CPU cost as much as the matmuls of a decode step;
- a batch stops as soon as every row's returned text is settled (RowsSettled). Stock stops a
  batch only when one stop string has appeared in all rows, so a batch whose rows end on
  different stop strings runs to the token cap, and lm-eval then cuts each text at its first
  stop string. Here a row is settled once that cut cannot move: a stop string was found and
  enough characters follow it that no stop string could still complete earlier, or the row
  emitted EOS and only skipped padding follows. The batch keeps its shape, so every step that
  runs computes exactly what stock computes; it just runs fewer of them.

Both paths attend with grouped-query attention in place (`sdpa_gqa`): transformers copies each
key/value head once per query head before SDPA unless the device is CUDA with no mask; on CPU
that copy cost as much as the attention itself. torch's CPU flash kernel reads the shared head
directly (`enable_gqa`) and returns bit-identical outputs (tested), so nothing else changes.
"""

from __future__ import annotations

import copy
import inspect

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria
from transformers import AttentionInterface, DynamicCache, StoppingCriteria
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, with GQA key/value heads read in place on CPU."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type != "cpu" or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # the rest of sdpa_attention_forward's CPU path, with enable_gqa instead of repeat_kv
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > query.shape[2]:
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("sdpa_gqa", sdpa_gqa_forward)
AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)


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


def append_cache() -> DynamicCache:
    cache = DynamicCache()
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


class PrefixCachingHFLM(HFLM):
    """HFLM whose log-likelihood path reuses shared-prefix KV state (see module docstring)."""

    def __init__(self, *args, min_shared: int = MIN_SHARED, share_prefixes: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_shared = min_shared
        params = inspect.signature(self.model.forward).parameters
        self.causal = self.backend == "causal"
        self.prefix_caching = share_prefixes and self.causal and "logits_to_keep" in params
        # stock batching (no prefix sharing) still trims the LM head: see _model_call
        self.trim_head = self.causal and "logits_to_keep" in params
        self._read_from: dict[tuple, int] | None = None
        if getattr(self.model.config, "_attn_implementation", None) == "sdpa":
            self.model.set_attn_implementation("sdpa_gqa")

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """Stock HFLM._model_generate plus the appending cache and the RowsSettled criterion."""
        if self.causal and "past_key_values" not in generation_kwargs:
            generation_kwargs["past_key_values"] = append_cache()
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        do_sample = generation_kwargs.get("do_sample")
        if (temp := generation_kwargs.get("temperature")) == 0.0 and do_sample is None:
            generation_kwargs["do_sample"] = do_sample = False
        if do_sample is False and temp == 0.0:
            generation_kwargs.pop("temperature", None)
        criteria = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
        if self.causal:
            eos = generation_kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
            criteria.append(RowsSettled(self.tokenizer, stop, context.shape[1], eos, self.tokenizer.pad_token_id))
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None):
            return self.model.generate(
                input_ids=context,
                max_length=max_length,
                stopping_criteria=criteria,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                **generation_kwargs,
            )

    def _read_windows(self, requests) -> tuple[list[tuple], list[list[int]], dict[tuple, int]]:
        """Model inputs exactly as stock HFLM builds them (left-truncated to max_length, last token
        dropped), the continuations, and per distinct input the first position whose log-probs
        are read (identical inputs, e.g. MMLU's one-token answers, read the widest window)."""
        inputs, conts = [], []
        for _, ctx, cont in requests:
            assert len(ctx) > 0 and 0 < len(cont) <= self.max_length
            inputs.append(tuple((ctx + cont)[-(self.max_length + 1) :][:-1]))
            conts.append(cont)
        first: dict[tuple, int] = {}
        for inp, cont in zip(inputs, conts):
            start = len(inp) - len(cont)
            first[inp] = min(first.get(inp, start), start)
        return inputs, conts, first

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self.prefix_caching or self.batch_size == "auto":
            # stock batching; _model_call still applies the LM head only where log-probs are read
            self._read_from = self._read_windows(requests)[2] if self.trim_head else None
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._read_from = None

        inputs, conts, unique = self._read_windows(requests)
        seqs = list(unique)
        starts = [unique[s] for s in seqs]
        logprobs: dict[tuple, torch.Tensor] = {}  # input -> log-softmax rows from its start
        for prefix_len, members in plan_groups(seqs, starts, self.min_shared):
            cache = self._prefix_cache(seqs[members[0]][:prefix_len]) if prefix_len else None
            # batch by length, longest first (as stock lm-eval does)
            members = sorted(members, key=lambda i: -len(seqs[i]))
            for b in range(0, len(members), self.batch_size):
                batch = members[b : b + self.batch_size]
                rows = self._suffix_logprobs([seqs[i] for i in batch], [starts[i] for i in batch], prefix_len, cache)
                for i, row in zip(batch, rows):
                    logprobs[seqs[i]] = row
        res = []
        for (request_str, _, _), inp, cont in zip(requests, inputs, conts):
            window = logprobs[inp][-len(cont) :]  # rows predicting the continuation tokens
            cont_t = torch.tensor(cont, dtype=torch.long)
            answer = (float(window.gather(1, cont_t[:, None]).sum()), bool((window.argmax(-1) == cont_t).all()))
            res.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return res

    def _model_call(self, inps, attn_mask=None, labels=None):
        """Stock forward, but on the stock log-likelihood path only the last positions that the
        stock slicing reads get logits: it slices each row's window relative to the end of the
        returned logits, so a shorter tail that covers every row's window reads the same rows."""
        keep = self._tail_needed(inps) if self._read_from is not None and attn_mask is None and labels is None else 0
        if not keep:
            return super()._model_call(inps, attn_mask, labels)
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None),
        ):
            return self.model(inps, logits_to_keep=keep).logits

    def _tail_needed(self, inps) -> int:
        """Positions from the earliest read position of any row of this right-padded batch to the
        end; 0 (all) if a row is not recognised. A row's input is the row with some of its
        trailing zeros (padding) removed; where several lengths match, the earliest start wins."""
        width = inps.shape[1]
        first = width
        for row in inps.tolist():
            starts = []
            n = width
            while True:
                if (start := self._read_from.get(tuple(row[:n]))) is not None:
                    starts.append(start)
                if n == 0 or row[n - 1] != 0:
                    break
                n -= 1
            if not starts:
                return 0
            first = min(first, *starts)
        return width - first

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
            ids[r, : len(s)] = torch.tensor(s)
        first = min(st - prefix_len for st in starts)
        keep = torch.arange(first, width)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            if len(seqs) > 1:
                past.batch_repeat_interleave(len(seqs))
        with torch.no_grad():
            logits = self.model(
                ids.to(self.device), past_key_values=past, use_cache=past is not None, logits_to_keep=keep.to(self.device)
            ).logits
        logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype).cpu()
        return [logp[r, st - prefix_len - first : len(s) - first] for r, (s, st) in enumerate(zip(suffixes, starts))]
