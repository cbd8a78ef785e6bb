"""Each built-in stage writes a checkpoint that reloads cleanly and stays close to the base.

"Close" is a KL bound on next-token distributions over fixed text. The bound is checked to be
meaningful: an unrelated random model with the same architecture (what a silently randomly
initialised reload looks like) lies far above it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model
from helpers import mean_kl, token_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.backends import load as load_for_eval
from pipeline.calibration import load_calibration
from pipeline.recipe import parse_recipe
from pipeline.stages.base import Artifact, StageContext
from pipeline.stages.registry import get_stage

# Measured on this tiny model: FP8 ~0.002, W4 g128 0.013-0.021, an unrelated random model ~0.39.
KL_BOUND = 0.04


@pytest.fixture(scope="module")
def base(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return tok, token_logprobs(model, tok)


@pytest.fixture(scope="module")
def ctx(tiny_model):
    r = parse_recipe(
        {
            "name": "t",
            "model": {"id": str(tiny_model)},
            "variants": {"x": [{"stage": "fp8"}]},
            "calibration": {"num_samples": 16, "seq_len": 64},
        }
    )
    texts = load_calibration(r)
    return StageContext(lambda: texts, 64, 0)


def test_bound_separates_broken_models(base, tmp_path):
    tok, ref = base
    other = build_tiny_model(tmp_path / "other", seed=1)
    kl = mean_kl(ref, token_logprobs(AutoModelForCausalLM.from_pretrained(other), tok))
    assert kl > 5 * KL_BOUND, kl


CASES = [
    ("fp8", {"scheme": "FP8_DYNAMIC"}, "compressed-tensors", KL_BOUND / 5),
    ("fp8", {"scheme": "FP8"}, "compressed-tensors", KL_BOUND / 5),
    ("awq", {"bits": 4, "group_size": 128}, "compressed-tensors", KL_BOUND),
    ("gptq", {"bits": 4, "group_size": 128}, "compressed-tensors", KL_BOUND),
    ("gptq", {"bits": 4, "group_size": 128, "backend": "gptqmodel"}, "gptq", KL_BOUND),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,params,fmt,bound", CASES, ids=[f"{c[0]}-{c[2]}-{c[1].get('scheme', '')}" for c in CASES])
def test_stage_output_reloads_close_to_base(name, params, fmt, bound, tiny_model, base, ctx, tmp_path):
    tok, ref = base
    cls = get_stage(name)
    stage = cls(cls.Params.model_validate(params))
    out = stage.run(Artifact(tiny_model, "hf", key="base"), tmp_path, ctx)
    assert out.format == fmt == stage.output_format()
    cfg = json.loads((tmp_path / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == ("gptq" if fmt == "gptq" else "compressed-tensors")
    # Load it the way the evaluator does (load report checked), then compare distributions.
    loaded = load_for_eval(Artifact(tmp_path, fmt, key="x"), "float32", batch_size=1)
    kl = mean_kl(ref, token_logprobs(loaded.lm.model, tok))
    assert 0 < kl < bound, kl
    weights = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    base_weights = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    assert weights < 0.6 * base_weights  # really stored in fewer bits


def test_reload_with_missing_weights_is_an_error(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from pipeline.errors import QuantpipeError

    for f in tiny_model.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("model.layers.0.mlp.up_proj.weight")
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantpipeError, match="did not load cleanly.*up_proj"):
        load_for_eval(Artifact(tmp_path, "hf", key="x"), "float32", batch_size=1)
