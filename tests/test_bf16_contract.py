"""Shared prefixes in bfloat16: the contract of backends/low_precision.py against stock lm-eval HFLM
at batch size 1 on the same model in the same dtype (log-likelihoods within the tolerance, the
same greedy flags, the same generated text), and prefix sharing really on (counted, not inferred
from float differences)."""

from __future__ import annotations

import pytest
import torch
from helpers import FIXED_TEXT
from lm_eval.api.instance import Instance
from test_prefix_cache import _Count

from pipeline.backends.low_precision import tolerance
from pipeline.backends.prefix_cache import PrefixCachingHFLM

pytestmark = pytest.mark.slow  # stock HFLM one request at a time, twice over a few hundred requests

BATCH = 4


@pytest.fixture(scope="module")
def bf16(tiny_model):
    """Stock HFLM at batch size 1 and ours at batch size 4, each on its own bfloat16 copy of the model."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype="bfloat16").eval()

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.set_grad_enabled(False)
    stock = HFLM(pretrained=load(), tokenizer=tok, batch_size=1, device="cpu", max_length=1024)
    ours = PrefixCachingHFLM(pretrained=load(), tokenizer=tok, batch_size=BATCH, device="cpu", max_length=1024)
    assert ours.model.dtype == torch.bfloat16
    stock_batched = HFLM(pretrained=stock.model, tokenizer=tok, batch_size=BATCH, device="cpu", max_length=1024)
    return stock, ours, stock_batched


def _mmlu_like(n_subjects=2, n_questions=6) -> list[Instance]:
    """5-shot multiple choice: one preamble per subject, four one-token answers per question."""
    reqs = []
    for s in range(n_subjects):
        choices = "A. sort\nB. copy\nC. key\nD. none\nAnswer:"
        shots = "".join(f"Question {k}: what does step {k} of {s} do?\n{choices} {'ABCD'[k % 4]}\n\n" for k in range(5))
        preamble = f"The following are questions about subject {s}.\n\n{FIXED_TEXT}\n\n{shots}"
        for q in range(n_questions):
            ctx = f"{preamble}Question: how is item {q} ordered in {s}?\nA. up\nB. down\nC. stable\nD. random\nAnswer:"
            reqs += [Instance("loglikelihood", {}, (ctx, f" {letter}"), idx=len(reqs)) for letter in "ABCD"]
    return reqs


def _truthfulqa_like(n_questions=6) -> list[Instance]:
    """A six-question preamble, then each question with several multi-token answers."""
    preamble = "".join(f"Q: what does flag {k} do?\nA: {FIXED_TEXT[20 * k : 20 * k + 60]}\n\n" for k in range(6))
    answers = (" it sorts the list in place", " it returns a new list", " nothing at all", " the reverse flag orders it descending")
    reqs = []
    for q in range(n_questions):
        ctx = f"{preamble}Q: what happens to key {q} when the list is sorted?\nA:"
        reqs += [Instance("loglikelihood", {}, (ctx, a), idx=len(reqs)) for a in answers]
    return reqs


def _greedy_items(stock, contexts: list[str]) -> list[Instance]:
    """Continuations the model itself would generate (stock at batch size 1), whole and halved, so
    that greedy flags are tested where they are true."""
    gen = {"until": ["\n\n\n\n"], "max_gen_toks": 6, "do_sample": False}
    outs = stock.generate_until([Instance("generate_until", {}, (c, gen), idx=i) for i, c in enumerate(contexts)])
    pairs = [(c, o) for c, o in zip(contexts, outs) if o] + [(c, o[: len(o) // 2]) for c, o in zip(contexts, outs) if len(o) > 3]
    return [Instance("loglikelihood", {}, pair, idx=i) for i, pair in enumerate(pairs)]


def _assert_within_contract(ours, got, want, reqs):
    tokens = [len(ours.tok_encode(r.args[1], add_special_tokens=False)) for r in reqs]
    excess = [abs(g - w) / tolerance(w, n, torch.bfloat16) for (g, _), (w, _), n in zip(got, want, tokens)]
    assert max(excess) <= 1, max(excess)
    assert [g for _, g in got] == [w for _, w in want]


def test_bf16_shared_prefixes_meet_the_contract_against_stock_at_batch_size_1(bf16):
    stock, ours, stock_batched = bf16
    assert ours.prefix_caching and ours.sharing_note.startswith("shared prefixes in bfloat16")
    mmlu, tqa = _mmlu_like(), _truthfulqa_like()
    contexts = list(dict.fromkeys(r.args[0] for r in mmlu + tqa))
    greedy = _greedy_items(stock, contexts)
    for reqs in (mmlu, tqa, greedy):
        _assert_within_contract(ours, ours.loglikelihood(reqs), stock.loglikelihood(reqs), reqs)
    assert sum(g for _, g in stock.loglikelihood(greedy)) >= len(contexts)  # greedy flags tested where true

    # greedy generation: stock's generate in stock's batches, so stock's tokens at the same batch size
    # (bfloat16 batches move stock's own generations against batch size 1: docs/backends.md)
    gen = {"until": ["\n\n"], "max_gen_toks": 32, "do_sample": False}
    prompts = [Instance("generate_until", {}, (f"{FIXED_TEXT[: 30 + 17 * i]}", gen), idx=i) for i in range(2 * BATCH)]
    got = ours.generate_until(prompts)
    assert got == stock_batched.generate_until(prompts) and all(got)


def test_bf16_rows_share_prefixes_and_pack_suffixes(bf16):
    """Counted: the preamble runs once per subject (far fewer positions through the model than
    stock's), and suffixes run as packed rows of trie nodes."""
    stock, ours, _ = bf16
    assert ours.packing  # the load check passed packed as well as padded
    reqs = _mmlu_like() + _truthfulqa_like()
    before = ours.packed.since(type(ours.packed)())
    with _Count(ours.model.model) as ran, _Count(stock.model.model) as stock_ran:
        ours.loglikelihood(reqs)
        stock.loglikelihood(reqs)
    counted = ours.packed.since(before)
    assert counted.rows > 0 and counted.nodes < counted.suffix_tokens
    assert ran.positions < 0.3 * stock_ran.positions


def test_a_bf16_model_that_misses_the_tolerance_keeps_stock_batches(tiny_model, monkeypatch):
    """The load check is what decides: with no tolerance at all the shared path misses it (its
    float32 log-softmax alone differs from stock's bfloat16 one), so the model keeps stock batches,
    says why, and scores as stock HFLM at its batch size, bit for bit."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.backends import low_precision

    monkeypatch.setattr(low_precision, "TOLERANCE_EPS", 0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    kw = dict(tokenizer=tok, batch_size=BATCH, device="cpu", max_length=1024)
    ours = PrefixCachingHFLM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_model, dtype="bfloat16").eval(), **kw)
    assert not ours.prefix_caching and not ours.packing
    assert ours.sharing_note.startswith("stock batches (bfloat16 shared prefixes missed the tolerance at load")
    stock = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_model, dtype="bfloat16").eval(), **kw)
    reqs = _truthfulqa_like(2)
    assert ours.loglikelihood(reqs) == stock.loglikelihood(reqs)


def test_bf16_row_loads_sharing_and_says_so(tiny_model):
    """Through the backend: a bfloat16 row's "evaluated as" line says it shares prefixes."""
    from pipeline.backends import load as load_for_eval
    from pipeline.types import Artifact

    loaded = load_for_eval(Artifact(tiny_model, "hf", key="b"), "bfloat16", batch_size=BATCH, max_length=256)
    assert loaded.lm.prefix_caching and loaded.lm.model.dtype == torch.bfloat16
    assert "shared prefixes in bfloat16 (packed and padded; within tolerance of stock at batch size 1" in loaded.evaluated_as
