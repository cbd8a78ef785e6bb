"""Shared fixtures: a tiny random Llama with a real (small, trained) BPE tokenizer, built in seconds; recipes for
it; the CLI run in this process."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data"


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.calibration import _python_docs

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_python_docs()[:300], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    # Widths are multiples of 256 so group-128 and GGUF 256-blocks fit.
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=0.04,
    )  # peaked outputs: KL means something
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"shared evaluation data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    os.environ.setdefault("QUANTPIPE_HOME", str(tmp_path_factory.mktemp("qp-home")))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def recipe_spec(model, data_dir: Path | None = None, **sections) -> dict:
    """A recipe for a tiny model as the tests write one: float32, offline, 8 calibration samples of 64 tokens, the
    smoke suite (on `data_dir` when given), one fp8 variant. `sections` replace whole top-level sections."""
    spec = {
        "name": "tiny",
        "model": {"id": str(model), "dtype": "float32"},
        "offline": True,
        "calibration": {"num_samples": 8, "seq_len": 64},
        "eval": {"suite": "smoke", **({"data_dir": str(data_dir)} if data_dir else {})},
        "variants": {"fp8": [{"stage": "fp8"}]},
    }
    return {**spec, **sections}


def write_recipe(folder: Path, model, data_dir: Path | None = None, **sections) -> Path:
    """recipe_spec written to folder/<name>.yaml."""
    spec = recipe_spec(model, data_dir, **sections)
    path = Path(folder) / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli_in_process(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`quantpipe ARGS` in this process, as main() runs the command less its set-up (log file, fd redirection): a
    QuantpipeError is exit 2 and main()'s one line. A CLI process costs seconds of imports per call; the tests that
    start real ones check main()'s wiring. Commands record settings in os.environ for their children: restored."""
    from pipeline.cli import build_parser
    from pipeline.errors import QuantpipeError

    out, err, env, here = io.StringIO(), io.StringIO(), dict(os.environ), os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                a = build_parser().parse_args([str(x) for x in args])
                rc = a.fn(a)
            except QuantpipeError as e:
                print(f"quantpipe: error: {e}", file=sys.stderr)
                rc = 2
            except SystemExit as e:  # argparse's usage errors
                rc = e.code
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())
