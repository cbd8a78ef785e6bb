"""Shared-prefix KV reuse: same log-likelihoods as stock HFLM, fewer tokens through the model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.backends.prefix_cache import PrefixCachingHFLM, plan_groups


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=12), st.integers(0, 11)),
                min_size=1, max_size=30), st.integers(1, 4))
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


@pytest.fixture(scope="module")
def tiny_lms(tiny_model):
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.set_grad_enabled(False)
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu", max_length=512)
    ours = PrefixCachingHFLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu", max_length=512, min_shared=8)
    return stock, ours, model


def _requests(n_items=5):
    """Few-shot style: one long shared preamble, several questions, several answers each."""
    from lm_eval.api.instance import Instance

    from helpers import FIXED_TEXT

    reqs = []
    for q in range(n_items):
        ctx = f"{FIXED_TEXT}\n\nQ: what does sort do with key number {q}?\nA:"
        for answer in (" it sorts", " it returns a new list", " nothing", " the reverse flag"):
            reqs.append(Instance("loglikelihood", {}, (ctx, answer), idx=len(reqs)))
    # a request sharing nothing, and one whose context is longer than max_length (left-truncated)
    reqs.append(Instance("loglikelihood", {}, ("Unrelated", " text"), idx=len(reqs)))
    reqs.append(Instance("loglikelihood", {}, (FIXED_TEXT * 12, " end"), idx=len(reqs)))
    return reqs


def _count_tokens(model):
    seen = []
    original = model.forward

    def forward(input_ids=None, **kw):
        seen.append(input_ids.numel())
        return original(input_ids=input_ids, **kw)
    return seen, original, forward


def test_loglikelihoods_match_stock_hflm_with_fewer_tokens_run(tiny_lms):
    stock, ours, model = tiny_lms
    reqs = _requests()
    seen, original, counting = _count_tokens(model)
    model.forward = counting
    try:
        got = ours.loglikelihood(reqs)
        ours_tokens = sum(seen)
        seen.clear()
        want = stock.loglikelihood(reqs)
        stock_tokens = sum(seen)
    finally:
        model.forward = original
    assert len(got) == len(want) == len(reqs)
    for (lp, greedy), (lp0, greedy0) in zip(got, want):
        assert lp == pytest.approx(lp0, abs=1e-4)
        assert greedy == greedy0
    # the shared preamble ran once, not once per question and answer
    assert ours_tokens < 0.5 * stock_tokens


def test_rolling_loglikelihood_matches_stock(tiny_lms):
    from lm_eval.api.instance import Instance

    from helpers import FIXED_TEXT

    stock, ours, _ = tiny_lms
    reqs = [Instance("loglikelihood_rolling", {}, (FIXED_TEXT * 3,), idx=0)]
    assert ours.loglikelihood_rolling(reqs)[0] == pytest.approx(stock.loglikelihood_rolling(reqs)[0], abs=1e-3)


def test_generation_is_token_for_token_stock_and_the_cache_appends_in_place(tiny_lms):
    """Greedy generate_until with the appending KV cache gives exactly stock HFLM's text, for a
    batch of prompts of different lengths (left padding) run past the cache's first capacity."""
    from lm_eval.api.instance import Instance

    from helpers import FIXED_TEXT
    from pipeline.backends.prefix_cache import append_cache

    stock, ours, model = tiny_lms
    gen = {"until": ["\n\n\n"], "max_gen_toks": 300, "do_sample": False}
    reqs = [Instance("generate_until", {}, (FIXED_TEXT[: 40 + 25 * i], gen), idx=i) for i in range(5)]
    got, want = ours.generate_until(reqs), stock.generate_until(reqs)
    assert got == want and all(len(g) > 0 for g in got)

    import torch

    cache = append_cache()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model(ids[:, :4], past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    capacity = layer._buf[0].shape[-2]
    model(ids[:, 4:], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 6 and layer._buf[0].shape[-2] == capacity  # appended, not reallocated
    assert layer.keys.data_ptr() == layer._buf[0].data_ptr()


def test_rows_with_run_time_activation_quantization_keep_stock_log_likelihoods(tmp_path):
    """FP8-dynamic activations round to 8 bits at run time: a different summation order can move a
    value across a rounding boundary, so those rows are not prefix-shared."""
    import json

    from pipeline.backends.hf import _dynamic_activations

    def cfg(groups):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"config_groups": groups}}))
        return _dynamic_activations(tmp_path)

    assert cfg({"g": {"weights": {"num_bits": 8}, "input_activations": {"dynamic": True, "strategy": "token"}}})
    assert not cfg({"g": {"weights": {"num_bits": 4}, "input_activations": None}})
    (tmp_path / "config.json").write_text("{}")
    assert not _dynamic_activations(tmp_path)
