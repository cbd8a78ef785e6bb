"""Shared-prefix KV reuse: same log-likelihoods as stock HFLM, fewer tokens through the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.backends.lm_head import head_rows
from pipeline.backends.prefix_cache import PrefixCachingHFLM
from pipeline.backends.prefix_groups import SuffixTrie, plan_groups


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=12), st.integers(0, 11)), min_size=1, max_size=30),
    st.integers(1, 4),
)
def test_groups_partition_requests_and_prefixes_are_shared_and_before_every_start(items, min_shared):
    seqs = [tuple(s) for s, _ in items]
    starts = [min(k, len(s) - 1) for s, k in zip(seqs, (k for _, k in items))]
    groups = plan_groups(seqs, starts, min_shared)
    members = sorted(i for _, m in groups for i in m)
    assert members == list(range(len(seqs)))
    for p, m in groups:
        assert p == 0 or (len(m) > 1 and p >= min_shared)
        for i in m:
            assert p <= starts[i] < len(seqs[i])
            assert seqs[i][:p] == seqs[m[0]][:p]


def test_sequences_with_a_long_common_prefix_share_one_group():
    shared = tuple(range(100))
    seqs = [shared + (7, 8, 9), shared + (5,), (1, 2, 3), shared + (6, 6)]
    groups = plan_groups(seqs, [len(s) - 1 for s in seqs], min_shared=32)
    assert sorted((p, sorted(m)) for p, m in groups) == [(0, [2]), (100, [0, 1, 3])]


def test_suffix_trie_runs_each_shared_token_once_and_each_node_attends_its_own_suffix():
    trie = SuffixTrie.of([(1, 2, 3), (1, 2, 4, 5), (1, 6), (7,)])
    assert trie.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert trie.depth.tolist() == [0, 1, 2, 2, 3, 1, 0]
    assert trie.paths.tolist() == [[0, 1, 2, -1], [0, 1, 3, 4], [0, 5, -1, -1], [6, -1, -1, -1]]
    assert trie.fresh.tolist() == [3, 2, 1, 1]  # the nodes each suffix reaches first: its last ones
    att = trie.attends()
    assert [att[i].nonzero().flatten().tolist() for i in range(7)] == [[0], [0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 3, 4], [0, 5], [6]]


@pytest.fixture(scope="module")
def tiny_lms(tiny_model):
    """Stock HFLM and ours, each on its own copy of the model (ours switches its attention)."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.set_grad_enabled(False)
    stock = HFLM(pretrained=load(), tokenizer=tok, batch_size=3, device="cpu", max_length=512)
    ours = PrefixCachingHFLM(pretrained=load(), tokenizer=tok, batch_size=3, device="cpu", max_length=512, min_shared=8)
    assert stock.model.config._attn_implementation == "sdpa" and ours.model.config._attn_implementation == "sdpa_gqa"
    return stock, ours, ours.model


def _requests(n_items=5):
    """Few-shot style: one long shared preamble, several questions, several answers each."""
    from helpers import FIXED_TEXT
    from lm_eval.api.instance import Instance

    reqs = []
    for q in range(n_items):
        ctx = f"{FIXED_TEXT}\n\nQ: what does sort do with key number {q}?\nA:"
        for answer in (" it sorts", " it returns a new list", " nothing", " the reverse flag"):
            reqs.append(Instance("loglikelihood", {}, (ctx, answer), idx=len(reqs)))
    # a request sharing nothing, and one whose context is longer than max_length (left-truncated)
    reqs.append(Instance("loglikelihood", {}, ("Unrelated", " text"), idx=len(reqs)))
    reqs.append(Instance("loglikelihood", {}, (FIXED_TEXT * 12, " end"), idx=len(reqs)))
    return reqs


class _Count:
    """Counts the positions a module is applied to (token ids, or hidden states [..., hidden]), its
    calls, and the most positions in one call. An LM head that returned no logits (its input was
    only recorded, see lm_head.head_inputs) is not counted."""

    def __init__(self, module):
        self.positions = self.calls = self.widest = 0
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input_ids"]
        if isinstance(output, torch.Tensor) and output.shape[-1] == 0:
            return
        n = x.numel() if x.dtype == torch.long else x[..., 0].numel()
        self.positions += n
        self.widest = max(self.widest, n)
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _assert_same_answers(got, want):
    assert len(got) == len(want)
    for (lp, greedy), (lp0, greedy0) in zip(got, want):
        assert lp == pytest.approx(lp0, abs=1e-4)
        assert greedy == greedy0


def test_loglikelihoods_match_stock_hflm_with_fewer_tokens_run(tiny_lms):
    stock, ours, model = tiny_lms
    reqs = _requests()
    with _Count(model.model) as ours_tokens, _Count(stock.model.model) as stock_tokens:
        got = ours.loglikelihood(reqs)
        want = stock.loglikelihood(reqs)
    _assert_same_answers(got, want)
    # the shared preamble ran once, not once per question and answer
    assert ours_tokens.positions < 0.5 * stock_tokens.positions


@pytest.mark.slow  # a real lm-eval evaluation of several batches: over 10 s on 2 cores
def test_packed_suffixes_read_what_padded_batches_read_from_fewer_positions(tiny_lms, monkeypatch):
    from pipeline.backends import prefix_groups

    stock, ours, model = tiny_lms
    assert ours.packing  # the load-time check passed for this llama
    reqs = _requests()
    # suffixes of very different lengths: padding would run every row to the longest
    reqs += [type(reqs[0])("loglikelihood", {}, (reqs[0].args[0] + " x" * n, " y"), idx=len(reqs) + n) for n in (1, 30)]
    want = stock.loglikelihood(reqs)
    rows, run_packed = [], PrefixCachingHFLM._packed_hidden

    def packed_hidden(self, suffixes, *args):
        with _Count(model.model) as ran:
            out = run_packed(self, suffixes, *args)
        rows.append((sum(map(len, suffixes)), SuffixTrie.of(suffixes).nodes, ran.positions))
        return out

    monkeypatch.setattr(PrefixCachingHFLM, "_packed_hidden", packed_hidden)
    before = dataclasses.replace(ours.packed)
    with _Count(model.model) as packed:
        got = ours.loglikelihood(reqs)
    # a packed row runs each distinct token once: the answers share their question's tokens
    assert rows and all(ran == nodes for _, nodes, ran in rows)
    assert any(nodes < tokens for tokens, nodes, _ in rows)
    # the scorer counts the packed rows it ran: the ones the model ran, with their tokens
    counted = ours.packed.since(before)
    assert counted.rows == len(rows) and counted.nodes == sum(ran for _, _, ran in rows) < counted.suffix_tokens
    assert counted.suffix_tokens == sum(tokens for tokens, _, _ in rows)
    monkeypatch.setattr(prefix_groups, "PACK_TOKENS", 0)  # never pays: padded batches
    after = dataclasses.replace(ours.packed)
    with _Count(model.model) as padded:
        unpacked = ours.loglikelihood(reqs)
    assert ours.packed == after  # no packed row ran
    _assert_same_answers(got, want)
    _assert_same_answers(unpacked, want)
    assert packed.positions < padded.positions


def test_stock_batching_rows_read_the_same_logprobs_with_the_lm_head_only_where_read(tiny_model, tiny_lms, monkeypatch):
    """share_prefixes=False (rows with run-time activation rounding, runtime KV patches) keeps
    stock's batches and inputs exactly, and its answers bit for bit; only the LM head is applied
    to fewer positions, a bounded number at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.backends import lm_head

    stock = tiny_lms[0]
    monkeypatch.setattr(lm_head, "LOGITS_CHUNK_BYTES", 4 * 512 * 20)  # 20 rows of logits at a time
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()
    ours = PrefixCachingHFLM(
        pretrained=model,
        tokenizer=AutoTokenizer.from_pretrained(tiny_model),
        batch_size=3,
        device="cpu",
        max_length=512,
        share_prefixes=False,
    )
    reqs = _requests()
    with (
        _Count(model.model) as body,
        _Count(model.lm_head) as head,
        _Count(stock.model.model) as stock_body,
        _Count(stock.model.lm_head) as stock_head,
    ):
        got = ours.loglikelihood(reqs)
        want = stock.loglikelihood(reqs)
    assert got == want
    assert body.positions == stock_body.positions and body.calls == stock_body.calls  # same batches
    assert head.positions < 0.5 * stock_head.positions
    assert head.widest == head_rows(model.config.vocab_size) == 20 and stock_head.widest > 1000


def test_rolling_loglikelihood_matches_stock(tiny_lms):
    from helpers import FIXED_TEXT
    from lm_eval.api.instance import Instance

    stock, ours, _ = tiny_lms
    reqs = [Instance("loglikelihood_rolling", {}, (FIXED_TEXT * 3,), idx=0)]
    assert ours.loglikelihood_rolling(reqs)[0] == pytest.approx(stock.loglikelihood_rolling(reqs)[0], abs=1e-3)


@pytest.mark.slow  # a real lm-eval evaluation of several batches: over 10 s on 2 cores
def test_generation_is_token_for_token_stock_and_the_cache_appends_in_place(tiny_lms):
    """Greedy generate_until with the appending KV cache gives exactly stock HFLM's text, for a
    batch of prompts of different lengths (left padding) run past the cache's first capacity."""
    from helpers import FIXED_TEXT
    from lm_eval.api.instance import Instance

    from pipeline.backends.generation_cache import append_cache

    stock, ours, model = tiny_lms
    gen = {"until": ["\n\n\n"], "max_gen_toks": 300, "do_sample": False}
    reqs = [Instance("generate_until", {}, (FIXED_TEXT[: 40 + 25 * i], gen), idx=i) for i in range(5)]
    with _Count(model.lm_head) as head:
        got = ours.generate_until(reqs)
    want = stock.generate_until(reqs)
    assert got == want and all(len(g) > 0 for g in got)
    assert head.widest <= 3  # generate's logits_to_keep=1: one position per row (batch 3), prompts included

    import torch

    cache = append_cache()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model(ids[:, :4], past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    capacity = layer._buf[0].shape[-2]
    model(ids[:, 4:], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 6 and layer._buf[0].shape[-2] == capacity  # appended, not reallocated
    assert layer.keys.data_ptr() == layer._buf[0].data_ptr()


@pytest.mark.slow  # a real lm-eval evaluation of several batches: over 10 s on 2 cores
def test_generation_stops_once_every_row_text_is_settled(tiny_lms):
    """Rows that end on different stop strings: stock runs the batch to the token cap (no single
    stop string is in every row); ours stops when each row's cut is final, with the same texts."""
    from helpers import FIXED_TEXT
    from lm_eval.api.instance import Instance

    stock, ours, model = tiny_lms
    prompts = [FIXED_TEXT[: 60 + 30 * i] for i in range(3)]
    probe = stock.generate_until(
        [Instance("generate_until", {}, (p, {"until": ["\x00"], "max_gen_toks": 60}), idx=i) for i, p in enumerate(prompts)]
    )
    # one stop string per row, from its own text at different depths and absent from the others
    stops = []
    for i, text in enumerate(probe):
        others = [t for j, t in enumerate(probe) if j != i]
        stops.append(next(text[k : k + 3] for k in range(8 + 6 * i, len(text) - 3) if not any(text[k : k + 3] in o for o in others)))
    gen = {"until": stops, "max_gen_toks": 60, "do_sample": False}
    reqs = [Instance("generate_until", {}, (p, gen), idx=i) for i, p in enumerate(prompts)]
    with _Count(model.model) as ours_steps, _Count(stock.model.model) as stock_steps:
        got, want = ours.generate_until(reqs), stock.generate_until(reqs)
    assert got == want
    assert all(len(g) < len(t) for g, t in zip(got, probe))  # every row was cut by a stop string
    assert ours_steps.calls < stock_steps.calls


def test_gqa_attention_in_place_is_bit_identical_to_sdpa(tiny_model):
    """sdpa_gqa reads shared key/value heads in place: exactly stock SDPA's outputs, with a
    left-padding mask, with a cached prefix, and when decoding one token."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.backends.attention import use_sdpa_gqa

    stock, ours = (AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval() for _ in range(2))
    use_sdpa_gqa(ours)
    assert ours.config._attn_implementation == "sdpa_gqa"
    torch.manual_seed(0)
    ids = torch.randint(5, 500, (3, 70))
    mask = torch.ones_like(ids)
    mask[1:, :9] = 0
    assert torch.equal(stock(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)
    caches = [m(ids[:1, :50], use_cache=True).past_key_values for m in (stock, ours)]
    for c in caches:
        c.batch_repeat_interleave(3)
    a, b = (m(ids[:, 50:], past_key_values=c, use_cache=True).logits for m, c in zip((stock, ours), caches))
    assert torch.equal(a, b)
    a, b = (m(ids[:, :1], past_key_values=c, use_cache=True).logits for m, c in zip((stock, ours), caches))
    assert torch.equal(a, b)


def test_checkpoints_that_quantize_activations_at_run_time_are_recognised_from_their_config(tmp_path):
    """FP8-dynamic activations round to 8 bits at run time: a different summation order can move a
    value across a rounding boundary, so the backend must recognise those checkpoints (here: from
    config.json's quantization groups) to evaluate them batch-invariantly. That their scores then
    equal stock lm-eval's at batch size 1 is tests/test_batch_invariant.py's
    test_loaded_fp8_row_shares_prefixes_and_scores_exactly_as_stock_at_batch_size_1."""
    import json

    from pipeline.backends.hf import _dynamic_activations

    def cfg(groups):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"config_groups": groups}}))
        return _dynamic_activations(tmp_path)

    assert cfg({"g": {"weights": {"num_bits": 8}, "input_activations": {"dynamic": True, "strategy": "token"}}})
    assert not cfg({"g": {"weights": {"num_bits": 4}, "input_activations": None}})
    (tmp_path / "config.json").write_text("{}")
    assert not _dynamic_activations(tmp_path)


def test_peak_memory_reports_the_block_peak_and_nests():
    import numpy as np

    from pipeline.memory import peak_memory_bytes

    with peak_memory_bytes() as outer:
        a = np.ones(60_000_000 // 8)
        a += 1  # touch every page
        del a
        with peak_memory_bytes() as inner:
            b = np.ones(20_000_000 // 8)
            del b
    assert 55e6 < outer.grown_bytes < 70e6  # the inner block's reset did not erase the outer's peak
    assert 18e6 < inner.grown_bytes < 30e6


@pytest.mark.slow  # a real lm-eval evaluation of several batches: over 10 s on 2 cores
def test_auto_batch_size_is_measured_and_the_evaluation_stays_within_the_budget(tiny_model):
    """A budget below one sequence is refused; a larger budget gives a larger batch; an evaluation
    at the chosen batch, every request max_length long with every position read (the most a
    log-likelihood batch holds), peaks within the budget."""
    from helpers import FIXED_TEXT
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.backends.auto_batch import auto_batch_size
    from pipeline.errors import QuantpipeError
    from pipeline.memory import peak_memory_bytes, resident_bytes

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(QuantpipeError, match="over the memory budget"):
        auto_batch_size(model, tok, 2048, budget_bytes=resident_bytes())
    base = resident_bytes()
    small, large = (auto_batch_size(model, tok, 2048, base + (mib << 20)) for mib in (250, 400))
    assert 1 <= small < large < 64
    lm = PrefixCachingHFLM(
        pretrained=model,
        tokenizer=tok,
        batch_size="auto",
        device="cpu",
        max_length=2048,
        memory_budget=base + (400 << 20),
        share_prefixes=False,
    )  # stock batches: rows run together
    assert lm.batch_size >= 2
    text = FIXED_TEXT * 60
    reqs = [Instance("loglikelihood_rolling", {}, (text[i:],), idx=i) for i in range(lm.batch_size)]
    with peak_memory_bytes() as m:
        lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert m.bytes <= base + (400 << 20), (m, lm.batch_size)
