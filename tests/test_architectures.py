"""Each architecture family through the transformers evaluation paths, against stock lm-eval HFLM.

Tiny random models from real configs: Llama-3 (llama3 RoPE scaling; its 128k vocabulary in the memory test), Qwen2 (QKV
bias, tied embeddings), Gemma-3 text (interleaved sliding/global layers, head_dim 256,
query_pre_attn_scalar, final logit softcapping), Mistral (sliding window), Phi-3 (fused qkv and
gate_up). Sliding windows are 16 tokens and requests run past 100, so windows matter.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import FIXED_TEXT
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from pipeline import divergence as dv
from pipeline.backends.base import LoadedModel
from pipeline.backends.hf import TransformersBackend
from pipeline.backends.prefix_cache import PrefixCachingHFLM
from pipeline.errors import QuantpipeError
from pipeline.memory import peak_memory_bytes
from pipeline.stages._turboquant import KVConfig, apply_kv_cache

WINDOW = 16
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)


def config(family: str, vocab: int = 1024, window: int = WINDOW, **sizes):
    """`sizes` overrides SMALL's widths (tests/test_architecture_stages.py needs multiples of 256)."""
    small = {**SMALL, **sizes}
    if family == "llama3":
        return LlamaConfig(
            **small,
            vocab_size=vocab,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "qwen2":  # q/k/v projections carry biases
        return Qwen2Config(**small, vocab_size=vocab, tie_word_embeddings=True)
    if family == "gemma3":
        return Gemma3TextConfig(
            **{**small, "num_attention_heads": 2, "num_key_value_heads": 1},
            vocab_size=vocab,
            head_dim=256,
            query_pre_attn_scalar=48,
            sliding_window=window,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=30.0,
        )
    if family == "mistral":
        return MistralConfig(**small, vocab_size=vocab, sliding_window=window)
    if family == "phi3":  # qkv_proj and gate_up_proj are fused
        return Phi3Config(**small, vocab_size=vocab)
    raise ValueError(family)


FAMILIES = ["llama3", "qwen2", "gemma3", "mistral", "phi3"]
# Stock HFLM (lm-eval's evaluator) against ours, per family: 4-30 s each, out of the `-m "not slow"` loop.
EVALUATES = pytest.mark.slow
LLAMA3_VOCAB = 128256


def build(family: str, vocab: int = 1024, **kw):
    """Vocabularies are small (the tokenizer has 512 ids) except where memory is the point."""
    torch.manual_seed(0)
    cfg = config(family, vocab=vocab, **kw)
    cfg.initializer_range = 0.06  # peaked outputs: greedy generation is not decided by rounding
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # ids past the tokenizer's 512 get zero logits: present, never generated
        model.get_output_embeddings().weight[512:] = 0
    return model


@pytest.fixture(scope="module")
def tok(tiny_model):
    torch.set_grad_enabled(False)
    return AutoTokenizer.from_pretrained(tiny_model)


def patched(model, **kv):
    """A copy of the model with the TurboQuant KV patch (the patch binds the model it wraps, so a
    patched model is not deep-copied)."""
    model = copy.deepcopy(model)
    apply_kv_cache(model, KVConfig(**kv).__dict__)
    return model


def lms(model, tok, kv: dict | None = None, **ours_kw):
    """Stock HFLM and ours, each on its own copy of the model (ours switches its attention)."""
    kw = dict(tokenizer=tok, batch_size=3, device="cpu", max_length=256)
    copies = [patched(model, **kv) if kv is not None else copy.deepcopy(model) for _ in range(2)]
    return HFLM(pretrained=copies[0], **kw), PrefixCachingHFLM(pretrained=copies[1], **kw, **ours_kw)


def loglikelihood_requests():
    """A shared preamble far longer than a window, several questions and answers each, a request
    sharing nothing, and one left-truncated to max_length."""
    reqs = []
    for q in range(3):
        ctx = f"{FIXED_TEXT}\n\nQ: what does sort do with key number {q}?\nA:"
        for answer in (" it sorts", " it returns a new list in ascending order", " nothing"):
            reqs.append(Instance("loglikelihood", {}, (ctx, answer), idx=len(reqs)))
    reqs.append(Instance("loglikelihood", {}, ("Unrelated", " text"), idx=len(reqs)))
    reqs.append(Instance("loglikelihood", {}, (FIXED_TEXT * 8, " end of the text"), idx=len(reqs)))
    return reqs


def generation_requests(n=3, max_gen_toks=40):
    gen = {"until": ["\n\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (FIXED_TEXT[: 60 + 70 * i], gen), idx=i) for i in range(n)]


def assert_close(got, want):
    assert len(got) == len(want)
    for (lp, greedy), (lp0, greedy0) in zip(got, want):
        assert lp == pytest.approx(lp0, abs=1e-4) and greedy == greedy0


@EVALUATES
@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihoods_match_stock_hflm(family, tok):
    """Prefix-cached: stock's values up to summation order; stock batches (FP8-dynamic rows): bit for bit."""
    model = build(family)
    stock, ours = lms(model, tok, min_shared=8)
    batched = PrefixCachingHFLM(
        pretrained=copy.deepcopy(model), tokenizer=tok, batch_size=3, device="cpu", max_length=256, share_prefixes=False
    )
    reqs = loglikelihood_requests()
    want = stock.loglikelihood(reqs)
    assert_close(ours.loglikelihood(reqs), want)
    assert batched.loglikelihood(reqs) == want


@EVALUATES
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_matches_stock_hflm(family, tok):
    stock, ours = lms(build(family), tok)
    reqs = generation_requests()
    got, want = ours.generate_until(reqs), stock.generate_until(reqs)
    assert got == want and all(got)


@EVALUATES
@pytest.mark.parametrize("family", FAMILIES)
def test_turboquant_kv_rows_match_stock_hflm_on_the_patched_model(family, tok):
    """TurboQuant rows run PrefixCachingHFLM(share_prefixes=False): stock HFLM's log-likelihoods bit
    for bit and its generations, on the same patched model; and the patch does change them."""
    plain = build(family)
    stock, ours = lms(plain, tok, kv=dict(key_bits=2, value_bits=2, skip_layers=[]), share_prefixes=False)
    reqs = loglikelihood_requests()
    want = stock.loglikelihood(reqs)
    assert ours.loglikelihood(reqs) == want
    unpatched = HFLM(pretrained=plain, tokenizer=tok, batch_size=3, device="cpu", max_length=256).loglikelihood(reqs)
    assert max(abs(a[0] - b[0]) for a, b in zip(want, unpatched)) > 1e-3
    gen = generation_requests(n=2, max_gen_toks=24)
    assert ours.generate_until(gen) == stock.generate_until(gen)


@EVALUATES
@pytest.mark.parametrize("family", FAMILIES)
def test_kl_reference_chunks_are_the_model_logits(family, tok):
    """The KL reference's chunked log-probs are the float64 log-softmax of the model's own logits
    (softcapping included), and a model compared with itself has zero KL."""
    lm = PrefixCachingHFLM(pretrained=build(family), tokenizer=tok, batch_size=1, device="cpu", max_length=256)
    loaded = LoadedModel(lm=lm, evaluated_as="test", engine="transformers", backend=TransformersBackend())
    texts = {"docs": dv.corpus(None)["docs"][:1500]}
    w = dv.windows(tok, texts["docs"])[0]
    whole = torch.log_softmax(lm.model(torch.tensor([w])).logits[0, :-1].float().to(torch.float64), dim=-1).numpy()
    assert np.array_equal(np.concatenate(list(dv.sequence_logprobs(loaded, w))), whole)
    out = dv.compare(loaded, dv.base_reference(loaded, tok, texts))["docs"]
    assert out["mean_kl"] == pytest.approx(0, abs=1e-9) and out["top1_agreement"] == 1.0


@EVALUATES
@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_layers_see_only_their_window(family, tok):
    """Requests far longer than the 16-token window: through the prefix cache (a 100-token shared
    prefix, of which a sliding layer's cache keeps 15), the appending generation cache, and the
    TurboQuant cache, the answers are stock HFLM's; the same weights without a window differ."""
    model = build(family)
    reqs, gen = loglikelihood_requests(), generation_requests()
    stock, ours = lms(model, tok, min_shared=8)
    want = stock.loglikelihood(reqs)
    assert_close(ours.loglikelihood(reqs), want)
    assert ours.generate_until(gen) == stock.generate_until(gen)

    wide = build(family, window=4096)
    wide.load_state_dict(model.state_dict())
    no_window = HFLM(pretrained=wide, tokenizer=tok, batch_size=3, device="cpu", max_length=256).loglikelihood(reqs)
    assert max(abs(a[0] - b[0]) for a, b in zip(want, no_window)) > 1e-3  # the window is in effect

    # the TurboQuant cache with every layer skipped stores exact K/V: it must give stock's unpatched values
    tq = PrefixCachingHFLM(
        pretrained=patched(model, skip_layers=[0, 1]), tokenizer=tok, batch_size=3, device="cpu", max_length=256, share_prefixes=False
    )
    assert tq.loglikelihood(reqs) == want
    assert tq.generate_until(gen) == stock.generate_until(gen)


@pytest.mark.slow  # a 128k-vocabulary model through stock HFLM and ours: GB of logits
def test_logits_memory_is_bounded_at_a_128k_vocabulary(tok):
    """Llama-3's 128,256-token vocabulary, batch 4, 250-token inputs whose last 100 tokens are read
    (a rolling window): stock HFLM's peak grows by its [batch, length, vocab] logits and their
    log-softmax (1 GB); ours by about one 64 MiB chunk of each, with the same answers."""
    model = build("llama3", vocab=LLAMA3_VOCAB)
    vocab = model.config.vocab_size
    kw = dict(tokenizer=tok, batch_size=4, device="cpu", max_length=256)
    text = FIXED_TEXT * 6
    reqs = [Instance("loglikelihood", {}, (text[i * 7 : i * 7 + 700], text[700 + i : 1000 + i]), idx=i) for i in range(4)]
    stock = HFLM(pretrained=copy.deepcopy(model), **kw)
    with peak_memory_bytes() as stock_mem:
        want = stock.loglikelihood(reqs)
    assert all(len(stock.tok_encode(r.args[0] + r.args[1])) > 257 for r in reqs)  # every input is max_length wide
    assert stock_mem.grown_bytes > 0.9 * 2 * 4 * 256 * vocab * 4
    for ours in (
        PrefixCachingHFLM(pretrained=copy.deepcopy(model), **kw, share_prefixes=False),
        PrefixCachingHFLM(pretrained=copy.deepcopy(model), **kw),
    ):
        with peak_memory_bytes() as mem:
            got = ours.loglikelihood(reqs)
        assert_close(got, want)
        assert mem.grown_bytes < 300 << 20, mem  # two 64 MiB chunks (logits, log-softmax) and activations
    loaded = LoadedModel(lm=ours, evaluated_as="test", engine="transformers", backend=TransformersBackend())
    w = list(range(1, 257))
    with peak_memory_bytes() as mem:
        for _ in dv.sequence_logprobs(loaded, w):
            pass
    # a chunk is 32 rows of float32 logits, their float64 copy and log-softmax (84 MB) and the consumer holds
    # the previous one; the whole window's would be 255 rows of each (650 MB)
    assert mem.grown_bytes < 250 << 20, mem


class DoubledLogitsLlama(LlamaForCausalLM):
    """A forward that transforms the LM head's output in a way quantpipe does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_an_unknown_transform_of_the_lm_head_output_is_refused_before_any_work(tok):
    torch.manual_seed(0)
    model = DoubledLogitsLlama(config("llama3", vocab=1024)).eval()
    with pytest.raises(QuantpipeError, match="DoubledLogitsLlama: its forward transforms the LM head's output"):
        PrefixCachingHFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu", max_length=64)


def test_turboquant_kv_is_refused_for_recurrent_layers():
    from transformers import Lfm2Config

    cfg = Lfm2Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention"],
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(QuantpipeError, match="TurboQuant KV cache: lfm2 has conv layers"):
        apply_kv_cache(model, KVConfig().__dict__)


@pytest.mark.slow  # runs the turboquant stage
@pytest.mark.parametrize("stage,params", [("turboquant", {"preset": "turboquant_k3v4_nc"})])
def test_loaded_rows_with_stock_batches_score_as_stock_hflm(stage, params, tiny_model, tok, tmp_path):
    """load_for_eval gives TurboQuant KV rows PrefixCachingHFLM without prefix sharing; their
    log-likelihoods are stock HFLM's on the same checkpoint and patch, bit for bit. (FP8-dynamic
    rows share prefixes, batch-invariantly: tests/test_batch_invariant.py.)"""
    from pipeline.backends import load as load_for_eval
    from pipeline.backends.hf import apply_runtime_patches
    from pipeline.stages.base import Artifact, StageContext
    from pipeline.stages.registry import get_stage

    cls = get_stage(stage)
    out = cls(cls.Params.model_validate(params)).run(Artifact(tiny_model, "hf", key="b"), tmp_path, StageContext(lambda: [], 64, 0))
    loaded = load_for_eval(out, "float32", batch_size=3, max_length=256)
    assert isinstance(loaded.lm, PrefixCachingHFLM) and not loaded.lm.prefix_caching
    model = AutoModelForCausalLM.from_pretrained(out.path, dtype="float32" if out.format == "hf" else "auto").eval()
    apply_runtime_patches(model, out.meta)
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu", max_length=256)
    reqs = loglikelihood_requests()
    assert loaded.lm.loglikelihood(reqs) == stock.loglikelihood(reqs)


@pytest.mark.parametrize("name", ["CohereConfig", "GraniteConfig"])
def test_logit_scaling_architectures_pass_the_head_check(name):
    """Cohere multiplies the head's output by logit_scale, Granite divides by logits_scaling: the
    bounded head reproduces both exactly."""
    import transformers

    from pipeline.backends.lm_head import check_head, hf_next_token_logprobs

    extra = {"logit_scale": 0.3} if name == "CohereConfig" else {"logits_scaling": 7.0}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, name)(**SMALL, vocab_size=1024, **extra)).eval()
    check_head(model)
    ids = list(range(5, 60))
    want = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    assert torch.equal(torch.cat(list(hf_next_token_logprobs(model, ids, chunk=16))), want)
