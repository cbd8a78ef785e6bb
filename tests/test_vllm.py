"""The vLLM engine: refused up front where it cannot run; on a GPU machine, the same table.

Everything between the recipe and vLLM's constructor runs here on CPU, through the real code:
the recipe block, the arguments ModelSlot hands the backend and the backend hands lm-eval's VLLM,
the KL routing of vLLM rows, the process per row, the Ray requests of each step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_pipeline import quantpipe, record, table_numbers, write_recipe

from pipeline.backends.vllm import engine_kwargs
from pipeline.errors import QuantpipeError, RecipeError
from pipeline.recipe import VLLMSpec, parse_recipe
from pipeline.types import Artifact

TASKS = {"humaneval": None, "gsm8k": None, "truthfulqa_mc1": None}
GGUF = [{"stage": "gguf", "type": "Q8_0", "pre_tokenizer": "gpt-2"}]


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _recipe(**vllm) -> dict:
    return {"name": "r", "model": {"id": "builtin:x"}, "eval": {"engine": "vllm", "vllm": vllm}, "variants": {"fp8": [{"stage": "fp8"}]}}


# -- the recipe block ----------------------------------------------------------------------------
def test_vllm_block_is_validated_field_by_field():
    spec = parse_recipe(_recipe(tensor_parallel_size=4, gpu_memory_utilization=0.92, kv_cache_dtype="fp8")).eval.vllm
    assert (spec.tensor_parallel_size, spec.gpu_memory_utilization, spec.kv_cache_dtype) == (4, 0.92, "fp8")
    assert spec.gpus() == 4
    bad = [
        ({"tensor_parallel_size": 0}, "eval.vllm.tensor_parallel_size"),
        ({"gpu_memory_utilization": 0}, "eval.vllm.gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.2}, "eval.vllm.gpu_memory_utilization"),
        ({"kv_cache_dtype": "int3"}, "eval.vllm.kv_cache_dtype"),
        ({"max_model_len": 8}, "eval.vllm.max_model_len"),
        ({"tensor_paralel_size": 2}, "eval.vllm.tensor_paralel_size"),  # a typo is refused, not passed on
        ({"extra": {"tensor_parallel_size": 2}}, "eval.vllm.extra"),  # named fields are set by name
        ({"extra": {"pretrained": "/elsewhere"}}, "eval.vllm.extra"),  # quantpipe sets the artifact
        ({"extra": {"Bad-Name": 1}}, "eval.vllm.extra"),
    ]
    for block, field in bad:
        with pytest.raises(RecipeError) as e:
            parse_recipe(_recipe(**block))
        assert str(e.value).startswith(f"recipe field '{field}"), (block, str(e.value))
    r = _recipe(data_parallel_size=2)
    r["eval"]["batch_size"] = 8  # lm-eval batches automatically with data parallelism: the key would lie
    with pytest.raises(RecipeError, match="data_parallel_size"):
        parse_recipe(r)


def test_engine_kwargs_carry_the_recipe_block_and_the_stage_options(tmp_path):
    spec = VLLMSpec(
        tensor_parallel_size=4,
        data_parallel_size=2,
        gpu_memory_utilization=0.8,
        max_num_seqs=128,
        kv_cache_dtype="fp8",
        enable_prefix_caching=False,
        extra={"enforce_eager": True, "max_logprobs": 64},
    )
    art = Artifact(tmp_path, "compressed-tensors", "k", 8, {})
    kw = engine_kwargs(art, "bfloat16", "auto", 4096, spec, trust_remote_code=False)
    assert kw == {
        "pretrained": str(tmp_path),
        "dtype": "auto",  # a quantized checkpoint keeps its own dtypes
        "batch_size": "auto",
        "max_model_len": 4096,
        "seed": 1234,
        "trust_remote_code": False,
        "tensor_parallel_size": 4,
        "data_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "kv_cache_dtype": "fp8",
        "max_num_seqs": 128,
        "enable_prefix_caching": False,
        "enforce_eager": True,
        "max_logprobs": 64,
    }
    # a TurboQuant row's own KV preset wins for that row; a plain row keeps the recipe's dtype
    tq = Artifact(tmp_path, "hf", "k", 16, {"engine_options": {"vllm": {"kv_cache_dtype": "turboquant_k8v4"}}})
    kw = engine_kwargs(tq, "bfloat16", 8, 4096, VLLMSpec(max_model_len=2048, pipeline_parallel_size=2), True)
    assert (kw["kv_cache_dtype"], kw["dtype"], kw["max_model_len"], kw["pipeline_parallel_size"]) == (
        "turboquant_k8v4",
        "bfloat16",
        2048,
        2,
    )
    assert kw["trust_remote_code"] is True and "max_num_seqs" not in kw and "enable_prefix_caching" not in kw


def test_engine_kwargs_are_arguments_lm_eval_s_vllm_takes(tmp_path):
    """Named parameters of the installed lm-eval's VLLM, or passed on through its **kwargs to vllm.LLM."""
    import ast

    src = Path(importlib.util.find_spec("lm_eval.models.vllm_causallms").origin).read_text()
    cls = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ClassDef) and n.name == "VLLM")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    named = {a.arg for a in init.args.args + init.args.kwonlyargs}
    assert init.args.kwarg is not None  # the rest goes to vllm.LLM(**model_args)
    spec = VLLMSpec(tensor_parallel_size=2, pipeline_parallel_size=2, max_num_seqs=8, enable_prefix_caching=True)
    kw = engine_kwargs(Artifact(tmp_path, "hf", "k", 16, {}), "auto", "auto", 4096, spec, False)
    assert {"pretrained", "dtype", "batch_size", "max_model_len", "seed", "trust_remote_code"} <= named
    assert {"tensor_parallel_size", "data_parallel_size"} <= named
    # vllm.LLM's own (EngineArgs), passed on by lm-eval's **kwargs
    assert set(kw) - named == {
        "gpu_memory_utilization",
        "kv_cache_dtype",
        "max_num_seqs",
        "enable_prefix_caching",
        "pipeline_parallel_size",
    }


# -- planning a vLLM run on CPU: KL routing, keys, load arguments ----------------------------------
def _planned(tmp: Path, model: Path, data_dir: Path, variants: dict, vllm: dict | None = None, gate: dict | None = None):
    """A Job for `eval.engine: vllm`, planned with the real code (its vLLM availability check, which
    refuses this machine, skipped: that refusal is tested below)."""
    from pipeline.evaluation import Evaluator
    from pipeline.job import Job
    from pipeline.recipe import load_recipe

    tmp.mkdir(parents=True, exist_ok=True)
    path = write_recipe(tmp, model, data_dir, variants=variants, tasks=TASKS)
    data = yaml.safe_load(path.read_text())
    data["eval"] |= {"engine": "vllm", "vllm": vllm or {}}
    if gate:
        data["gate"] = gate
    path.write_text(yaml.safe_dump(data))
    job = Job(load_recipe(path), tmp / "art", data_dir=data_dir)
    job.prepare(evaluation=False)
    job.evaluator = Evaluator(job.recipe, job.workdir, False, data_dir)
    return job


@pytest.fixture(scope="module")
def vllm_job(tiny_model, data_dir, tmp_path_factory):
    variants = {"fp8": [{"stage": "fp8"}], "gguf-q8": GGUF}
    return _planned(tmp_path_factory.mktemp("plan"), tiny_model, data_dir, variants, vllm={"tensor_parallel_size": 4})


def test_vllm_rows_get_their_kl_from_the_default_engine(vllm_job):
    job = vllm_job
    plan = job.plan()
    assert [job.eval_backend(r).name for r in plan.rows] == ["vllm", "vllm", "llamacpp"]
    kinds = {(s.kind, s.row) for s in plan.steps if s.kind != "eval"} - {("build", "fp8"), ("build", "gguf-q8")}
    assert kinds == {("kl_reference", "base"), ("kl", "fp8"), ("kl", "gguf-q8")}
    by_id = {s.id: s for s in plan.steps}
    ref = next(s for s in plan.steps if s.kind == "kl_reference")
    # the base's reference is planned on the default engine, after the base's evaluations
    assert job.step_backend(ref).name == "transformers"
    assert plan.steps.index(ref) > max(plan.steps.index(s) for s in plan.steps if s.kind == "eval" and s.row == "base")
    kl = {s.row: s for s in plan.steps if s.kind == "kl"}
    assert job.step_backend(kl["fp8"]).name == "transformers"  # vLLM gives no distributions
    assert job.step_backend(kl["gguf-q8"]).name == "llamacpp"  # llama.cpp does
    assert ref.id in kl["fp8"].deps and all(d in by_id for d in kl["fp8"].deps)
    # what ModelSlot hands each backend's load(): vLLM rows their engine block and batch size auto
    ev = job.load_args("fp8", job.eval_backend("fp8"))
    assert ev["vllm"].tensor_parallel_size == 4 and ev["batch_size"] == "auto" and ev["max_length"] == 4096
    kl_args = job.load_args("fp8", job.kl_backend("fp8"))
    assert "vllm" not in kl_args and kl_args["batch_size"] == 1  # the KL model evaluates nothing
    assert job.load_args("gguf-q8", job.eval_backend("gguf-q8"))["batch_size"] == "auto"


def test_vllm_arguments_enter_only_vllm_rows_keys(vllm_job, tiny_model, data_dir, tmp_path):
    other = _planned(tmp_path, tiny_model, data_dir, {"fp8": [{"stage": "fp8"}], "gguf-q8": GGUF}, vllm={"tensor_parallel_size": 2})
    a = {(s.kind, s.row, s.task): s.key for s in vllm_job.plan().steps}
    b = {(s.kind, s.row, s.task): s.key for s in other.plan().steps}
    assert a.keys() == b.keys()
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {k for k in a if k[0] == "eval" and k[1] in ("base", "fp8")}  # GGUF rows and every KL keep theirs


def test_kl_none_drops_vllm_rows_kl_and_a_kl_gate_on_them_is_refused(tiny_model, data_dir, tmp_path):
    variants = {"fp8": [{"stage": "fp8"}], "gguf-q8": GGUF}
    job = _planned(tmp_path / "a", tiny_model, data_dir, variants, vllm={"kl": "none"})
    kinds = {(s.kind, s.row) for s in job.plan().steps if s.kind in ("kl", "kl_reference")}
    assert kinds == {("kl_reference", "base"), ("kl", "gguf-q8")}  # the GGUF row's reference is still planned
    job.check_kl()  # nothing asks for fp8's KL
    gated = _planned(tmp_path / "b", tiny_model, data_dir, variants, vllm={"kl": "none"}, gate={"max_kl": 0.1})
    with pytest.raises(QuantpipeError, match="gate.max_kl needs a KL entry for 'fp8'.*eval.vllm.kl is none"):
        gated.check_kl()
    ok = _planned(tmp_path / "c", tiny_model, data_dir, variants, gate={"max_kl": 0.1, "variants": ["gguf-q8"]}, vllm={"kl": "none"})
    ok.check_kl()


def test_vllm_engine_without_gpu_or_vllm_stops_before_any_work(tiny_model, data_dir, tmp_path):
    if _gpu() and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM can run here")
    recipe = write_recipe(tmp_path, tiny_model, data_dir, tasks=TASKS)
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art", "--engine", "vllm", check=False)
    assert r.returncode == 2
    assert "eval engine 'vllm' needs" in r.stderr
    assert not (tmp_path / "art" / "tiny" / "fp8" / "stages").exists()  # nothing was built


# -- Ray requests (computed by the executor's own function, no cluster needed) ----------------------
def test_ray_requests_give_vllm_steps_their_gpus(vllm_job):
    from pipeline.distributed import request_summary, task_options

    plan = vllm_job.plan()
    opts = {s.id: task_options(vllm_job, s, cluster_gpus=16, node_gpus=8) for s in plan.steps}
    for s in plan.steps:
        want = 4 if s.kind == "eval" and s.row != "gguf-q8" else 1  # TP 4 per vLLM row; every other step one GPU
        assert opts[s.id]["num_gpus"] == want, s.id
    assert "eval x (1 CPU, 4 GPU)" in request_summary(plan, opts)
    # no GPUs in the cluster: CPU steps ask for none, a vLLM step can never be placed and is refused
    gguf_eval = next(s for s in plan.steps if s.kind == "eval" and s.row == "gguf-q8")
    assert task_options(vllm_job, gguf_eval, 0, 0)["num_gpus"] == 0
    vllm_eval = next(s for s in plan.steps if s.kind == "eval" and s.row == "fp8")
    with pytest.raises(QuantpipeError, match="asks for 4 GPU.*the cluster has none"):
        task_options(vllm_job, vllm_eval, 0, 0)
    with pytest.raises(QuantpipeError, match="the largest node has 2"):
        task_options(vllm_job, vllm_eval, 8, 2)  # TP 4 must fit one node


def test_ray_requests_follow_the_recipe_resources_but_never_below_a_vllm_engine(vllm_job):
    from pipeline.distributed import task_options
    from pipeline.recipe import Resources

    plan = vllm_job.plan()
    build = next(s for s in plan.steps if s.kind == "build")
    vllm_eval = next(s for s in plan.steps if s.kind == "eval" and s.row == "fp8")
    saved = vllm_job.recipe.resources
    try:
        vllm_job.recipe.resources = Resources.model_validate({"build": {"num_gpus": 0, "num_cpus": 8}, "evaluate": {"num_gpus": 8}})
        assert task_options(vllm_job, build, 8, 8) == {"num_cpus": 8, "num_gpus": 0}  # a CPU build, as asked
        assert task_options(vllm_job, vllm_eval, 8, 8)["num_gpus"] == 8
        vllm_job.recipe.resources = Resources.model_validate({"evaluate": {"num_gpus": 1}})
        with pytest.raises(QuantpipeError, match="needs 4 GPU.*resources.evaluate.num_gpus is 1"):
            task_options(vllm_job, vllm_eval, 8, 8)
        vllm_job.recipe.resources = saved
        vllm_job.recipe.eval.vllm.data_parallel_size = 2  # lm-eval's own Ray actors cannot run inside a task
        with pytest.raises(QuantpipeError, match="data_parallel_size > 1 starts lm-eval's own Ray actors"):
            task_options(vllm_job, vllm_eval, 8, 8)
    finally:
        vllm_job.recipe.resources = saved
        vllm_job.recipe.eval.vllm.data_parallel_size = 1


# -- a process per row ---------------------------------------------------------------------------
def test_gpu_bytes_of_a_process_tree(tmp_path):
    from pipeline.memory import descendants, gpu_bytes_by_pid

    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '30'])"])
    try:
        deadline = time.time() + 30
        while len(descendants(child.pid)) < 1 and time.time() < deadline:
            time.sleep(0.05)
        grand = descendants(child.pid)
        assert len(grand) == 1 and child.pid in descendants(os.getpid())
        tree = {child.pid} | grand
        used = {0: [(child.pid, 3 << 30), (99999999, 5 << 30)], 1: [(next(iter(grand)), 1 << 30)], 2: [(99999998, 7)]}
        assert gpu_bytes_by_pid(tree, used) == {0: 3 << 30, 1: 1 << 30}  # another process's memory is not the row's
    finally:
        for p in descendants(child.pid):
            os.kill(p, 9)
        child.kill()
        child.wait()


@pytest.mark.slow
def test_each_row_runs_in_a_process_of_its_own_with_the_same_results(tiny_model, data_dir, tmp_path):
    """The local executor's order, each (row, backend)'s model steps in a spawned process: one
    process per row, ended before the next row's starts, and the very records of an in-process run."""
    from pipeline.isolation import ModelSlot
    from pipeline.job import Job
    from pipeline.memory import descendants
    from pipeline.recipe import load_recipe

    tasks = {**TASKS, "truthfulqa_mc2": None}  # MMLU alone (one item) keeps it short
    path = write_recipe(tmp_path, tiny_model, data_dir, variants={"fp8": [{"stage": "fp8"}]}, tasks=tasks)

    def job(root: str) -> Job:
        j = Job(load_recipe(path), tmp_path / root, data_dir=data_dir)
        j.prepare()
        return j

    inproc, isolated = job("inproc"), job("isolated")
    slot = ModelSlot(inproc, isolate=False)
    for s in inproc.plan().steps:
        inproc.run_step(s, slot)
    slot.release()
    slot, pids, ended = ModelSlot(isolated, isolate=True), {}, []
    for s in isolated.plan().steps:
        before = slot.process
        isolated.run_step(s, slot)
        if s.kind != "build":
            pids.setdefault((s.row, isolated.step_backend(s).name), set()).add(slot.process.pid)
            if before is not None and before is not slot.process:
                ended.append(before.pid)
                assert not before.proc.is_alive()  # the previous row's process is gone before this row's ran
        assert slot.process is None or slot.process.pid in descendants(os.getpid())
    slot.release()
    assert set(pids) == {("base", "transformers"), ("fp8", "transformers")}
    assert all(len(p) == 1 for p in pids.values()) and len(set.union(*pids.values())) == 2
    assert ended
    for rel in ("base/eval/mmlu", "fp8/eval/mmlu", "base/kl-reference", "fp8/kl"):
        a, b = record(tmp_path / "inproc" / "tiny" / rel), record(tmp_path / "isolated" / "tiny" / rel)
        assert a["key"] == b["key"] and a["files"] == b["files"], rel  # the same samples, bit for bit
    assert not list((tmp_path / "isolated" / "tiny" / ".work").glob("worker-*"))  # row processes clean up after themselves


# -- the real thing, where it can run ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (_gpu() and importlib.util.find_spec("vllm") is not None), reason="needs a CUDA GPU and vllm")
def test_vllm_rows_agree_with_the_transformers_rows(tiny_model, data_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, data_dir, tasks=TASKS)
    quantpipe("run", recipe, "--artifacts", tmp_path / "hf")
    quantpipe("run", recipe, "--artifacts", tmp_path / "vllm", "--engine", "vllm")
    hf, vl = table_numbers(tmp_path / "hf" / "tiny"), table_numbers(tmp_path / "vllm" / "tiny")
    assert hf.keys() == vl.keys()
    for row in hf:
        for bench in hf[row]:
            assert vl[row][bench][1] == hf[row][bench][1]  # same items
            assert vl[row][bench][0] == pytest.approx(hf[row][bench][0], abs=0.08)  # other kernels, same model
    root = tmp_path / "vllm" / "tiny"
    rec = json.loads((root / "fp8" / "eval" / "mmlu" / "manifest.json").read_text())["meta"]
    assert rec["engine"] == "vllm" and "vLLM" in rec["evaluated_as"] and rec["batch_size"] == "auto"
    assert rec["peak_memory_bytes"] > 0  # the GPU memory of the row's processes, from NVML
    kl = record(root / "fp8" / "kl")["meta"]["sets"]["docs"]  # computed by the default engine
    hf_kl = record(tmp_path / "hf" / "tiny" / "fp8" / "kl")["meta"]["sets"]["docs"]
    assert kl["mean_kl"] == pytest.approx(hf_kl["mean_kl"], rel=1e-3)
