"""Placement: which device and dtype each row is evaluated in, the arguments the loaders get on
CUDA (decided here with "CUDA visible" as a parameter; no GPU needed), the host-memory refusal,
llama.cpp's offload and setup.sh's CUDA build switch (decided without building)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.backends.base import accepts_target
from pipeline.backends.hf import GPTQModelBackend, TransformersBackend
from pipeline.backends.llamacpp import LlamaCppBackend, offload
from pipeline.errors import QuantpipeError, RecipeError
from pipeline.placement import (
    SHARED_BELOW_FLOAT32,
    Placement,
    Target,
    check_host_memory,
    checkpoint_dtype,
    key_fields,
    resolve_device,
    resolve_placement,
)
from pipeline.recipe import parse_recipe
from pipeline.types import Artifact

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


@pytest.mark.parametrize(
    ("requested", "visible", "device"),
    [("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cuda", True, "cuda"), ("cpu", False, "cpu")],
)
def test_device_resolution(requested, visible, device):
    assert resolve_device(requested, visible) == device


def test_cuda_asked_for_without_a_gpu_is_one_clear_line():
    with pytest.raises(QuantpipeError, match="eval.device is cuda, but torch sees no CUDA GPU"):
        resolve_device("cuda", False)


def test_on_cuda_a_plain_checkpoint_loads_over_the_gpus_in_its_own_dtype():
    p = resolve_placement("auto", True, fmt="hf", recipe_dtype="auto", ckpt_dtype="bfloat16", max_memory_gib={1: 70, 0: 60.5})
    assert p == Placement("cuda", "auto", {0: "60.5GiB", 1: "70GiB"}, "bfloat16")
    # what transformers' from_pretrained gets
    assert p.load_kwargs() == {"dtype": "bfloat16", "device_map": "auto", "max_memory": {0: "60.5GiB", 1: "70GiB"}}
    assert resolve_placement("cuda", True, fmt="hf", recipe_dtype="auto", ckpt_dtype="float16").dtype == "float16"
    assert resolve_placement("cuda", True, fmt="hf", recipe_dtype="auto", ckpt_dtype="bfloat16").load_kwargs() == {
        "dtype": "bfloat16",
        "device_map": "auto",
    }


def test_an_explicit_model_dtype_is_kept_on_every_device():
    for visible in (True, False):
        p = resolve_placement("auto", visible, fmt="hf", recipe_dtype="float32", ckpt_dtype="bfloat16")
        assert p.dtype == "float32"


def test_on_cpu_float32_stays_the_default_and_quantized_formats_load_as_stored():
    cpu = resolve_placement("auto", False, fmt="hf", recipe_dtype="auto", ckpt_dtype="bfloat16")
    assert cpu == Placement("cpu", None, None, "float32") and cpu.load_kwargs() == {"dtype": "float32"}
    for visible in (True, False):
        assert resolve_placement("auto", visible, fmt="compressed-tensors", recipe_dtype="float32", ckpt_dtype="bfloat16").dtype == "auto"


def test_result_keys_change_only_where_the_numbers_do():
    assert key_fields("cpu", "hf", "auto", "float32") == {}  # as before placement existed
    # transformers rows below float32 now share prefixes (backends/low_precision.py): other numbers
    shared = {"loglikelihoods": SHARED_BELOW_FLOAT32}
    assert key_fields("cpu", "hf", "bfloat16", "bfloat16") == shared
    assert key_fields("cpu", "compressed-tensors", "auto", "bfloat16") == shared
    assert key_fields("cpu", "compressed-tensors", "auto", "float32") == {}
    assert key_fields("cpu", "gptq", "auto", "bfloat16") == {}  # GPTQModel rows keep stock batches
    assert key_fields("cpu", "hf", "auto", "bfloat16") == {"dtype": "float32"}  # auto meant bfloat16 here before
    assert key_fields("cuda", "hf", "auto", "bfloat16") == {"device": "cuda", "dtype": "bfloat16"}
    assert key_fields("cuda", "gptq", "auto", "bfloat16") == {"device": "cuda", "dtype": "auto"}


def test_a_base_whose_float32_copy_does_not_fit_is_refused_with_what_it_needs():
    cpu = Target("cpu").placement("hf", "auto", "bfloat16")
    with pytest.raises(QuantpipeError) as e:
        check_host_memory(8_030_261_248, cpu, 24 * GiB, "bfloat16")
    msg = str(e.value)
    assert "needs about 34.4 GiB of host memory" in msg and "24.0 GiB is available" in msg and "model.dtype: bfloat16" in msg
    check_host_memory(8_030_261_248, Target("cpu").placement("hf", "bfloat16", "bfloat16"), 24 * GiB, "bfloat16")  # 17.2 GiB fits
    check_host_memory(8_030_261_248, Target("cuda").placement("hf", "auto", "bfloat16"), 1 * GiB, "bfloat16")  # loads to the GPUs


def test_recipe_device_fields():
    base = {"name": "r", "model": {"id": "x"}, "variants": {"fp8": [{"stage": "fp8"}]}}
    r = parse_recipe({**base, "eval": {"device": "cuda", "max_memory": {0: 70, 1: 60}}})
    assert r.eval.device == "cuda" and r.eval.max_memory == {0: 70.0, 1: 60.0}
    assert parse_recipe(base).eval.device == "auto"
    with pytest.raises(RecipeError, match="eval.device"):
        parse_recipe({**base, "eval": {"device": "tpu"}})
    with pytest.raises(RecipeError, match="max_memory caps GPU memory"):
        parse_recipe({**base, "eval": {"device": "cpu", "max_memory": {0: 70}}})
    with pytest.raises(RecipeError, match="eval.max_memory"):
        parse_recipe({**base, "eval": {"max_memory": {0: -1}}})


def test_the_builtin_backends_take_the_target_and_plugins_without_it_still_load():
    assert all(accepts_target(c) for c in (TransformersBackend, GPTQModelBackend, LlamaCppBackend))

    class OldPlugin(TransformersBackend):
        def load(self, art, dtype, batch_size, max_length):  # the documented signature before placement
            raise NotImplementedError

    assert not accepts_target(OldPlugin)


def test_checkpoint_dtype_is_read_from_config(tmp_path):
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text('{"text_config": {"dtype": "float16"}}')
    assert checkpoint_dtype(tmp_path) == "float16"
    assert checkpoint_dtype(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("device", "built_with_offload", "layers", "says"),
    [
        ("cuda", True, -1, "on CUDA (every layer offloaded)"),
        ("cuda", False, 0, "built without GPU offload"),
        ("cpu", True, 0, "on CPU"),
    ],
)
def test_llama_cpp_offloads_every_layer_only_on_cuda_with_a_gpu_build(device, built_with_offload, layers, says):
    n, where = offload(device, built_with_offload)
    assert n == layers and says in where


def test_the_base_row_loads_in_float32_on_cpu_from_a_bfloat16_checkpoint(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(bf16)
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, bf16)
    assert checkpoint_dtype(bf16) == "bfloat16"
    art = Artifact(bf16, "hf", key="k")
    loaded = TransformersBackend().load(art, "auto", 1, 256, target=Target("cpu"))
    assert loaded.lm.model.dtype == torch.float32 and loaded.evaluated_as.startswith("transformers float32 on CPU")
    loaded = TransformersBackend().load(art, "bfloat16", 1, 256, target=Target("cpu"))
    assert loaded.lm.model.dtype == torch.bfloat16 and loaded.evaluated_as.startswith("transformers bfloat16 on CPU")


# -- setup.sh's CUDA build switch, decided without building ------------------------------------


def cmake_args(tmp_path: Path, tools: tuple[str, ...], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for t in tools:
        (fake / t).write_text("#!/bin/sh\nexit 0\n")
        (fake / t).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "QUANTPIPE_LLAMA_CUDA", "CUDA_HOME")}
    return subprocess.run(
        [shutil.which("bash"), str(ROOT / "scripts" / "llama-cmake-args.sh")],
        env={**base, "PATH": str(fake), **(env or {})},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("tools", "env", "cuda"),
    [
        (("nvcc", "nvidia-smi"), {}, True),
        (("nvcc",), {}, False),  # a toolkit without a driver: a CUDA build would not import
        ((), {}, False),
        ((), {"QUANTPIPE_LLAMA_CUDA": "1"}, True),
        (("nvcc", "nvidia-smi"), {"QUANTPIPE_LLAMA_CUDA": "0"}, False),
    ],
)
def test_setup_builds_llama_cpp_with_cuda_where_a_toolkit_and_driver_are_found(tmp_path, tools, env, cuda):
    r = cmake_args(tmp_path, tools, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["-DGGML_NATIVE=OFF", *(["-DGGML_CUDA=on"] if cuda else [])]


def test_setup_switch_refuses_other_values_and_keeps_cmake_args(tmp_path):
    r = cmake_args(tmp_path, (), {"QUANTPIPE_LLAMA_CUDA": "yes"})
    assert r.returncode == 2 and "QUANTPIPE_LLAMA_CUDA must be 0 (CPU build) or 1 (CUDA build), not 'yes'" in r.stderr
    assert cmake_args(tmp_path, ("nvcc", "nvidia-smi"), {"CMAKE_ARGS": "-DFOO=1"}).stdout.strip() == "-DFOO=1"


def test_doctor_says_per_row_where_it_runs_and_what_it_needs(tiny_model):
    from pipeline.doctor import placement_findings
    from pipeline.forecast import forecast

    variants = {
        "fp8": [{"stage": "fp8"}],
        "g4": [{"stage": "gptq", "bits": 4, "group_size": 64, "backend": "gptqmodel"}],
        "q4": [{"stage": "gguf", "type": "Q4_K_M"}],
    }
    recipe = parse_recipe({"name": "r", "model": {"id": str(tiny_model)}, "eval": {"suite": "smoke"}, "variants": variants})
    # an 8B model on two GPUs: the base in its bfloat16, FP8 held as float32 codes, 4-bit rows packed
    rows = {r.row: r for r in forecast(recipe, "bfloat16", 8_030_261_248, Target("cuda"), 2, measure=False)}
    assert rows["base"].line() == "row base: CUDA x2, transformers (bfloat16), weights ~15.0 GiB"
    assert rows["fp8"].line() == "row fp8: CUDA x2, transformers (bfloat16), weights ~29.9 GiB"
    assert (rows["g4"].engine, rows["q4"].engine) == ("gptqmodel", "llamacpp") and rows["g4"].weights_bytes < 5 * GiB
    # on this machine, the tiny model: CPU rows in float32, with a measured time estimate
    lines = [f.what for f in placement_findings(recipe, tiny_model)]
    assert any(line.startswith("row base: CPU, transformers (float32), weights ~") and "to evaluate" in line for line in lines), lines
