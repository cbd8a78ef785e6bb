"""What programs read from quantpipe: `build`'s standard output holds only its result lines, even on a
fresh build where quantizers and llama.cpp's converter print; progress goes to standard error."""

from __future__ import annotations

import json

import pytest
import yaml
from test_pipeline import quantpipe

pytestmark = pytest.mark.slow


def test_build_from_nothing_prints_only_parseable_results(tiny_model, tmp_path):
    recipe = tmp_path / "b.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "b",
                "model": {"id": str(tiny_model), "dtype": "float32"},
                "offline": True,
                "calibration": {"num_samples": 8, "seq_len": 64},
                "variants": {
                    "fp8": [{"stage": "fp8"}],
                    "gptq": [{"stage": "gptq", "group_size": 128, "backend": "gptqmodel"}],
                    "q8": [{"stage": "gguf", "type": "Q8_0", "pre_tokenizer": "gpt-2"}],
                },
            }
        )
    )
    r = quantpipe("build", recipe, "--artifacts", tmp_path / "art", "--json")
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    built = [json.loads(line) for line in lines]
    assert [b["variant"] for b in built] == ["fp8", "gptq", "q8"]
    assert [b["format"] for b in built] == ["compressed-tensors", "gptq", "gguf"]
    for b in built:
        assert (tmp_path / "art" / "b" / b["variant"] / "stages").is_dir() and b["path"].startswith(str(tmp_path))
    assert "[1/3] build fp8[0] fp8:" in r.stderr  # progress is on standard error
    # the tab-separated form, now from stored artifacts, has the same three lines
    again = quantpipe("build", recipe, "--artifacts", tmp_path / "art").stdout.splitlines()
    assert [line.split("\t") for line in again] == [[b["variant"], b["format"], b["path"]] for b in built]
