"""KL / top-1 agreement / perplexity ratio from the stored top-K base reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import divergence as dv
from pipeline.backends import load as load_for_eval
from pipeline.stages.base import Artifact


@pytest.fixture(scope="module")
def base_loaded(tiny_model):
    return load_for_eval(Artifact(tiny_model, "hf", key="b"), "float32", batch_size=1)


TEXTS = {"docs": dv.corpus(None)["docs"][:3000]}


def _full(loaded, ids) -> np.ndarray:
    return np.concatenate(list(dv.sequence_logprobs(loaded, ids)))


def test_chunked_logprobs_are_the_whole_window_log_softmax_bit_for_bit(base_loaded):
    """Chunks of positions through the LM head give exactly the float64 log-softmax of the model's
    own logits for the whole window (what the reference was computed from before chunking)."""
    w = dv.windows(base_loaded.lm.tokenizer, TEXTS["docs"])[0]
    with torch.no_grad():
        whole = torch.log_softmax(base_loaded.lm.model(torch.tensor([w])).logits[0, :-1].float().to(torch.float64), dim=-1).numpy()
    chunks = list(dv.sequence_logprobs(base_loaded, w))
    assert len(chunks) == -(-(len(w) - 1) // dv.ROWS) and max(len(c) for c in chunks) == dv.ROWS
    assert np.array_equal(np.concatenate(chunks), whole)


@pytest.mark.slow  # the KL evaluator over the docs text, reference and comparison (9-20 s each here)
def test_identical_model_gives_zero_kl_full_agreement(base_loaded, tmp_path):
    ref = dv.base_reference(base_loaded, base_loaded.lm.tokenizer, TEXTS)
    dv.save_reference(ref, tmp_path / "ref.npz")
    out = dv.compare(base_loaded, dv.load_reference(tmp_path / "ref.npz"))["docs"]
    assert out["tokens"] > 100
    assert out["mean_kl"] == pytest.approx(0, abs=1e-6) and out["top1_agreement"] == 1.0
    assert out["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [64, 511])
def test_topk_kl_is_a_lower_bound_and_exact_with_the_full_vocab(top_k, base_loaded, tiny_model, monkeypatch):
    monkeypatch.setattr(dv, "TOP_K", top_k)
    ref = dv.base_reference(base_loaded, base_loaded.lm.tokenizer, TEXTS)
    other = load_for_eval(Artifact(tiny_model, "hf", key="b"), "float32", batch_size=1)
    with torch.no_grad():  # perturb the weights like a coarse quantizer would
        g = torch.Generator().manual_seed(0)
        for p in other.lm.model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    approx = dv.compare(other, ref)["docs"]
    exact, nll_diff = [], []
    for w in ref["docs"]["windows"]:
        p, q = _full(base_loaded, w), _full(other, w)
        exact.append((np.exp(p) * (p - q)).sum(-1))
        nll_diff.append(p[np.arange(len(w) - 1), w[1:]] - q[np.arange(len(w) - 1), w[1:]])
    exact = float(np.concatenate(exact).mean())
    assert approx["ppl_ratio"] == pytest.approx(float(np.exp(np.concatenate(nll_diff).mean())), rel=1e-5)
    assert 0 < approx["mean_kl"] <= exact + 1e-9  # coarse-graining never increases KL
    if top_k == 511:  # 511 named tokens + the 1-token rest bucket = the full distribution
        assert approx["mean_kl"] == pytest.approx(exact, rel=1e-4)
    assert approx["top1_agreement"] < 1.0
