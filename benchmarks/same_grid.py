"""The same-grid effect: a base dequantized from a GGUF type, re-quantized to that type and to others.

    .venv/bin/python benchmarks/same_grid.py --out DIR [--model qwen2.5-coder-0.5b] [--types Q4_K_M Q4_0 Q5_K_M Q8_0]

A built-in base (here Qwen2.5-Coder-0.5B-Instruct) is the official Q4_K_M GGUF dequantized to FP32,
so every weight already lies on the Q4_K_M grid. Re-quantizing it to Q4_K_M can then find the same
scales and give back nearly the same weights: the row looks almost lossless for that reason alone,
not because Q4_K_M is that good. This script measures it, with the GGUF stage's own steps (llama.cpp's
converter to F16, then llama.cpp's quantizer to each type):

- weights: for each type, the re-quantized tensors (dequantized by gguf-py) against the base's (the
  source GGUF dequantized, which is what the base checkpoint holds): the relative RMS error over
  all tensors and the share of weights that come back bit-identical;
- outputs: mean KL(base || variant) per token over the full vocabulary and top-1 agreement, on the KL
  texts the table uses (standard-library docstrings, GSM8K/TruthfulQA questions when --data-dir is
  given), base logits from transformers in FP32 as for the table's base row, variant logits from
  llama.cpp as for a GGUF row. The source file itself is a row too: llama.cpp against transformers on
  the very same weights, the floor of what any row can show.

On an ordinary base, Q4_K_M's error sits between Q4_0's and Q5_K_M's; a Q4_K_M row far below Q5_K_M
is the same-grid effect. Prints a Markdown table and writes DIR/same_grid.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def dequantized_tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf
    from gguf.quants import dequantize

    return {t.name: dequantize(t.data, t.tensor_type).astype(np.float32, copy=False) for t in gguf.GGUFReader(path).tensors}


def weight_error(base: dict[str, np.ndarray], path: Path) -> dict:
    import gguf
    from gguf.quants import dequantize

    err2 = ref2 = same = n = 0.0
    for t in gguf.GGUFReader(path).tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        b = base[t.name].reshape(w.shape)
        err2 += float(np.square(w.astype(np.float64) - b).sum())
        ref2 += float(np.square(b.astype(np.float64)).sum())
        same += float((w == b).sum())
        n += w.size
    return {"relative_rms_error": (err2 / ref2) ** 0.5, "identical_share": same / n}


def quantize(f16: Path, out: Path, type_name: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize to {type_name} failed")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="a built-in backed by a GGUF")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q4_0", "Q5_K_M", "Q8_0"])
    ap.add_argument("--data-dir", type=Path, default=None, help="adds the benchmark questions to the KL texts")
    ap.add_argument("--tokens", type=int, default=1024, help="KL tokens (256-token windows)")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.backends.llamacpp import LlamaCppLM, _log_softmax
    from pipeline.divergence import corpus, windows
    from pipeline.gguf_base import gguf_file_type
    from pipeline.models import builtin_gguf, fetch_builtin
    from pipeline.stages._llamacpp_tools import convert

    a.out.mkdir(parents=True, exist_ok=True)
    base_dir, source = fetch_builtin(a.model), builtin_gguf(a.model)
    source_type = gguf_file_type(source)
    tok = AutoTokenizer.from_pretrained(base_dir)
    texts = corpus(a.data_dir)
    wins = [w for t in texts.values() for w in windows(tok, t)]
    wins = wins[: max(1, a.tokens // len(wins[0]))]
    print(f"{a.model}: base dequantized from {source_type}; KL on {sum(map(len, wins))} tokens in {len(wins)} windows", file=sys.stderr)

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = [model(torch.tensor([w])).logits[0].double().log_softmax(-1).numpy() for w in wins]
    del model
    print(f"base logits (transformers FP32): {time.time() - t0:.0f} s", file=sys.stderr)

    base_w = dequantized_tensors(source)
    f16 = a.out / "base-f16.gguf"
    if not f16.is_file():
        convert(base_dir, f16, "f16", None)  # as the GGUF stage does (its default base_type)
    rows = {f"source {source_type} (the base's own file)": source, "F16 (converter output)": f16}
    for t in a.types:
        path = a.out / f"{t}.gguf"
        if not path.is_file():
            quantize(f16, path, t)
        rows[t + (" (same grid as the source)" if t == source_type else "")] = path

    results = []
    for name, path in rows.items():
        t0 = time.time()
        lm = LlamaCppLM(path, tok, n_ctx=max(map(len, wins)) + 8)
        kl = agree = count = 0.0
        for w, p in zip(wins, ref):
            q = _log_softmax(lm.logits(w).copy())
            kl += float((np.exp(p) * (p - q)).sum(-1).sum())
            agree += float((p.argmax(-1) == q.argmax(-1)).sum())
            count += len(w)
        del lm
        row = {"row": name, "file": path.name, "bytes": path.stat().st_size, "kl": kl / count, "top1_agreement": agree / count}
        row |= weight_error(base_w, path)
        results.append(row)
        print(f"{name}: KL {row['kl']:.5f}, {time.time() - t0:.0f} s", file=sys.stderr)

    (a.out / "same_grid.json").write_text(json.dumps({"model": a.model, "source_type": source_type, "rows": results}, indent=1))
    print(f"| row ({a.model}, base dequantized from {source_type}) | MiB | KL (nats/token) | top-1 agreement ", end="")
    print("| weight rel. RMS error | weights identical |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['row']} | {r['bytes'] / 2**20:.0f} | {r['kl']:.5f} | {r['top1_agreement']:.3f} "
            f"| {r['relative_rms_error']:.4f} | {100 * r['identical_share']:.1f}% |"
        )


if __name__ == "__main__":
    main()
