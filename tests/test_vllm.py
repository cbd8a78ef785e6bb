"""The vLLM engine: refused up front where it cannot run; on a GPU machine, the same table."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_pipeline import quantpipe, table_numbers, write_recipe

TASKS = {"humaneval": None, "gsm8k": None, "truthfulqa_mc1": None}


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_gpu() and importlib.util.find_spec("vllm") is not None, reason="vLLM can run here")
def test_vllm_engine_without_gpu_or_vllm_stops_before_any_work(tiny_model, data_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, data_dir, tasks=TASKS)
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art", "--engine", "vllm", check=False)
    assert r.returncode == 2
    assert "eval engine 'vllm' needs" in r.stderr
    assert not (tmp_path / "art" / "tiny" / "fp8" / "stages").exists()  # nothing was built


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
    rec = json.loads((tmp_path / "vllm" / "tiny" / "fp8" / "eval" / "mmlu" / "manifest.json").read_text())["meta"]
    assert rec["engine"] == "vllm" and "vLLM" in rec["evaluated_as"]
