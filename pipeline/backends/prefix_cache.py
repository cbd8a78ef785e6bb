"""lm-eval's HF model with shared-prefix key/value reuse for log-likelihood requests, an LM head
that never builds a [batch, length, vocab] matrix, and generation that stops once its texts are
settled.

Few-shot tasks send the same long prefix with every item: MMLU's subject description and five dev
examples, TruthfulQA's six-question preamble (and each question again for each of its answers).
Stock HFLM runs the whole prompt for every request and applies the LM head to every position.
Here, as vLLM's prefix caching does, requests that share a prefix are grouped, the prefix is run
once and its key/value cache is reused for each request's remaining tokens, batched by length or
packed into one row as the trie of their tokens (prefix_groups.py). Each packed token keeps its own
position id and a custom mask lets it attend the prefix and the tokens before it on its own suffix.
Packing needs sdpa attention, or the batch-invariant float32 attention (FP8 rows), which places key
blocks per request and so unpacks the row into the padded batch inside the attention (it is handed
the row's trie as the forward's PACKED_SUFFIXES argument); it is checked at load against padded
batches (`_packing_works`), and the packed rows an evaluation runs are counted (`packed`).

Request inputs, truncation and the returned (log-prob, is-greedy) pairs are exactly stock HFLM's;
only the floating-point summation order differs. Rows with a runtime patch that owns the KV cache
(TurboQuant) run with `share_prefixes=False`: stock lm-eval's batches, order and padding exactly,
so their scores are stock's bit for bit. Rows with run-time activation quantization (FP8-dynamic),
where summation order would show through the 8-bit rounding, are made batch-invariant first
(batch_invariant.py) and then share prefixes exactly.

Every log-likelihood path reads log-probs through the bounded LM head (lm_head.py); generation is
stock's with an appending KV cache and early stopping (generation_cache.py); both attend with
grouped-query attention in place (attention.py's `sdpa_gqa`); batch_size="auto" is measured
(auto_batch.py).
"""

from __future__ import annotations

import copy
import inspect

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import stop_sequences_criteria

from .attention import full_attention_only, use_sdpa_gqa
from .auto_batch import auto_batch_size
from .generation_cache import RowsSettled, append_cache
from .lm_head import check_head, head_inputs, head_logprobs
from .low_precision import LOW_PRECISION, Agreement, below_float32, check_requests, stock_bs1
from .prefix_groups import MIN_SHARED, PACKED_SUFFIXES, PackedCounts, PackingCost, SuffixTrie, group_batches, plan_groups

# Attention implementations that take packed suffixes: sdpa through the custom mask; the
# batch-invariant float32 attention by unpacking them into the padded batch, for which it is
# handed the row's trie (UNPACKS).
PACKABLE = ("sdpa", "sdpa_gqa", "f32_invariant")
UNPACKS = ("f32_invariant",)


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
        use_sdpa_gqa(self.model)
        if self.causal:
            check_head(self.model)
        # suffixes packed into one row (PACK_TOKENS): with a custom 4D mask, which sdpa takes as given
        self.packing, self._cost, self.packed = False, None, PackedCounts()
        # (not with sliding-window layers: the custom mask would replace their window mask, and the
        # load check's few tokens stay inside any real window)
        attn = getattr(self.model.config, "_attn_implementation", None)
        packable = self.prefix_caching and attn in PACKABLE and full_attention_only(self.model)
        if packable:
            self._cost = PackingCost.of(self.model)
        # below float32: shared only where the contract of low_precision.py holds at load
        self.sharing_note: str | None = None  # for "evaluated as"
        if self.prefix_caching and below_float32(self.model):
            self.prefix_caching, self.packing, self.sharing_note = self._low_precision_check(packable)
        elif packable:
            try:
                self.packing = self._packing_works()
            except Exception:  # noqa: BLE001 - a model that refuses position_ids or a 4D mask: keep padded batches
                self.packing = False
        self.packed = PackedCounts()  # the packed rows evaluations run (not the load check's)
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
            for batch, pack in group_batches(members, seqs, prefix_len, self.batch_size, self._cost if self.packing else None):
                hidden, first = self._suffix_hidden([seqs[i] for i in batch], [starts[i] for i in batch], prefix_len, cache, pack)
                reads, owners = [], []
                for r, i in enumerate(batch):
                    for j in users[seqs[i]]:
                        cont = requests[j][2]
                        reads.append((r, len(seqs[i]) - prefix_len - first - len(cont), cont))
                        owners.append(j)
                for j, answer in zip(owners, self._read(hidden, reads, self._shared_softmax)):
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
            with torch.no_grad(), self._autocast(), head_inputs(self.model) as seen:
                kw = {"logits_to_keep": width - first} if self.keeps_positions else {}
                self.model(ids.to(self.device), use_cache=False, **kw)
            for req_str, answer in zip(strs, self._read(seen[0], [(r, p - first, c) for r, p, c in reads], self.softmax_dtype)):
                res.append(answer)
                if req_str is not None:
                    self.cache_hook.add_partial("loglikelihood", req_str, answer)
        return re_ord.get_original(res)

    @property
    def _shared_softmax(self) -> torch.dtype:
        """The shared path's log-softmax dtype: float32 at least (below float32 the log-probs and
        their sums are not rounded to the model's dtype, as stock's are; low_precision.py)."""
        return self.softmax_dtype or torch.float32

    def _read(self, hidden: torch.Tensor, reads: list[tuple[int, int, list[int]]], dtype: torch.dtype | None) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, greedy) per read (row of hidden, offset of the first position
        read, continuation tokens), as stock computes them, the log-softmax in `dtype` (None: the
        logits'); the LM head runs once per distinct position. Greedy is decided as stock decides it,
        on log-probs in stock's dtype: below float32 stock's rounding ties close tokens, and argmax
        then takes the first (measured: 2 of 34 greedy flags differed when decided in float32)."""
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
        stock_dtype = self.softmax_dtype or self.mixed_precision_dtype or hidden.dtype  # that of stock's log_softmax
        with torch.no_grad(), self._autocast():
            for a, logp in head_logprobs(self.model, hidden[at[:, 0], at[:, 1]], dtype=dtype):
                # summed on the model's device, as stock sums: CUDA adds in another order than the CPU (1 ulp)
                vals = torch.empty(len(pos), dtype=logp.dtype, device=logp.device) if vals is None else vals
                greedy[a : a + len(logp)] = logp.to(stock_dtype).argmax(-1).cpu()
                sel = (pos >= a) & (pos < a + len(logp))
                vals[sel.to(logp.device)] = logp[(pos[sel] - a).to(logp.device), tok[sel].to(logp.device)]
        return [(float(vals[a:b].sum()), bool((greedy[pos[a:b]] == tok[a:b]).all())) for a, b in spans]

    def _prefix_cache(self, prefix: tuple):
        with torch.no_grad(), self._autocast():
            out = self.model(torch.tensor([prefix], device=self.device), use_cache=True, logits_to_keep=1)
        return out.past_key_values

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
        with torch.no_grad(), self._autocast(), head_inputs(self.model) as seen:
            self.model(
                ids.to(self.device),
                past_key_values=past,
                use_cache=past is not None,
                logits_to_keep=torch.arange(first, width, device=self.device),
            )
        return seen[0], first

    def _packed_hidden(self, suffixes: list[tuple], first: int, prefix_len: int, cache) -> tuple[torch.Tensor, int]:
        """`_suffix_hidden` with the suffixes run as one row after the prefix, each distinct token once
        (`SuffixTrie`): a node at its own position (prefix_len + its index in its suffix), attending
        the prefix and the nodes before it on its suffix; laid out as the padded batch's would be.
        Counted into `packed`."""
        trie = SuffixTrie.of(suffixes)
        self.packed.add(trie)
        mask = torch.cat([torch.ones(trie.nodes, prefix_len, dtype=torch.bool), trie.attends()], 1)[None, None]
        keep = (trie.depth >= first).nonzero().flatten()  # the positions read: from the earliest start on
        unpacks = getattr(self.model.config, "_attn_implementation", None) in UNPACKS
        with torch.no_grad(), self._autocast(), head_inputs(self.model) as seen:
            self.model(
                trie.tokens[None].to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=(trie.depth + prefix_len)[None].to(self.device),
                past_key_values=copy.deepcopy(cache),
                use_cache=True,
                logits_to_keep=keep.to(self.device),
                **({PACKED_SUFFIXES: trie} if unpacks else {}),
            )
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

    def _shared_logliks(self, seqs: list[tuple], conts: list[list[int]], prefix_len: int, pack: bool) -> list[tuple[float, bool]]:
        """What `_loglikelihood_tokens` returns for these inputs run as one group after prefix_len tokens."""
        cache = self._prefix_cache(seqs[0][:prefix_len])
        starts = [len(s) - len(c) for s, c in zip(seqs, conts)]
        hidden, first = self._suffix_hidden(seqs, starts, prefix_len, cache, pack)
        reads = [(r, len(s) - prefix_len - first - len(c), c) for r, (s, c) in enumerate(zip(seqs, conts))]
        return self._read(hidden, reads, self._shared_softmax)

    def _low_precision_check(self, packable: bool) -> tuple[bool, bool, str]:
        """(share, pack, note): whether this model's shared-prefix scores meet low_precision.py's
        contract against stock at batch size 1, padded and packed, on the check's requests."""
        name = LOW_PRECISION[self.model.dtype]
        prefix_len = max(self.min_shared, 48)
        seqs, conts = check_requests(self.model, prefix_len)
        want = stock_bs1(self.model, seqs, conts, self.softmax_dtype)
        tokens = [len(c) for c in conts]
        padded = Agreement.of(self._shared_logliks(seqs, conts, prefix_len, pack=False), want, tokens, self.model.dtype)
        if not padded.holds:
            return False, False, f"stock batches ({name} shared prefixes missed the tolerance at load: {padded.describe()})"
        packing = False
        if packable:
            try:
                packing = Agreement.of(self._shared_logliks(seqs, conts, prefix_len, pack=True), want, tokens, self.model.dtype).holds
            except Exception:  # noqa: BLE001 - a model that refuses position_ids or a 4D mask: keep padded batches
                packing = False
        how = "packed and padded" if packing else "padded"
        return True, packing, f"shared prefixes in {name} ({how}; within tolerance of stock at batch size 1, checked at load)"
