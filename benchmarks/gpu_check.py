"""GPU check of quantpipe's transformers evaluation path (run by hand on a CUDA machine).

    python3 benchmarks/gpu_check.py --out DIR          # from the repo root; cuda if available, else cpu
    .venv/bin/python benchmarks/gpu_check.py --build-fp8-asset .gpuassets/fp8-tiny   # once, where llmcompressor is

What it checks, on tiny random models built from configs (nothing is downloaded; HF_HUB_OFFLINE=1):

a. bounded-memory: a Llama with a 262,144-token vocabulary (hidden 64, 2 layers) and a WordLevel
   tokenizer, loaded through `TransformersBackend().load` as evaluation loads a base row; 64
   log-likelihood requests (16 contexts of ~200 tokens sharing a preamble, 4 continuations each,
   one of them the model's greedy token, two sharing their first two words) scored by quantpipe's
   LM (prefix sharing, trie-packed suffixes, bounded LM head) and by stock lm-eval `HFLM` on the
   same model and device. Reports the peak memory of each (pipeline.memory.peak_memory_bytes:
   torch's max allocated on CUDA, the resident set on CPU), the largest |log-likelihood
   difference|, whether is_greedy agrees everywhere, and the packed rows run (there must be some,
   sharing trie nodes).
b. batch-invariant-fp8: a tiny FP8_DYNAMIC compressed-tensors checkpoint (made by the project's own
   `fp8` stage, llm-compressor, with --build-fp8-asset; default location .gpuassets/fp8-tiny, an
   ignored folder to carry along) loaded with `TransformersBackend().load` (batch_invariant.install,
   prefix sharing); each request's (log-likelihood, greedy) in batches must equal, bit for bit,
   stock HFLM's at batch size 1 on the same model. Also reported, for information: how many
   requests stock compressed-tensors (not batch-invariant) changes between batch size 1 and a batch.

Models load through TransformersBackend.load with the run's placement (placement.Target: on CUDA
device_map auto, in the dtype the check names), exactly as evaluation loads a row.

One line per check (PASS / FAIL / SKIP / ERROR) and a JSON summary in DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would push the result lines out of a short log tail

DEFAULT_ASSET = ROOT / ".gpuassets" / "fp8-tiny"
GiB = 2**30


def word_tokenizer(n: int):
    """An offline WordLevel tokenizer over the words w2..w{n-1} (ids = the number), split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, n)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>", pad_token="<eos>")


def tiny_llama(path: Path, vocab: int, hidden: int, intermediate: int, heads: int, kv_heads: int, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=0.04,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)  # float32
    word_tokenizer(vocab).save_pretrained(path)
    return path


def words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(2, vocab)}" for _ in range(n))


@contextlib.contextmanager
def backend_on(device: str):
    """TransformersBackend loading through evaluation's own path onto `device` (placement.Target:
    device_map auto on CUDA), as `quantpipe run` loads a row there."""
    from pipeline.backends.hf import TransformersBackend
    from pipeline.placement import Target

    target = Target("cuda" if device.startswith("cuda") else "cpu")

    class Placed:
        def load(self, *args, **kwargs):
            return TransformersBackend().load(*args, target=target, **kwargs)

    yield Placed()


def instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, pair, idx=i) for i, pair in enumerate(pairs)]


def compare(got, want) -> dict:
    return {
        "max_abs_diff": max(abs(g[0] - w[0]) for g, w in zip(got, want)),
        "greedy_agree": sum(g[1] == w[1] for g, w in zip(got, want)),
        "identical": sum(g == w for g, w in zip(got, want)),
        "n": len(want),
        "greedy_true": sum(bool(w[1]) for w in want),
    }


@contextlib.contextmanager
def packed_rows(lm):
    """The packed suffix rows quantpipe's scorer `lm` runs inside the block (its PackedCounts), into
    the dict it yields on exit: rows, suffixes, trie nodes run and the suffix tokens they stand for."""
    before = dataclasses.replace(lm.packed)
    counts: dict = {}
    try:
        yield counts
    finally:
        counts.update({f"packed_{k}": n for k, n in dataclasses.asdict(lm.packed.since(before)).items()})


# -- a. bounded memory with a 262k vocabulary ------------------------------------------------------


def check_bounded_memory(device: str, tmp: Path, args) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM

    from pipeline.memory import peak_memory_bytes
    from pipeline.types import Artifact

    vocab = 262144
    path = tiny_llama(tmp / "llama-262k", vocab, hidden=64, intermediate=128, heads=4, kv_heads=2)
    with backend_on(device) as backend:
        loaded = backend.load(Artifact(path, "hf", key="base"), "float32", args.batch_size, 2048)
    lm, model, tok = loaded.lm, loaded.lm.model, loaded.lm.tokenizer

    rng = random.Random(0)
    preamble = words(rng, 120, vocab)
    pairs = []
    for _ in range(16):
        ctx = f"{preamble} {words(rng, 80, vocab)}"
        ids = tok(ctx, add_special_tokens=False).input_ids
        with torch.no_grad():
            greedy = int(model(torch.tensor([ids], device=model.device), logits_to_keep=1).logits[0, -1].argmax())
        lead = words(rng, 2, vocab)  # two answers share their first two words: one trie node each when packed
        pairs += [(ctx, f" w{greedy}"), (ctx, " " + words(rng, 1, vocab)), (ctx, f" {lead}"), (ctx, f" {lead} {words(rng, 2, vocab)}")]
    reqs = instances(pairs)
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=2048)
    warm = instances([(words(rng, 40, vocab), " w7")])

    result = {
        "vocab": vocab,
        "requests": len(reqs),
        "batch_size": args.batch_size,
        "evaluated_as": loaded.evaluated_as,
        "prefix_caching": lm.prefix_caching,
        "model_device": str(model.device),
    }
    scores, t0 = {}, time.time()
    for name, which in (("quantpipe", lm), ("stock", stock)):
        which.loglikelihood(warm, disable_tqdm=True)  # allocator, kernels, workspaces: outside the measured block
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        t = time.time()
        with peak_memory_bytes(device) as m, packed_rows(lm) as packed:
            scores[name] = which.loglikelihood(reqs, disable_tqdm=True)
        if which is lm:
            result |= packed
        result[name] = {
            "peak_bytes": m.bytes,
            "start_bytes": m.start_bytes,
            "grown_bytes": m.grown_bytes,
            "seconds": round(time.time() - t, 2),
        }
    result |= compare(scores["quantpipe"], scores["stock"])
    result["seconds"] = round(time.time() - t0, 1)
    q, s = result["quantpipe"]["grown_bytes"], result["stock"]["grown_bytes"]
    ok = q < s and result["max_abs_diff"] < 1e-3 and result["greedy_agree"] == len(reqs) and result["greedy_true"] > 0
    ok = ok and result["packed_rows"] > 0 and result["packed_nodes"] < result["packed_suffix_tokens"]  # the trie path ran and shared
    line = (
        f"peak growth quantpipe {q / GiB:.3f} GiB vs stock HFLM {s / GiB:.3f} GiB "
        f"(peaks {result['quantpipe']['peak_bytes'] / GiB:.3f} / {result['stock']['peak_bytes'] / GiB:.3f} GiB, {device}, "
        f"batch {args.batch_size}); max |dLL| {result['max_abs_diff']:.2e}; is_greedy agrees {result['greedy_agree']}/{len(reqs)} "
        f"({result['greedy_true']} greedy); bit-identical {result['identical']}/{len(reqs)}; prefix sharing {lm.prefix_caching}; "
        f"packed rows {result['packed_rows']} ({result['packed_suffixes']} suffixes, {result['packed_nodes']} trie nodes for "
        f"{result['packed_suffix_tokens']} suffix tokens)"
    )
    return {"status": "PASS" if ok else "FAIL", "line": line, **result}


# -- b. batch-invariant FP8 ------------------------------------------------------------------------


def build_fp8_asset(dest: Path) -> None:
    """The tiny FP8_DYNAMIC checkpoint, made by the project's fp8 stage (needs llmcompressor)."""
    import shutil

    import torch

    from pipeline.stages.base import Artifact, StageContext
    from pipeline.stages.fp8 import FP8Params, FP8Stage

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_llama(Path(tmp) / "base", vocab=1024, hidden=256, intermediate=768, heads=4, kv_heads=2)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        FP8Stage(FP8Params(scheme="FP8_DYNAMIC")).run(Artifact(base, "hf", key="base"), dest, StageContext(lambda: [], 64, 0))
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"FP8_DYNAMIC checkpoint written to {dest} ({size / 2**20:.1f} MiB)")


def check_fp8(device: str, asset: Path, args) -> dict:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from pipeline.types import Artifact

    if not (asset / "config.json").is_file():
        return {"status": "SKIP", "line": f"no FP8 checkpoint at {asset} (make it with --build-fp8-asset where llmcompressor is)"}
    vocab = json.loads((asset / "config.json").read_text())["vocab_size"]
    max_length, b = 256, args.fp8_batch_size
    with backend_on(device) as backend:
        loaded = backend.load(Artifact(asset, "compressed-tensors", key="fp8"), "float32", b, max_length)
    lm, model, tok = loaded.lm, loaded.lm.model, loaded.lm.tokenizer

    rng = random.Random(1)
    preamble = words(rng, 100, vocab)
    pairs = []
    for _ in range(15):  # MMLU-like: a shared preamble, a question, several answers
        ctx = f"{preamble} {words(rng, rng.randrange(20, 90), vocab)}"
        pairs += [(ctx, " " + words(rng, k, vocab)) for k in (1, 1, 3, 6)]
    pairs += [(words(rng, 5, vocab), " " + words(rng, 2, vocab)), (words(rng, 30, vocab), " " + words(rng, 1, vocab))]
    pairs += [(words(rng, 400, vocab), " " + words(rng, 4, vocab)) for _ in range(2)]  # left-truncated to max_length
    reqs = instances(pairs)

    t0 = time.time()
    kw = dict(pretrained=model, tokenizer=tok, max_length=max_length)
    alone = HFLM(batch_size=1, **kw).loglikelihood(reqs, disable_tqdm=True)
    with packed_rows(lm) as packed:
        runs = {f"quantpipe_batch{b}": lm.loglikelihood(reqs, disable_tqdm=True)}
        lm.batch_size_per_gpu = len(reqs)
        runs[f"quantpipe_batch{len(reqs)}"] = lm.loglikelihood(reqs, disable_tqdm=True)
    runs[f"stock_batch{b}_patched"] = HFLM(batch_size=b, **kw).loglikelihood(reqs, disable_tqdm=True)
    result = {
        "requests": len(reqs),
        "evaluated_as": loaded.evaluated_as,
        "prefix_caching": lm.prefix_caching,
        "model_device": str(model.device),
        "attention": model.config._attn_implementation,
        "vs_batch1": {k: compare(v, alone) for k, v in runs.items()},
    } | packed

    # for information: stock compressed-tensors (no batch-invariant kernels), batch 1 against a batch
    plain = AutoModelForCausalLM.from_pretrained(asset, dtype="auto").eval().to(device)
    kw["pretrained"] = plain
    s1 = HFLM(batch_size=1, **kw).loglikelihood(reqs, disable_tqdm=True)
    result["stock_fp8_batch_vs_batch1_info"] = compare(HFLM(batch_size=b, **kw).loglikelihood(reqs, disable_tqdm=True), s1)
    result["seconds"] = round(time.time() - t0, 1)

    n = len(reqs)
    ok = "batch-invariant" in loaded.evaluated_as and lm.prefix_caching and all(c["identical"] == n for c in result["vs_batch1"].values())
    counts = ", ".join(f"{k} {c['identical']}/{n}" for k, c in result["vs_batch1"].items())
    info = result["stock_fp8_batch_vs_batch1_info"]
    line = (
        f"bit-identical to stock HFLM at batch size 1 ({device}): {counts}; prefix sharing {lm.prefix_caching}, "
        f"{result['attention']} attention, packed rows {result['packed_rows']} ({result['packed_nodes']} trie nodes for "
        f"{result['packed_suffix_tokens']} suffix tokens). "
        f"Info, without batch_invariant: batch {b} vs 1 identical {info['identical']}/{n}, max |dLL| {info['max_abs_diff']:.2e}"
    )
    return {"status": "PASS" if ok else "FAIL", "line": line, **result}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="check a (default 16 on cuda, 4 on cpu)")
    ap.add_argument("--fp8-batch-size", type=int, default=8, help="check b")
    ap.add_argument("--fp8-asset", type=Path, default=DEFAULT_ASSET)
    ap.add_argument("--only", choices=["bounded-memory", "batch-invariant-fp8"])
    ap.add_argument("--build-fp8-asset", type=Path, metavar="DIR", help="write the FP8 checkpoint to DIR and exit")
    args = ap.parse_args()

    import torch

    if args.build_fp8_asset:
        build_fp8_asset(args.build_fp8_asset)
        return 0
    if args.out is None:
        ap.error("--out is required")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.batch_size = args.batch_size or (16 if device.startswith("cuda") else 4)
    torch.set_grad_enabled(False)

    import lm_eval
    import transformers

    env = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval.__version__,
    }
    from importlib.metadata import version

    for dist in ("compressed-tensors", "pydantic", "pydantic-core", "typing-extensions"):
        with contextlib.suppress(Exception):
            env[dist] = version(dist)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)

    checks = {
        "bounded-memory": lambda tmp: check_bounded_memory(device, tmp, args),
        "batch-invariant-fp8": lambda tmp: check_fp8(device, args.fp8_asset, args),
    }
    summary = {"environment": env, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in checks.items():
            if args.only and name != args.only:
                continue
            t = time.time()
            try:
                res = run(Path(tmp))
            except Exception as e:  # noqa: BLE001 - report and go on to the next check
                res = {"status": "ERROR", "line": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                print(res["traceback"], file=sys.stderr)
            res["wall_seconds"] = round(time.time() - t, 1)
            summary["checks"][name] = res
            print(f"[{res['status']}] {name}: {res['line']} ({res['wall_seconds']} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary: {args.out / 'gpu_check.json'}")
    return 0 if all(c["status"] in ("PASS", "SKIP") for c in summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
