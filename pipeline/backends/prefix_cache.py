"""lm-eval's HF model with shared-prefix key/value reuse for log-likelihood requests, and an LM
head that never builds a [batch, length, vocab] matrix.

Few-shot tasks send the same long prefix with every item: MMLU's subject description and five dev
examples, TruthfulQA's six-question preamble (and each question again for each of its answers).
Stock HFLM runs the whole prompt for every request and applies the LM head to every position.
Here, as vLLM's prefix caching does, requests are sorted by token sequence, those that share a
prefix are grouped, the prefix is run once and its key/value cache is reused for each request's
remaining tokens, batched by length. Suffixes after a prefix run as one packed row where that
costs fewer FLOPs than padding every suffix to the longest (MMLU's five questions per subject: a
third of the padded positions were padding), and as the trie of their tokens (`SuffixTrie`): a
token shared with all the tokens before it, as TruthfulQA's question is by each of its answers,
runs once (40 TruthfulQA items: 2,903 positions after the preamble, not 8,053). Each token keeps
its own position id and a custom mask lets it attend the prefix and the tokens before it on its
own suffix. Packing needs sdpa attention, or the batch-invariant float32 attention (FP8 rows),
which places key blocks per request and so unpacks the row into the padded batch inside the
attention (PACKED); it is checked at load against padded batches (`_packing_works`). Request
inputs, truncation and the returned (log-prob, is-greedy) pairs are exactly stock HFLM's; only
the floating-point summation order differs. Rows with a runtime patch that owns the KV cache
(TurboQuant) run with `share_prefixes=False`: stock lm-eval's batches, order and padding exactly,
so their scores are stock's bit for bit. Rows with run-time activation quantization
(FP8-dynamic), where summation order would show through the 8-bit rounding, are made
batch-invariant first (batch_invariant.py) and then share prefixes exactly.

Bounded memory (every log-likelihood path): stock HFLM materializes float32 logits for every
position of a batch and then a log-softmax copy (8 x 700 x 262,144 x 4 B = 5.9 GB each, for a
262k vocabulary). Here the model runs with its LM head swapped for a recorder (`_head_inputs`),
so the forward stops at the head's input (hidden states, `hidden_size` wide); the head, what the
model's forward does to its output (`finish_logits`, checked against the model's own logits by
`check_head`) and the log-softmax then run on the positions whose log-probs are read, at most
`head_rows(vocab)` rows at a time (64 MiB of logits). The head sees at least MIN_HEAD_ROWS rows
per call (padded with zeros): oneDNN/MKL switch to other kernels, with another summation order,
below about 12 rows, and stock applies the head to a whole batch at once. Generation needs only
the last position's logits, which transformers' generate asks for (`logits_to_keep=1`).

Generation is stock HFLM's `generate` with two changes that leave every computed value alone:
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

Both paths attend with grouped-query attention in place (`sdpa_gqa`): transformers copies each
key/value head once per query head before SDPA unless the device is CUDA with no mask; on CPU
that copy cost as much as the attention itself. torch's CPU flash kernel reads the shared head
directly (`enable_gqa`) and returns bit-identical outputs (tested), so nothing else changes.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import stop_sequences_criteria
from transformers import AttentionInterface, DynamicCache, StoppingCriteria
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import QuantpipeError

# A prefix shorter than this is not worth a separate forward pass.
MIN_SHARED = 32
# Logits computed at once: rows x vocab x 4 bytes (a log-softmax copy of the same size follows).
LOGITS_CHUNK_BYTES = 64 << 20
# Fewest rows per LM-head call: with fewer than 12 rows (not a multiple of 4) MKL's float32 GEMM
# takes kernels with another summation order (measured, AVX-512), so fewer rows would not
# reproduce stock's values, which come from the head applied to a whole batch at once.
MIN_HEAD_ROWS = 16
# Most tokens in one packed row (its [tokens, prefix + tokens] mask is built whole).
PACK_TOKENS = 4096
# A packed row grows while the attention its tokens pay to each other's (masked) keys stays within
# this share of its linear work: the row's attention cost grows with the square of its length.
PACK_ATTENTION_SHARE = 0.25
# Attention implementations that take packed suffixes: sdpa through the custom mask; the
# batch-invariant float32 attention by unpacking them into the padded batch (PACKED).
PACKABLE = ("sdpa", "sdpa_gqa", "f32_invariant")


@dataclass(frozen=True)
class SuffixTrie:
    """Suffixes after a shared prefix as the trie of their tokens: a token that several suffixes
    share with all the tokens before it (TruthfulQA's question, read by each of its answers) is
    one node, run once. Nodes are numbered as the suffixes first reach them: the nodes suffix r
    reaches first are its last fresh[r] tokens, numbered right after those of suffixes 0..r-1."""

    tokens: torch.Tensor  # [nodes] token id
    depth: torch.Tensor  # [nodes] index in its suffix (position = prefix length + depth)
    paths: torch.Tensor  # [suffixes, longest] node of each suffix token, -1 past the suffix's end
    fresh: torch.Tensor  # [suffixes] how many of its nodes each suffix reaches first

    @classmethod
    def of(cls, suffixes: list[tuple]) -> SuffixTrie:
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        tokens, depth, paths, fresh = [], [], [], []
        for s in suffixes:
            parent, path, before = -1, [], len(tokens)
            for j, t in enumerate(s):
                node = index.setdefault((parent, t), len(tokens))
                if node == len(tokens):
                    tokens.append(t)
                    depth.append(j)
                path.append(node)
                parent = node
            paths.append(path)
            fresh.append(len(tokens) - before)
        grid = torch.full((len(paths), max(len(p) for p in paths)), -1, dtype=torch.long)
        for r, path in enumerate(paths):
            grid[r, : len(path)] = torch.tensor(path, dtype=torch.long)
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(depth, dtype=torch.long), grid, torch.tensor(fresh))

    @property
    def nodes(self) -> int:
        return len(self.tokens)

    def attends(self) -> torch.Tensor:
        """[nodes, nodes] bool: node i attends node j iff j is i or before it on i's suffix."""
        out = torch.zeros(self.nodes, self.nodes, dtype=torch.bool)
        for path in self.paths:
            path = path[path >= 0]
            out[path[:, None], path[None, :]] |= torch.ones(len(path), len(path), dtype=torch.bool).tril()
        return out


# The trie of the packed row a forward runs (None: not packed), for attention functions that place
# keys per request and so cannot take the custom mask as it is.
PACKED: contextvars.ContextVar = contextvars.ContextVar("quantpipe_packed", default=None)


# -- LM head, bounded ------------------------------------------------------------------------------


def head_rows(vocab: int) -> int:
    """Positions whose logits are computed together: LOGITS_CHUNK_BYTES of float32 logits."""
    return max(MIN_HEAD_ROWS, LOGITS_CHUNK_BYTES // (4 * vocab))


@contextmanager
def _head_inputs(model) -> Iterator[list[torch.Tensor]]:
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
        with _head_inputs(model) as seen:
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
        with _head_inputs(model) as seen:
            model(torch.tensor([ids], device=model.device), use_cache=False)
        for _, logp in head_logprobs(model, seen[0][0, :-1], dtype=dtype, rows=chunk):
            yield logp


def full_attention_only(model) -> bool:
    """Whether every layer attends to all earlier keys (no sliding-window layer)."""
    cfg = model.config.get_text_config()
    return not getattr(cfg, "sliding_window", None) and not any("sliding" in str(t) for t in getattr(cfg, "layer_types", None) or [])


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
    if query.device.type != "cpu" or groups == 1 or kwargs.get("position_bias") is not None or key.shape[-1] != value.shape[-1]:
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
    from ..memory import peak_memory_bytes

    check_head(model)
    gen = torch.Generator().manual_seed(0)

    def forward_peak(b: int) -> int:
        ids = torch.randint(len(tokenizer), (b, max_len), generator=gen).to(model.device)
        with peak_memory_bytes(model.device.type) as m, torch.no_grad():
            with _head_inputs(model) as seen:
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


class PrefixCachingHFLM(HFLM):
    """HFLM whose log-likelihood path reuses shared-prefix KV state and applies the LM head in bounded
    chunks (see module docstring). share_prefixes=False keeps stock lm-eval's batches exactly.
    batch_size="auto" is resolved once, by measurement (auto_batch_size), against memory_budget
    bytes of resident memory (default: what is resident now plus 80% of what is available)."""

    def __init__(self, *args, min_shared: int = MIN_SHARED, share_prefixes: bool = True, memory_budget: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_shared = min_shared
        params = inspect.signature(self.model.forward).parameters
        self.causal = self.backend == "causal"
        self.keeps_positions = "logits_to_keep" in params  # else the head input covers every position
        self.prefix_caching = share_prefixes and self.causal and self.keeps_positions
        if getattr(self.model.config, "_attn_implementation", None) == "sdpa":
            self.model.set_attn_implementation("sdpa_gqa")
        if self.causal:
            check_head(self.model)
        # suffixes packed into one row (PACK_TOKENS): with a custom 4D mask, which sdpa takes as given
        self.packing = False
        # (not with sliding-window layers: the custom mask would replace their window mask, and the
        # load check's few tokens stay inside any real window)
        attn = getattr(self.model.config, "_attn_implementation", None)
        if self.prefix_caching and attn in PACKABLE and full_attention_only(self.model):
            cfg = self.model.config.get_text_config()
            layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            embeddings = sum(p.numel() for p in self.model.get_input_embeddings().parameters())
            weights = sum(p.numel() for p in self.model.parameters()) - embeddings
            self._flops = (2 * weights, 4 * layers * heads * head_dim)  # per token; per query-key pair (QK^T, AV)
            try:
                self.packing = self._packing_works()
            except Exception:  # noqa: BLE001 - a model that refuses position_ids or a 4D mask: keep padded batches
                self.packing = False
        if self.causal and str(self.batch_size).startswith("auto"):
            from ..memory import memory_available_bytes, resident_bytes

            budget = memory_budget or resident_bytes() + int(0.8 * memory_available_bytes())
            self.batch_size_per_gpu = auto_batch_size(self.model, self.tokenizer, self.max_length, budget, max_batch=self.max_batch_size)

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None
        )

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """Stock HFLM._model_generate plus the appending cache and the RowsSettled criterion."""
        if self.causal and "past_key_values" not in generation_kwargs:
            generation_kwargs["past_key_values"] = append_cache(self.model.config)
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
        with self._autocast():
            return self.model.generate(
                input_ids=context,
                max_length=max_length,
                stopping_criteria=criteria,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                **generation_kwargs,
            )

    def _input(self, ctx: list[int], cont: list[int]) -> tuple:
        """The model input stock HFLM builds: left-truncated to max_length, last token dropped."""
        assert len(ctx) > 0 and 0 < len(cont) <= self.max_length
        return tuple((ctx + cont)[-(self.max_length + 1) :][:-1])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self.causal:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if not self.prefix_caching:
            return self._stock_batches(requests)

        inputs = [self._input(ctx, cont) for _, ctx, cont in requests]
        users: dict[tuple, list[int]] = {}  # distinct input -> the requests reading it
        for j, inp in enumerate(inputs):
            users.setdefault(inp, []).append(j)
        seqs = list(users)
        # the first position read; identical inputs (MMLU's one-token answers) read the widest window
        starts = [min(len(s) - len(requests[j][2]) for j in users[s]) for s in seqs]
        res: list = [None] * len(requests)
        for prefix_len, members in plan_groups(seqs, starts, self.min_shared):
            cache = self._prefix_cache(seqs[members[0]][:prefix_len]) if prefix_len else None
            for batch, pack in self._batches(members, seqs, prefix_len):
                hidden, first = self._suffix_hidden([seqs[i] for i in batch], [starts[i] for i in batch], prefix_len, cache, pack)
                reads, owners = [], []
                for r, i in enumerate(batch):
                    for j in users[seqs[i]]:
                        cont = requests[j][2]
                        reads.append((r, len(seqs[i]) - prefix_len - first - len(cont), cont))
                        owners.append(j)
                for j, answer in zip(owners, self._read(hidden, reads)):
                    res[j] = answer
        for (request_str, _, _), answer in zip(requests, res):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return res

    def _stock_batches(self, requests):
        """Stock HFLM._loglikelihood_tokens for a causal model: the same order, batches, one-token
        continuation grouping, right padding and forward inputs; only the LM head is bounded."""
        re_ord = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts" if self.logits_cache else None,
            group_fn=lambda r: r[-2] + r[-1][:-1],
        )
        res = []
        no_logits = torch.empty(1, 0, 0)  # get_cache expands a logits tensor per grouped request; ours are not built
        for chunk in re_ord.get_batched(n=self.batch_size):
            inps = [self._input(ctx, cont) for _, ctx, cont in chunk]
            width = max(len(i) for i in inps)
            ids = torch.zeros((len(inps), width), dtype=torch.long)  # lm-eval's pad_and_concat: right, zeros
            for r, inp in enumerate(inps):
                ids[r, : len(inp)] = torch.tensor(inp)
            reads, strs = [], []
            for r, ((request_str, ctx, cont), inp) in enumerate(zip(chunk, inps)):
                for req_str, cont_j, _ in re_ord.get_cache(req_str=request_str, cxt_toks=ctx, cont_toks=cont, logits=no_logits):
                    reads.append((r, len(inp) - len(cont_j), cont_j))
                    strs.append(req_str)
            first = min(p for _, p, _ in reads) if self.keeps_positions else 0
            with torch.no_grad(), self._autocast(), _head_inputs(self.model) as seen:
                kw = {"logits_to_keep": width - first} if self.keeps_positions else {}
                self.model(ids.to(self.device), use_cache=False, **kw)
            for req_str, answer in zip(strs, self._read(seen[0], [(r, p - first, c) for r, p, c in reads])):
                res.append(answer)
                if req_str is not None:
                    self.cache_hook.add_partial("loglikelihood", req_str, answer)
        return re_ord.get_original(res)

    def _read(self, hidden: torch.Tensor, reads: list[tuple[int, int, list[int]]]) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, greedy) per read (row of hidden, offset of the first position
        read, continuation tokens), as stock computes them; the LM head runs once per distinct position."""
        index: dict[tuple[int, int], int] = {}  # (row, position) -> row of `at`
        pos, tok, spans = [], [], []
        for r, off, cont in reads:
            a = len(pos)
            for k, t in enumerate(cont):
                pos.append(index.setdefault((r, off + k), len(index)))
                tok.append(t)
            spans.append((a, len(pos)))
        at = torch.tensor(list(index))
        pos, tok = torch.tensor(pos), torch.tensor(tok)
        vals, greedy = None, torch.empty(len(index), dtype=torch.long)
        with torch.no_grad(), self._autocast():
            for a, logp in head_logprobs(self.model, hidden[at[:, 0], at[:, 1]], dtype=self.softmax_dtype):
                # summed on the model's device, as stock sums: CUDA adds in another order than the CPU (1 ulp)
                vals = torch.empty(len(pos), dtype=logp.dtype, device=logp.device) if vals is None else vals
                greedy[a : a + len(logp)] = logp.argmax(-1).cpu()
                sel = (pos >= a) & (pos < a + len(logp))
                vals[sel.to(logp.device)] = logp[(pos[sel] - a).to(logp.device), tok[sel].to(logp.device)]
        return [(float(vals[a:b].sum()), bool((greedy[pos[a:b]] == tok[a:b]).all())) for a, b in spans]

    def _prefix_cache(self, prefix: tuple):
        with torch.no_grad(), self._autocast():
            out = self.model(torch.tensor([prefix], device=self.device), use_cache=True, logits_to_keep=1)
        return out.past_key_values

    def _batches(self, members: list[int], seqs: list[tuple], prefix_len: int) -> Iterator[tuple[list[int], bool]]:
        """A group's forwards after its prefix, as (members, packed). Where packing is on, the members
        are taken in token order (plan_groups' order, in which suffixes sharing tokens are adjacent)
        into rows of at most `_pack_limit` trie nodes; a row runs packed where that costs fewer FLOPs
        than padding (`_packing_pays`), else as the padded batches below. Padded batches are stock
        lm-eval's: batch_size requests, longest first."""

        def padded(batch: list[int]) -> Iterator[tuple[list[int], bool]]:
            batch = sorted(batch, key=lambda i: -len(seqs[i]))
            for b in range(0, len(batch), self.batch_size):
                yield batch[b : b + self.batch_size], False

        if not (self.packing and prefix_len):
            yield from padded(members)
            return
        limit, row, nodes = self._pack_limit(), [], 0

        def flush() -> Iterator[tuple[list[int], bool]]:
            batches = list(padded(row))
            if self._packing_pays([[len(seqs[i]) - prefix_len for i in b] for b, _ in batches], nodes, prefix_len):
                yield row, True
            else:
                yield from batches

        for i in members:
            # in sorted order a suffix shares the most leading tokens with the one before it
            new = len(seqs[i]) - (_common_prefix(seqs[row[-1]], seqs[i]) if row else prefix_len)
            if row and nodes + new > limit:
                yield from flush()
                row, nodes, new = [], 0, len(seqs[i]) - prefix_len
            row.append(i)
            nodes += new
        yield from flush()

    def _suffix_hidden(self, seqs, starts, prefix_len: int, cache, pack: bool = False) -> tuple[torch.Tensor, int]:
        """LM-head inputs [batch, positions, hidden] from the earliest start to the end of the longest
        suffix, run after the shared prefix; and that earliest start, relative to the suffix.
        pack: as one packed row (`_packed_hidden`), else right-padded."""
        suffixes = [s[prefix_len:] for s in seqs]
        width = max(len(s) for s in suffixes)
        if pack:
            return self._packed_hidden(suffixes, min(st - prefix_len for st in starts), prefix_len, cache)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)  # right padding: causal, so inert
        for r, s in enumerate(suffixes):
            ids[r, : len(s)] = torch.tensor(s)
        first = min(st - prefix_len for st in starts)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            if len(seqs) > 1:
                past.batch_repeat_interleave(len(seqs))
        with torch.no_grad(), self._autocast(), _head_inputs(self.model) as seen:
            self.model(
                ids.to(self.device),
                past_key_values=past,
                use_cache=past is not None,
                logits_to_keep=torch.arange(first, width, device=self.device),
            )
        return seen[0], first

    def _pack_limit(self) -> int:
        """Most trie nodes in one packed row: every token of the row also meets the other suffixes'
        (masked) keys, which stays within PACK_ATTENTION_SHARE of its linear work; at most PACK_TOKENS."""
        per_token, per_pair = self._flops
        return max(1, min(PACK_TOKENS, int(PACK_ATTENTION_SHARE * per_token / per_pair)))

    def _packing_pays(self, batches: list[list[int]], nodes: int, prefix_len: int) -> bool:
        """Whether one packed row of these suffixes (`nodes` distinct tokens) costs fewer FLOPs than
        the padded batches they would otherwise run (`batches`: each batch's suffix lengths): padding
        runs every row to its batch's longest suffix; packing runs each distinct token once, but each
        attends the other suffixes' keys too (masked, still computed)."""
        if sum(map(len, batches)) < 2 or nodes > PACK_TOKENS:
            return False
        per_token, per_pair = self._flops
        padded = sum(len(b) * max(b) * (per_token + (prefix_len + max(b)) * per_pair) for b in batches)
        return nodes * (per_token + (prefix_len + nodes) * per_pair) < padded

    def _packed_hidden(self, suffixes: list[tuple], first: int, prefix_len: int, cache) -> tuple[torch.Tensor, int]:
        """`_suffix_hidden` with the suffixes run as one row after the prefix, each distinct token once
        (`SuffixTrie`): a node at its own position (prefix_len + its index in its suffix), attending
        the prefix and the nodes before it on its suffix; laid out as the padded batch's would be."""
        trie = SuffixTrie.of(suffixes)
        mask = torch.cat([torch.ones(trie.nodes, prefix_len, dtype=torch.bool), trie.attends()], 1)[None, None]
        keep = (trie.depth >= first).nonzero().flatten()  # the positions read: from the earliest start on
        token = PACKED.set(trie)
        try:
            with torch.no_grad(), self._autocast(), _head_inputs(self.model) as seen:
                self.model(
                    trie.tokens[None].to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=(trie.depth + prefix_len)[None].to(self.device),
                    past_key_values=copy.deepcopy(cache),
                    use_cache=True,
                    logits_to_keep=keep.to(self.device),
                )
        finally:
            PACKED.reset(token)
        hidden = seen[0][0]
        rank = torch.full((trie.nodes,), -1, dtype=torch.long)
        rank[keep] = torch.arange(len(keep))
        cols = trie.paths[:, first:]  # each suffix's nodes from the earliest start on
        real = cols >= 0
        out = hidden.new_zeros(*cols.shape, hidden.shape[-1])
        out[real.to(hidden.device)] = hidden[rank[cols[real]].to(hidden.device)]
        return out, first

    def _packing_works(self) -> bool:
        """Packed suffixes give this model the padded batch's hidden states up to float rounding (a
        model that ignores position_ids or a custom mask, e.g. with sliding-window layers, does not):
        two suffixes after a 40-token prefix, both ways, sharing their first two tokens (one trie node each)."""
        gen = torch.Generator().manual_seed(0)
        vocab = self.model.config.get_text_config().vocab_size
        seqs = [tuple(torch.randint(vocab, (n,), generator=gen).tolist()) for n in (47, 44)]
        seqs[1] = seqs[0][:42] + seqs[1][42:]
        cache = self._prefix_cache(seqs[0][:40])
        padded, _ = self._suffix_hidden(seqs, [40, 40], 40, cache, pack=False)
        packed, _ = self._suffix_hidden(seqs, [40, 40], 40, cache, pack=True)
        padded[1, 4:] = 0  # the padding positions, which packing does not compute
        if self.model.config._attn_implementation == "f32_invariant":  # batch-invariant rows: the same bits
            return torch.equal(packed, padded)
        scale = float(padded.abs().max())
        return bool(torch.allclose(packed, padded, rtol=1e-4, atol=1e-5 * scale))
