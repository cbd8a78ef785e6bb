"""No code from a model folder runs without the recipe's opt-in: not in quantpipe's loaders, not in
llama.cpp's GGUF converter (which asks transformers for trust_remote_code=True for DreamModel)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_pipeline import quantpipe

pytestmark = pytest.mark.slow

EVIL = """
import os
from pathlib import Path
from transformers import PreTrainedTokenizerFast

Path(os.environ["QP_TEST_MARKER"]).write_text(f"ran as uid {os.getuid()}")


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def custom_code_model(tiny_model: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "architectures": ["DreamModel"]}))
    tok = json.loads((dest / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
    (dest / "tokenizer_config.json").write_text(json.dumps(tok))
    (dest / "evil_tok.py").write_text(EVIL)
    return dest


def recipe(tmp: Path, model: Path, trust: bool) -> Path:
    path = tmp / f"r-{trust}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": f"rc-{trust}",
                "model": {"id": str(model), "dtype": "float32", "trust_remote_code": trust},
                "offline": True,
                "variants": {"q8": [{"stage": "gguf", "type": "Q8_0", "pre_tokenizer": "gpt-2"}]},
            }
        )
    )
    return path


def test_gguf_converter_cannot_run_model_folder_code_without_opt_in(tiny_model, tmp_path, monkeypatch):
    model = custom_code_model(tiny_model, tmp_path / "dream")
    marker = tmp_path / "marker"
    monkeypatch.setenv("QP_TEST_MARKER", str(marker))
    r = quantpipe("build", recipe(tmp_path, model, False), "--artifacts", tmp_path / "art", check=False)
    assert not marker.exists(), "model folder code ran without the opt-in"
    assert r.returncode != 0 and "model.trust_remote_code: true" in r.stderr
    # with the opt-in the same folder's code does run (so the refusal above is the guard's doing)
    quantpipe("build", recipe(tmp_path, model, True), "--artifacts", tmp_path / "art", check=False)
    assert marker.exists()


def test_doctor_shows_the_opt_in(tiny_model, tmp_path):
    model = custom_code_model(tiny_model, tmp_path / "dream")
    out = quantpipe("doctor", recipe(tmp_path, model, False), "--artifacts", tmp_path / "art", check=False).stdout
    assert "ships its own code" in out and "will not run" in out
    out = quantpipe("doctor", recipe(tmp_path, model, True), "--artifacts", tmp_path / "art", check=False).stdout
    assert "trust_remote_code: code from the model folder may run" in out
