"""Bad input gets one clear line naming the problem (exit 2), before any work, losing nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import cli_in_process, recipe_spec

from pipeline.errors import QuantpipeError
from pipeline.models import model_info, resolve_model
from pipeline.offline_data import build_mirrors


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True)


def test_missing_dataset_file_is_named(tmp_path, data_dir):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d, ignore=shutil.ignore_patterns("test.jsonl"))  # drops every test split
    with pytest.raises(QuantpipeError, match=r"dataset file missing: .*gsm8k/test.jsonl|mmlu/test.jsonl"):
        build_mirrors(d)
    with pytest.raises(QuantpipeError, match="data directory not found"):
        build_mirrors(tmp_path / "nowhere")


def test_corrupt_mmlu_row_is_named(tmp_path, data_dir):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    (d / "mmlu" / "dev.jsonl").write_text('{"question": "q", "choices": []}\n')
    with pytest.raises(QuantpipeError, match=r"dev.jsonl:1 is not an MMLU row"):
        build_mirrors(d)


def test_corrupt_model_folder(tmp_path, tiny_model):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(QuantpipeError, match="cannot read the model config"):
        model_info(resolve_model(str(bad), offline=True))


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    """The first case through a real CLI process (main()'s one line and exit 2), the others in this process."""
    r = tmp_path / "r.yaml"
    cases = {
        "name: x\nmodel: {id: a/b}\nvariants: {v: [{stage: nope}]}\n": "unknown stage 'nope'",
        "name: x\nmodel: {id: a/b}\nvariants: {v: [{stage: gptq, bits: 'four'}]}\n": "variants.v[0].bits",
        "name: x\nmodel: {id: a/b}\nvariants: {v: [{stage: fp8}]}\ncalibration: {num_samples: 0}\n": "calibration.num_samples",
        "- just\n- a list\n": "expected a mapping",
        "name: x\nmodel: {id: a/b}\nvariants: {v: [{stage: fp8}]}\neval: {batch_size: autox}\n": "'autox' is not a positive integer",
        "name: x\nmodel: {id: ./no/such/dir}\nvariants: {v: [{stage: fp8}]}\neval: {tasks: {humaneval: null}}\n": "no config.json",
    }
    for i, (text, needle) in enumerate(cases.items()):
        r.write_text(text)
        out = (cli if i == 0 else cli_in_process)("run", r, "--artifacts", tmp_path / "art")
        assert out.returncode == 2, (text, out.stderr)
        assert needle in out.stderr and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, (needle, out.stderr)


@pytest.mark.slow  # a whole run: the fp8 stage and the smoke suite's evaluations
def test_empty_calibration_set_fails_only_that_variant(tmp_path, tiny_model, data_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "e",
                "model": {"id": str(tiny_model)},
                "offline": True,
                "calibration": {"dataset": str(empty)},
                "eval": {
                    "suite": "smoke",
                    "data_dir": str(data_dir),
                    "tasks": {"humaneval": None, "mmlu": None, "gsm8k": None, "truthfulqa_mc2": None},
                },
                "variants": {"gptq": [{"stage": "gptq"}], "fp8": [{"stage": "fp8"}]},
            }
        )
    )
    out = cli("run", recipe, "--artifacts", tmp_path / "art")
    assert out.returncode == 0, out.stderr[-2000:]
    err = json.loads((tmp_path / "art" / "e" / "gptq" / "error.json").read_text())["error"]
    assert "is empty" in err
    assert (tmp_path / "art" / "e" / "fp8" / "eval" / "truthfulqa_mc1" / "manifest.json").is_file()


def test_doctor_reports_missing_opt_in_and_passes_with_it(tmp_path, tiny_model, data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_spec(tiny_model, data_dir, name="d", offline=False)))
    out = cli_in_process("doctor", recipe, "--artifacts", tmp_path / "art")
    assert out.returncode == 1 and "FAIL HumanEval" in out.stdout and "--allow-code-execution" in out.stdout
    out = cli_in_process("doctor", recipe, "--artifacts", tmp_path / "art", "--allow-code-execution")
    assert out.returncode == 0 and "ready" in out.stdout and "all files present" in out.stdout


def _good(tiny_model, data_dir) -> dict:
    return recipe_spec(tiny_model, name="x", eval={"suite": "smoke", "data_dir": str(data_dir), "tasks": {"humaneval": None}})


def test_hostile_recipes_get_one_line_and_exit_2_from_validate(tmp_path, tiny_model, data_dir):
    """The attack's crash list: each is refused by `validate` (which checks what `run` checks) with
    one line, before any work (in this process: the CLI's own one line is test_cli_errors_are_one_line_without_traceback's)."""
    good = _good(tiny_model, data_dir)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    cases = {
        b"\xff\xfe name: x\n": "not UTF-8",
        bomb.encode(): "aliases",
        b"name: x\nname: y\nmodel: {id: a/b}\nvariants: {v: [{stage: fp8}]}\n": "duplicate key 'name'",
        b"name: x\nmodel: {id: a/b}\nvariants: {v: [{stage: fp8}], v: [{stage: gptq}]}\n": "duplicate key 'v'",
        yaml.safe_dump({**good, "calibration": {"seq_len": 10**12}}).encode(): "calibration.seq_len",
        yaml.safe_dump({**good, "variants": {"g": [{"stage": "gptq", "group_size": 0}]}}).encode(): "group_size",
        yaml.safe_dump({**good, "variants": {"g": [{"stage": "gptq", "group_size": -8}]}}).encode(): "group_size",
        yaml.safe_dump({**good, "eval": {**good["eval"], "suite": "../../etc/passwd"}}).encode(): "eval.suite",
        yaml.safe_dump({**good, "eval": {**good["eval"], "data_dir": str(tmp_path / "nowhere")}}).encode(): "data directory not found",
        yaml.safe_dump({**good, "eval": {**good["eval"], "tasks": {"mmlu": {"limit": 10**30}}}}).encode(): "eval.tasks.mmlu.limit",
        yaml.safe_dump({**good, "variants": {"run.lock": [{"stage": "fp8"}]}}).encode(): "reserved",
        yaml.safe_dump({**good, "variants": {"recipe.json": [{"stage": "fp8"}]}}).encode(): "reserved",
        yaml.safe_dump({**good, "variants": {"report": [{"stage": "fp8"}]}}).encode(): "reserved",
        yaml.safe_dump({**good, "variants": {"v" * 250: [{"stage": "fp8"}]}}).encode(): "at most 64 characters",
        yaml.safe_dump({**good, "name": "n" * 300}).encode(): "at most 64 characters",
    }
    r = tmp_path / "r.yaml"
    for text, needle in cases.items():
        r.write_bytes(text)
        out = cli_in_process("validate", r, "--artifacts", tmp_path / "art")
        assert out.returncode == 2, (needle, out.stdout, out.stderr[-500:])
        assert needle in out.stderr and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, (needle, out.stderr)
        assert not (tmp_path / "art" / "x").exists()


def test_garbled_data_and_garbage_weights_are_named_before_any_work(tmp_path, tiny_model, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    with open(data / "truthfulqa" / "multiple_choice" / "validation.jsonl", "a") as f:
        f.write('{"question": "cut here\n')
    r = tmp_path / "r.yaml"
    r.write_text(
        yaml.safe_dump({**_good(tiny_model, data_dir), "eval": {"suite": "smoke", "data_dir": str(data), "tasks": {"humaneval": None}}})
    )
    out = cli_in_process("run", r, "--artifacts", tmp_path / "art")
    assert out.returncode == 2 and "validation.jsonl:818 is not a JSON object per line" in out.stderr, out.stderr[-800:]
    assert "Traceback" not in out.stderr and not (tmp_path / "art" / "x" / "fp8").exists()
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    r.write_text(yaml.safe_dump({**_good(model, data_dir)}))
    out = cli_in_process("run", r, "--artifacts", tmp_path / "art")
    assert out.returncode == 2 and "not a readable safetensors file" in out.stderr and "Traceback" not in out.stderr, out.stderr[-800:]


def test_suite_that_is_not_a_mapping_is_refused(tmp_path, monkeypatch):
    from pipeline import recipe

    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "list-suite.yaml").write_text("- mmlu\n- gsm8k\n")
    monkeypatch.setattr(recipe, "EVALS_DIR", tmp_path)  # suites are read from EVALS_DIR/suites: a scratch one, not the repository's
    with pytest.raises(QuantpipeError, match="list-suite.yaml is not a suite"):
        recipe.load_suite("list-suite")
