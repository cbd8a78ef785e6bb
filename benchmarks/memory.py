"""Peak resident memory of each evaluation path as quantpipe loads it, against stock lm-eval.

    .venv/bin/python benchmarks/memory.py --length 128                  # 32k, 128k and 256k vocabularies
    .venv/bin/python benchmarks/memory.py --vocab 32000 --length 128 --paths gguf-q8_0/quantpipe

A tiny random Llama (hidden 256, 4 layers, untied embeddings) per vocabulary size, saved once, and
from it a real FP8_DYNAMIC checkpoint (the `fp8` stage) and a real Q8_0 GGUF (the `gguf` stage;
llama.cpp's converter pads the 512-token tokenizer's vocabulary with [PAD] entries). Each
(vocabulary, path) is measured in a fresh process, so peaks do not mix: load the model and build
the evaluator, warm it up on one short request, then read the peak resident set over the
evaluation alone (pipeline.memory.peak_memory_bytes).

Workloads, batch 8, every input `--length` tokens (distinct texts, nothing shared):
- base, fp8-dynamic, turboquant, gguf-q8_0: 16 log-likelihood requests with 4-token continuations.
  quantpipe: the artifact through `pipeline.backends.load` (base and FP8-dynamic: transformers,
  FP8 with batch-invariant kernels and prefix sharing; GGUF: llama.cpp, one request at a time);
  TurboQuant: the base model with the turboquant_k3v4_nc KV patch, stock batches. stock: lm-eval's
  HFLM on the same model (FP8: loaded as transformers loads compressed-tensors); for GGUF, where
  lm-eval has no in-process model, llama-cpp-python as it gives log-probs (logits_all=True,
  `Llama.scores` [n_ctx, vocab], a float64 log-softmax of the rows read): quantpipe's path before.
- generate: 8 prompts, 32 new tokens, stock HFLM against quantpipe (base model);
- kl: the KL reference's log-probs of 4 windows of 256 tokens, the whole-window float64
  log-softmax that divergence.py computed before against its chunks now (base model).
The model's weights as loaded (GGUF: llama.cpp's tensor bytes, memory-mapped), the resident set
before the evaluation (Python, torch, lm-eval, the weights, after the warm-up) and the peak are
reported; "growth" is the peak above that resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BATCH = 8
PATHS = [
    "base/stock-hflm",
    "base/quantpipe",
    "fp8-dynamic/stock-hflm",
    "fp8-dynamic/quantpipe",
    "turboquant/stock-hflm",
    "turboquant/quantpipe",
    "gguf-q8_0/stock-llama-cpp",
    "gguf-q8_0/quantpipe",
    "generate/stock-hflm",
    "generate/quantpipe",
    "kl/whole-window",
    "kl/quantpipe-chunked",
]


def build(path: Path, vocab: int) -> None:
    import torch
    from conftest import build_tiny_model
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_model(path)  # the trained 512-token tokenizer (ids past it are never inputs, only logits)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    from pipeline.stages.base import Artifact, StageContext
    from pipeline.stages.registry import get_stage

    fp8, gguf = get_stage("fp8"), get_stage("gguf")
    (path / "fp8").mkdir()
    fp8(fp8.Params.model_validate({"scheme": "FP8_DYNAMIC"})).run(
        Artifact(path, "hf", key="b"), path / "fp8", StageContext(lambda: [], 64, 0)
    )
    (path / "gguf").mkdir()
    gguf(gguf.Params(type="Q8_0", pre_tokenizer="gpt-2")).run(Artifact(path, "hf", key="b"), path / "gguf", None)


def all_logits_lm(gguf_dir: Path, tokenizer, n_ctx: int):
    """llama-cpp-python as it gives log-probs, which is how quantpipe's llama.cpp backend ran
    before: logits_all=True (Llama.scores, [n_ctx, vocab] float32, filled for every evaluated token),
    the shared prefix's KV cells kept, a float64 log-softmax of the rows read."""
    import llama_cpp
    import numpy as np
    from lm_eval.api.model import TemplateLM

    from pipeline.backends.llamacpp import LlamaCppLM, _log_softmax

    class AllLogitsLM(LlamaCppLM):
        def __init__(self):
            TemplateLM.__init__(self)
            threads = os.cpu_count() or 1
            kw = dict(n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
            self.llm = llama_cpp.Llama(model_path=str(gguf_dir / "model.gguf"), logits_all=True, **kw)
            self.tokenizer, self.add_bos_token, self._max_length = tokenizer, None, n_ctx

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            out = []
            for _, ctx, cont in sorted(requests, key=lambda r: r[1] + r[2]):
                inp = (ctx + cont)[-(self._max_length + 1) :][:-1]
                cached, n = self.llm.input_ids[: self.llm.n_tokens], 0
                while n < min(len(cached), len(inp)) and cached[n] == inp[n]:
                    n += 1
                self.llm.n_tokens = n  # Llama.eval drops the KV cells from n on
                if n < len(inp):
                    self.llm.eval(inp[n:])
                rows = _log_softmax(self.llm.scores[len(inp) - len(cont) : len(inp)])
                out.append((float(rows[np.arange(len(cont)), cont].sum()), bool((rows.argmax(-1) == np.array(cont)).all())))
            return out

    return AllLogitsLM()


def texts(n: int) -> list[str]:
    from pipeline.calibration import _python_docs

    docs = [d for d in _python_docs() if len(d) > 200]
    return ["\n\n".join(docs[i::n]) for i in range(n)]


def child(path_name: str, model_dir: Path, length: int) -> dict:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import divergence as dv
    from pipeline.backends import load
    from pipeline.backends.hf import LoadedModel, TransformersBackend, tensor_bytes
    from pipeline.backends.prefix_cache import PrefixCachingHFLM
    from pipeline.memory import peak_memory_bytes
    from pipeline.stages._turboquant import PRESETS, apply_kv_cache, kv_config_dict
    from pipeline.types import Artifact

    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    family, how = path_name.split("/")
    kw = dict(tokenizer=tok, batch_size=BATCH, device="cpu", max_length=length)
    if family == "gguf-q8_0":
        if how == "quantpipe":
            loaded = load(Artifact(model_dir / "gguf", "gguf", key=""), "float32", BATCH, max_length=length)
            lm, weights = loaded.lm, loaded.weights_bytes
        else:
            import llama_cpp

            lm = all_logits_lm(model_dir / "gguf", tok, length)
            weights = int(llama_cpp.llama_model_size(lm.llm.model))
    elif how == "quantpipe" and family in ("base", "fp8-dynamic"):
        art = Artifact(model_dir / "fp8", "compressed-tensors", key="") if family == "fp8-dynamic" else Artifact(model_dir, "hf", key="")
        loaded = load(art, "float32", BATCH, max_length=length)
        lm, weights = loaded.lm, loaded.weights_bytes
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir / "fp8" if family == "fp8-dynamic" else model_dir, dtype="auto").eval()
        if family == "turboquant":
            apply_kv_cache(model, kv_config_dict(PRESETS["turboquant_k3v4_nc"]))
        if how in ("stock-hflm", "whole-window"):
            lm = HFLM(pretrained=model, **kw)
        else:  # generation and the KL reference on the base model, TurboQuant's stock batches
            lm = PrefixCachingHFLM(pretrained=model, **kw, share_prefixes=family != "turboquant")
        weights = None
    prompts = [tok.decode(tok(t).input_ids[: length - 8]) for t in texts(16)]
    if family == "generate":
        gen = {"until": ["\n\n\n\n"], "max_gen_toks": 32, "do_sample": False}
        reqs = [Instance("generate_until", {}, (p, gen), idx=i) for i, p in enumerate(prompts[:BATCH])]
        run = lambda: lm.generate_until(reqs, disable_tqdm=True)  # noqa: E731
    elif family == "kl":
        wins = [tok(t).input_ids[:256] for t in texts(4)]
        loaded = LoadedModel(lm=lm, evaluated_as="", engine="transformers", backend=TransformersBackend())
        if how == "whole-window":  # divergence.sequence_logprobs before chunking

            def run():
                for w in wins:
                    torch.log_softmax(lm.model(torch.tensor([w])).logits[0, :-1].double(), -1)  # the window's [n, vocab] float64
        else:

            def run():
                for w in wins:
                    for _ in dv.sequence_logprobs(loaded, w):
                        pass
    else:
        reqs = [Instance("loglikelihood", {}, (p, " the value"), idx=i) for i, p in enumerate(prompts)]
        run = lambda: lm.loglikelihood(reqs, disable_tqdm=True)  # noqa: E731

    # one-time allocations (thread pools, the first forward's buffers, mapped weights) before the measurement
    lm.loglikelihood([Instance("loglikelihood", {}, ("def f(x):", " return x"), idx=0)], disable_tqdm=True)
    if weights is None:
        weights = tensor_bytes(lm.model)  # after the first forward: compressed-tensors decompresses there
    t0 = time.perf_counter()
    with peak_memory_bytes() as m:
        run()
    return {"weights": weights, "resident": m.start_bytes, "peak": m.bytes, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 262144])
    ap.add_argument("--length", type=int, default=256, help="tokens per input (stock: batch x length x vocab logits)")
    ap.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], Path(args.child[1]), args.length)))
        return
    mib = 2**20
    print(f"batch {BATCH}, {args.length}-token inputs; MiB; growth = peak - resident before the evaluation\n")
    print("| vocab | path | weights | resident before | peak | growth | peak / weights | seconds |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab:
            model_dir = Path(tmp) / f"llama-{vocab}"
            build(model_dir, vocab)
            for name in args.paths:
                env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
                out = subprocess.run(
                    [sys.executable, __file__, "--length", str(args.length), "--child", name, str(model_dir)],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"| {vocab} | {name} | failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]} |")
                    continue
                r = json.loads(line[7:])
                print(
                    f"| {vocab:,} | {name} | {r['weights'] / mib:.0f} | {r['resident'] / mib:.0f} | {r['peak'] / mib:.0f} "
                    f"| {(r['peak'] - r['resident']) / mib:.0f} | {r['peak'] / r['weights']:.2f} | {r['seconds']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
