"""quantpipe against stock lm-eval on one GPU at the real scale of Llama-3.1-8B (random weights).

    python3 benchmarks/gpu_scale.py --out DIR [--data-dir DIR] [--rows base,fp8,w4] [--bs1]

Builds, from the config below (no download), a model of Llama-3.1-8B's exact shape in bfloat16
with random weights and a byte-level BPE tokenizer trained on the evaluation data in seconds (the
model keeps the 128,256-row embedding and LM head; the tokenizer uses the first 16k ids). Random
weights make the scores meaningless but the time and memory real. Then, on the same items (MMLU
5-shot, GSM8K, HumanEval, TruthfulQA MC2; the subsets below):

(a) quantpipe: `quantpipe run` (eval.device cuda, batch_size auto) on base, fp8 (FP8_DYNAMIC) and
    w4 (GPTQ W4A16 g128, llm-compressor); the stage builds are not timed.
(b) stock: `lm_eval --model hf --device cuda --batch_size auto` once per row on the same
    checkpoints, task files and items (lm-eval's stock YAMLs pointed at the same data copies).

Per row it reports: each route's evaluation wall time, prompt+generated tokens per second,
quantpipe's peak GPU memory against its weights, and per-request agreement with stock: the largest
|log-likelihood difference| against the contract's tolerance (docs/backends.md, "Shared prefixes
below float32"), is_greedy decisions that differ and generations that differ, against stock at
batch size 1 (the contract's reference; --skip-bs1 leaves it out) and at batch size auto.
A table at the end; everything in DIR/gpu_scale.json.

On the GPU machine (nothing can be fetched there): lm-eval, llm-compressor, compressed-tensors and
their missing dependencies travel as wheels (benchmarks/gpu_wheels.sh fetches them into .whl), and
the evaluation data as a copy in an ignored folder, e.g.

    bash benchmarks/gpu_wheels.sh && cp -r ../shared/data .gpudata   # here, once
    # device run, carry [.whl, .gpudata]:
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. \\
      python3 benchmarks/gpu_scale.py --out $OUT --data-dir .gpudata

Without CUDA it stops at once with one line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

# Llama-3.1-8B's config.json, as published (the shape is what matters: 8.03B parameters).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
TOKENIZER_VOCAB = 16384
SUBSETS = {"mmlu": 1, "truthfulqa_mc2": 20, "gsm8k": 8, "humaneval": 4}  # first N items (per subject for MMLU)
MAX_GEN_TOKS = 256
VARIANTS = {
    "fp8": [{"stage": "fp8", "scheme": "FP8_DYNAMIC"}],
    "w4": [{"stage": "gptq", "bits": 4, "group_size": 128}],
}


def log(msg: str) -> None:
    print(f"[gpu-scale] {msg}", file=sys.stderr, flush=True)


def require_cuda() -> str:
    try:
        import torch
    except ImportError:
        sys.exit("gpu_scale: torch is not installed")
    if not torch.cuda.is_available():
        sys.exit("gpu_scale needs a CUDA GPU: torch.cuda.is_available() is False on this machine (nothing was run)")
    missing = [m for m in ("lm_eval", "llmcompressor", "compressed_tensors", "datasets") if _absent(m)]
    if missing:
        sys.exit(f"gpu_scale: {', '.join(missing)} not importable; carry them as wheels (benchmarks/gpu_wheels.sh, docstring)")
    return torch.cuda.get_device_name(0)


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def texts(data_dir: Path) -> list[str]:
    out = []
    for f in sorted(data_dir.rglob("*.jsonl")):
        out += [line for line in f.read_text().splitlines()[:2000]]
    return out


def build_model(dest: Path, data_dir: Path) -> dict:
    """Llama-3.1-8B-shaped, bfloat16, random: initialised on the GPU, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (dest / "config.json").is_file():
        return json.loads((dest / "build.json").read_text())
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(data_dir), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0], eos_token=special[1], pad_token=special[1])
    cfg = LlamaConfig(**{k: v for k, v in LLAMA_31_8B.items() if k not in ("architectures", "torch_dtype")})
    cfg.bos_token_id, cfg.eos_token_id = fast.bos_token_id, fast.eos_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest)
    fast.save_pretrained(dest)
    del model
    torch.cuda.empty_cache()
    info = {"parameters": n, "weights_bytes": 2 * n, "build_s": round(time.time() - t0, 1)}
    (dest / "build.json").write_text(json.dumps(info))
    return info


def write_recipe(work: Path, model: Path, data_dir: Path, rows: list[str]) -> Path:
    import yaml

    recipe = {
        "name": "gpu-scale",
        "model": {"id": str(model), "dtype": "auto"},
        "calibration": {"dataset": "builtin:python-docs", "num_samples": 16, "seq_len": 256, "seed": 0},
        "eval": {
            "suite": "full",
            "device": "cuda",
            "batch_size": "auto",
            "data_dir": str(data_dir),
            "tasks": {
                "truthfulqa_mc1": None,
                **{t: {"limit": n, **({"max_gen_toks": MAX_GEN_TOKS} if t in ("gsm8k", "humaneval") else {})} for t, n in SUBSETS.items()},
            },
        },
        "offline": True,
        "variants": {r: VARIANTS[r] for r in rows if r != "base"},
    }
    path = work / "gpu-scale.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def quantpipe(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"quantpipe {' '.join(map(str, args))} failed:\n{r.stderr[-4000:]}")
    return r


def row_checkpoint(run_root: Path, row: str, model: Path) -> Path:
    if row == "base":
        return model
    return sorted((run_root / row / "stages").iterdir())[-1]


def run_stock(row: str, path: Path, task_dir: Path, work: Path, batch: str) -> dict:
    from time_to_table import stock_samples

    out = work / "stock" / f"{row}-bs{batch}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "QUANTPIPE_ALLOW_CODE_EXECUTION": "1", "HF_ALLOW_CODE_EVAL": "1", "HF_DATASETS_CACHE": str(work / "stock-cache")}
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={path},dtype=auto,max_length=4096",
        "--device",
        "cuda",
        "--batch_size",
        batch,
        "--tasks",
        ",".join(SUBSETS),
        "--include_path",
        str(task_dir),
        "--samples",
        json.dumps(stock_samples(task_dir, SUBSETS)),
        "--gen_kwargs",
        f"max_gen_toks={MAX_GEN_TOKS}",
        "--seed",
        "0,1234,1234,1234",
        "--confirm_run_unsafe_code",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.time() - t0
    if r.returncode:
        sys.exit(f"lm-eval failed on {row}:\n{r.stderr[-4000:]}")
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            samples[(s["doc"].get("task", f.name.split("_", 1)[1].rsplit("_", 1)[0]), s["doc_id"])] = s
    return {"seconds": round(dt, 1), "samples": samples, "files": [str(f) for f in out.rglob("samples_*.jsonl")]}


def ours(run_root: Path, row: str) -> tuple[dict, dict]:
    """(samples by (task, doc_id), the row's evaluation meta summed: seconds, peak, weights)."""
    samples, seconds, peak, weights = {}, 0.0, 0, 0
    for mf in (run_root / row / "eval").glob("*/manifest.json"):
        meta = json.loads(mf.read_text())["meta"]
        seconds += meta.get("seconds", 0.0)
        peak, weights = max(peak, meta.get("peak_memory_bytes") or 0), meta.get("weights_bytes") or weights
        for line in (mf.parent / "samples.jsonl").read_text().splitlines():
            s = json.loads(line)
            samples[(s["task"], s["doc_id"])] = s
    return samples, {"seconds": round(seconds, 1), "peak_bytes": peak, "weights_bytes": weights}


def agreement(mine: dict, stock: dict, tokenizer, dtype: str) -> dict:
    """Per request, under the contract of docs/backends.md (pipeline/backends/low_precision.py):
    each log-likelihood's |difference| from stock's as a share of its tolerance (at most 1 holds)
    and in nats, the requests over it, greedy flags that differ; generated texts that differ (the
    contract for those is stock's tokens at the same batch size). The contract's reference is stock
    at batch size 1; against stock at batch size auto the same figures show stock's own batch noise."""
    import torch

    from pipeline.backends.low_precision import tolerance

    worst, worst_share, over, greedy_differ, gen_differ, n, missing = 0.0, 0.0, 0, 0, 0, 0, 0
    by_doc = {k[1:]: v for k, v in stock.items()}
    for key, s in mine.items():
        t = stock.get(key) or by_doc.get(key[1:])
        if t is None:
            missing += 1
            continue
        for args, a, b in zip(s["arguments"], s["resps"], t["resps"]):
            n += 1
            a, b = a[0], b[0]
            if isinstance(a, list | tuple) and len(a) == 2 and not isinstance(a[0], str):
                cont = args[1] if isinstance(args, list | tuple) and len(args) > 1 else ""
                n_cont = len(tokenizer(cont, add_special_tokens=False).input_ids)
                d, tol = abs(float(a[0]) - float(b[0])), tolerance(float(b[0]), n_cont, getattr(torch, dtype))
                worst, worst_share = max(worst, d), max(worst_share, d / tol)
                over += d > tol
                greedy_differ += bool(a[1]) != bool(b[1])
            else:
                gen_differ += a != b
    return {
        "requests": n,
        "dtype": dtype,
        "max_abs_loglik_diff": worst,
        "max_share_of_tolerance": round(worst_share, 3),
        "over_tolerance": over,
        "greedy_differ": greedy_differ,
        "generations_differ": gen_differ,
        "contract_holds": over == 0 and greedy_differ == 0,
        "unmatched": missing,
    }


def tokens(samples: dict, tokenizer) -> int:
    n = 0
    for s in samples.values():
        for args, resp in zip(s["arguments"], s["resps"]):
            a = args if isinstance(args, list | tuple) else [args]
            n += len(tokenizer(str(a[0]) + (a[1] if len(a) > 1 and isinstance(a[1], str) else "")).input_ids)
            if not (len(a) > 1 and isinstance(a[1], str)):
                n += len(tokenizer(str(resp[0]), add_special_tokens=False).input_ids)
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/gpu-scale")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--rows", default="base,fp8,w4")
    ap.add_argument("--skip-bs1", action="store_true", help="skip stock at batch size 1 (the agreement contract's reference)")
    args = ap.parse_args()
    gpu = require_cuda()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := set(rows) - {"base", *VARIANTS}:
        sys.exit(f"gpu_scale: unknown rows {', '.join(sorted(unknown))} (known: base, {', '.join(VARIANTS)})")
    out, work, data_dir = Path(args.out), Path(args.work), Path(args.data_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "gsm8k" / "test.jsonl").is_file():
        sys.exit(f"gpu_scale: no evaluation data at {data_dir} (--data-dir)")
    result: dict = {"gpu": gpu, "subsets": SUBSETS, "max_gen_toks": MAX_GEN_TOKS, "rows": {}}

    def save() -> None:
        (out / "gpu_scale.json").write_text(json.dumps(result, indent=1, default=str))

    log(f"{gpu}: building the Llama-3.1-8B-shaped model")
    model = work / "llama-3.1-8b-random"
    result["model"] = build_model(model, data_dir)
    save()
    recipe = write_recipe(work, model, data_dir, rows)
    art = work / "artifacts"
    t0 = time.time()
    quantpipe("build", recipe, "--artifacts", art)
    result["build_s"] = round(time.time() - t0, 1)
    log(f"variants built in {result['build_s']} s; quantpipe run")
    t0 = time.time()
    quantpipe("run", recipe, "--artifacts", art, "--allow-code-execution")
    result["quantpipe_run_s"] = round(time.time() - t0, 1)
    save()
    run_root = art / "gpu-scale"
    from time_to_table import stock_task_dir
    from transformers import AutoTokenizer

    from pipeline.evaluation import prepare_task_dir
    from pipeline.offline_data import build_mirrors
    from pipeline.placement import checkpoint_dtype

    prepare_task_dir(work / "tasks", list(SUBSETS), build_mirrors(data_dir))  # the task files quantpipe evaluates
    stock_tasks = stock_task_dir(work / "tasks", {"mmlu": 5}, work)
    tok = AutoTokenizer.from_pretrained(model)
    for row in rows:
        path = row_checkpoint(run_root, row, model)
        mine, meta = ours(run_root, row)
        log(f"stock lm_eval on {row}")
        stock = run_stock(row, path, stock_tasks, work, "auto")
        n_tok = tokens(mine, tok)
        dtype = checkpoint_dtype(path) or "bfloat16"  # every row here runs in the base's bfloat16
        r = {
            "checkpoint": str(path),
            "quantpipe_s": meta["seconds"],
            "stock_s": stock["seconds"],
            "speedup": round(stock["seconds"] / meta["seconds"], 2) if meta["seconds"] else None,
            "tokens": n_tok,
            "quantpipe_tokens_per_s": round(n_tok / meta["seconds"]) if meta["seconds"] else None,
            "stock_tokens_per_s": round(n_tok / stock["seconds"]),
            "peak_gpu_bytes": meta["peak_bytes"],
            "weights_bytes": meta["weights_bytes"],
            "peak_over_weights": round(meta["peak_bytes"] / meta["weights_bytes"], 2) if meta["weights_bytes"] else None,
            "agreement_vs_stock_auto": agreement(mine, stock["samples"], tok, dtype),
        }
        if not args.skip_bs1:
            one = run_stock(row, path, stock_tasks, work, "1")
            r["stock_bs1_s"] = one["seconds"]
            r["agreement_vs_stock_bs1"] = agreement(mine, one["samples"], tok, dtype)
        result["rows"][row] = r
        save()
    print(f"\n{gpu}; items {SUBSETS}; quantpipe run {result['quantpipe_run_s']} s in all (loads and KL included)")
    print(f"{'row':6s} {'quantpipe s':>11s} {'stock s':>8s} {'x':>5s} {'tok/s qp':>9s} {'peak/weights':>12s}  agreement")
    for row, r in result["rows"].items():
        print(
            f"{row:6s} {r['quantpipe_s']:11.1f} {r['stock_s']:8.1f} {r['speedup'] or 0:5.2f} {r['quantpipe_tokens_per_s'] or 0:9d} "
            f"{r['peak_over_weights'] or 0:12.2f}"
        )
        for ref in ("bs1", "auto"):
            if a := r.get(f"agreement_vs_stock_{ref}"):
                print(
                    f"    vs stock {ref:4s}: contract {'holds' if a['contract_holds'] else 'MISSED'}; "
                    f"max|dLL| {a['max_abs_loglik_diff']:.3g} "
                    f"({a['max_share_of_tolerance']:.2f} of tolerance, {a['over_tolerance']} over), greedy differ {a['greedy_differ']}, "
                    f"generations differ {a['generations_differ']} of {a['requests']}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
