"""TurboQuant: the paper's distortion figures, unbiased QJL inner products, and the KV-cache modes."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FIXED_TEXT, mean_kl, token_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.backends.hf import apply_runtime_patches
from pipeline.recipe import parse_recipe
from pipeline.stages._turboquant import KVConfig, apply_kv_cache, lloyd_max_codebook, quantize_mse, quantize_prod
from pipeline.stages.base import Artifact
from pipeline.stages.registry import get_stage


def unit_vectors(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


# Written here, not read from the code under test. The MSE of the optimal (Lloyd-Max) scalar quantizer
# of a unit Gaussian, J. Max, "Quantizing for minimum distortion", IRE Trans. Inf. Theory 6(1), 1960,
# Table I (1 bit: the closed form 1 - 2/pi): a random rotation makes a unit vector's coordinates about
# N(0, 1/d), so the total distortion over d coordinates is about these numbers.
MAX_1960_MSE = {1: 1 - 2 / math.pi, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_matches_paper(bits):
    x = unit_vectors(20_000, 128, seed=bits)
    mse = float(((x - quantize_mse(x, bits, seed=3)) ** 2).sum(-1).mean())
    # TurboQuant (Zandieh et al., arXiv:2504.19874), Theorem 1: D_mse <= sqrt(3) pi / 2 * 4^-b
    assert mse <= math.sqrt(3) * math.pi / 2 * 4.0**-bits
    # the paper's Theorem 1 also reports ~0.36, 0.117, 0.03, 0.009 (rounded), Max's table above; we measure
    # 0.361, 0.116, 0.034, 0.0093 (the coordinates of a 128-dim unit vector are slightly lighter-tailed than a Gaussian)
    assert mse == pytest.approx(MAX_1960_MSE[bits], rel=0.05)


def test_codebook_is_symmetric_and_near_gaussian_lloyd_max():
    cb = lloyd_max_codebook(128, 1)
    # 1-bit Lloyd-Max for N(0, 1/d): +-sqrt(2/(pi d))
    assert cb.tolist() == pytest.approx([-math.sqrt(2 / (math.pi * 128)), math.sqrt(2 / (math.pi * 128))], rel=0.01)
    cb3 = lloyd_max_codebook(64, 3)
    assert torch.allclose(cb3, -cb3.flip(0), atol=1e-4)


def test_qjl_inner_products_are_unbiased_and_mse_shrinks_them():
    x, y = unit_vectors(40_000, 128, 1), unit_vectors(40_000, 128, 2)
    true = (x * y).sum(-1)
    for bits in (2, 3):
        est = (quantize_prod(x, bits, seed=5) * y).sum(-1)
        err = est - true
        assert abs(float(err.mean())) < 3 * float(err.std()) / math.sqrt(len(err))  # mean error ~ 0
        slope = float((est * true).sum() / (true * true).sum())
        assert slope == pytest.approx(1.0, abs=0.03)
    mse_est = (quantize_mse(x, 1, seed=5) * y).sum(-1)
    shrink = float((mse_est * true).sum() / (true * true).sum())
    assert shrink == pytest.approx(2 / math.pi, abs=0.03)  # the 1-bit MSE quantizer's known bias


def _patched(model_dir, **cfg):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_kv_cache(model, KVConfig(**cfg).__dict__)
    return model


def test_stress_mode_moves_loglikelihoods_engine_mode_does_not(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = token_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model), tok)
    stress = token_logprobs(_patched(tiny_model, key_bits=2, value_bits=2, skip_layers=[], mode="stress"), tok)
    engine = token_logprobs(_patched(tiny_model, key_bits=2, value_bits=2, skip_layers=[], mode="engine"), tok)
    assert mean_kl(base, stress) > 1e-4
    assert torch.allclose(base, engine, atol=1e-5)  # a single prefill attends to exact K/V
    # skipping every layer is the identity
    skipped = token_logprobs(_patched(tiny_model, key_bits=2, value_bits=2, skip_layers=[0, 1], mode="stress"), tok)
    assert torch.equal(base, skipped)


def test_engine_mode_moves_decoding(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok(FIXED_TEXT, return_tensors="pt").input_ids
    kw = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model).generate(ids, **kw)
    eng = _patched(tiny_model, key_bits=2, value_bits=2, skip_layers=[], mode="engine").generate(ids, **kw)
    assert torch.allclose(ref.scores[0], eng.scores[0], atol=1e-4)  # first token: exact prefill (float rounding only)
    assert any(not torch.allclose(a, b) for a, b in zip(ref.scores[1:], eng.scores[1:]))  # then the cache is quantized


@pytest.mark.slow  # runs the turboquant stage
def test_kv_stage_composes_after_a_weight_stage_and_reports_bits(tiny_model, tmp_path):
    r = parse_recipe(
        {
            "name": "t",
            "model": {"id": "a/b"},
            "variants": {
                "gptq+tq": [{"stage": "gptq"}, {"stage": "turboquant", "preset": "turboquant_k3v4_nc", "skip_layers": []}],
                "tq-weights": [{"stage": "turboquant", "target": "weights", "bits": 4}],
            },
        }
    )
    tq = r.stages("gptq+tq")[1]
    assert tq.output_format("compressed-tensors") == "compressed-tensors"
    with pytest.raises(Exception, match="takes hf input"):
        parse_recipe(
            {
                "name": "t",
                "model": {"id": "a/b"},
                "variants": {"bad": [{"stage": "gptq"}, {"stage": "turboquant", "target": "weights"}]},
            }
        )
    out = tq.run(Artifact(tiny_model, "hf", key="k", bits=None), tmp_path, None)
    assert "KV k3v4" in out.bits and out.meta["kv_bits_per_element"] == pytest.approx((3 + 16 / 64 + 4 + 32 / 64) / 2)
    model = AutoModelForCausalLM.from_pretrained(out.path)
    notes = apply_runtime_patches(model, out.meta)
    assert "TurboQuant KV k3/v4" in notes[0]


@pytest.mark.slow  # runs the turboquant stage
def test_weight_mode_reloads_close_to_base(tiny_model, tmp_path):
    cls = get_stage("turboquant")
    out = cls(cls.Params(target="weights", bits=4, block_size=128)).run(Artifact(tiny_model, "hf", key="k"), tmp_path, None)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = token_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model), tok)
    kl4 = mean_kl(base, token_logprobs(AutoModelForCausalLM.from_pretrained(out.path), tok))
    out2 = cls(cls.Params(target="weights", bits=2, block_size=128)).run(Artifact(tiny_model, "hf", key="k"), tmp_path / "b2", None)
    kl2 = mean_kl(base, token_logprobs(AutoModelForCausalLM.from_pretrained(out2.path), tok))
    assert 0 < kl4 < 0.04 and kl2 > 2 * kl4, (kl4, kl2)
    assert (tmp_path / "turboquant.json").is_file() and "4.12 bpw" in out.bits


def test_patched_forward_keeps_its_signature_so_generate_computes_last_position_logits_only(tiny_model):
    """generate asks for logits_to_keep=1 only when forward's signature lists it: without it, the
    prompt's [batch, length, vocab] logits were built at every prefill."""
    import inspect

    model = _patched(tiny_model, key_bits=3, value_bits=4)
    assert "logits_to_keep" in inspect.signature(model.forward).parameters
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok([FIXED_TEXT, FIXED_TEXT[:100]], return_tensors="pt", padding=True, padding_side="left")
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[:-1].numel()))
    model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    hook.remove()
    assert rows == [2] * 5  # one position per row, prompt included
