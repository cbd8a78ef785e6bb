"""Peak resident memory of each transformers evaluation path: quantpipe against stock lm-eval HFLM.

    .venv/bin/python benchmarks/memory.py                          # 32k, 128k and 256k vocabularies
    .venv/bin/python benchmarks/memory.py --vocab 32000 --length 128

A tiny random Llama (hidden 256, 4 layers, untied embeddings) per vocabulary size, saved once and
loaded with from_pretrained as an evaluation loads it. Each (vocabulary, path) is measured in a
fresh process, so peaks do not mix: load the model and build the evaluator, then read the peak
resident set over the evaluation alone (pipeline.memory.peak_memory_bytes).

Workloads, batch 8, every input `--length` tokens (distinct texts, nothing shared):
- loglik: 16 log-likelihood requests with 4-token continuations, as stock HFLM (`lm-eval --model hf`),
  quantpipe with prefix sharing, and quantpipe with stock batches (share_prefixes=False: the path
  of FP8-dynamic rows, measured here on the plain model; the code path is the same);
- turboquant: the same requests on the model with the TurboQuant KV patch (turboquant_k3v4_nc), as
  stock HFLM (how those rows ran before) and as quantpipe runs them now (stock batches);
- generate: 8 prompts, 32 new tokens, stock HFLM against quantpipe;
- kl: the KL reference's log-probs of 4 windows of 256 tokens, the whole-window float64
  log-softmax that divergence.py computed before against its chunks now.
The model's weights, the resident set before the evaluation (Python, torch, lm-eval, the weights,
after one 4-token warm-up forward) and the peak are reported; "growth" is the peak above that
resident set.
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
    "loglik/stock-hflm",
    "loglik/quantpipe-prefix-cached",
    "loglik/quantpipe-stock-batches",
    "turboquant/stock-hflm",
    "turboquant/quantpipe",
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
    from pipeline.backends.hf import LoadedModel
    from pipeline.backends.prefix_cache import PrefixCachingHFLM
    from pipeline.memory import peak_memory_bytes
    from pipeline.stages._turboquant import PRESETS, apply_kv_cache, kv_config_dict

    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    family, how = path_name.split("/")
    if family == "turboquant":
        apply_kv_cache(model, kv_config_dict(PRESETS["turboquant_k3v4_nc"]))
    kw = dict(pretrained=model, tokenizer=tok, batch_size=BATCH, device="cpu", max_length=length)
    lm = HFLM(**kw) if how == "stock-hflm" else PrefixCachingHFLM(**kw, share_prefixes=how == "quantpipe-prefix-cached")
    prompts = [tok.decode(tok(t).input_ids[: length - 8]) for t in texts(16)]
    if family in ("loglik", "turboquant"):
        reqs = [Instance("loglikelihood", {}, (p, " the value"), idx=i) for i, p in enumerate(prompts)]
        run = lambda: lm.loglikelihood(reqs, disable_tqdm=True)  # noqa: E731
    elif family == "generate":
        gen = {"until": ["\n\n\n\n"], "max_gen_toks": 32, "do_sample": False}
        reqs = [Instance("generate_until", {}, (p, gen), idx=i) for i, p in enumerate(prompts[:BATCH])]
        run = lambda: lm.generate_until(reqs, disable_tqdm=True)  # noqa: E731
    else:
        wins = [tok(t).input_ids[:256] for t in texts(4)]
        loaded = LoadedModel(lm=lm, evaluated_as="", engine="transformers")
        if how == "whole-window":  # divergence.sequence_logprobs before chunking

            def run():
                for w in wins:
                    dv._log_softmax(model(torch.tensor([w])).logits[0, :-1].float())
        else:

            def run():
                for w in wins:
                    for _ in dv.sequence_logprobs(loaded, w):
                        pass

    model(torch.tensor([[1, 2, 3, 4]]), use_cache=False)  # one-time allocations (thread pools) before the measurement
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
