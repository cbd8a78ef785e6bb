"""Recipe validation: every broken recipe fails before any work, naming the field."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import QuantpipeError, RecipeError
from pipeline.evaluation import resolve_tasks
from pipeline.models import model_info, resolve_model
from pipeline.recipe import check_against_model, load_recipe, parse_recipe

GOOD = {
    "name": "t",
    "model": {"id": "org/model"},
    "eval": {"suite": "smoke"},
    "variants": {
        "fp8": [{"stage": "fp8", "scheme": "FP8_DYNAMIC"}],
        "awq": [{"stage": "awq", "bits": 4, "group_size": 128}],
        "gptq": [{"stage": "gptq", "bits": 4, "group_size": 128, "backend": "gptqmodel"}],
    },
}


def bad(mutate) -> RecipeError:
    data = copy.deepcopy(GOOD)
    mutate(data)
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    return e.value


def test_good_recipe_parses_and_repo_recipes_validate():
    r = parse_recipe(copy.deepcopy(GOOD))
    assert [s.name for s in r.stages("gptq")] == ["gptq"]
    assert r.stages("gptq")[0].params.backend == "gptqmodel"
    r = load_recipe("recipes/smollm2-135m.yaml")
    batch, tasks = resolve_tasks(r)
    assert set(tasks) == {"mmlu", "humaneval", "gsm8k", "truthfulqa_mc1", "truthfulqa_mc2"}
    assert r.data_dir().name == "data"
    # lm-eval's stock mmlu is 0-shot: the suites that report MMLU 5-shot must say so explicitly,
    # and a recipe override of the limit keeps it
    assert tasks["mmlu"].num_fewshot == 5
    full = parse_recipe(copy.deepcopy(GOOD) | {"eval": {"suite": "full", "tasks": {"mmlu": {"limit": 3}}}})
    assert resolve_tasks(full)[1]["mmlu"].num_fewshot == 5


def test_unknown_stage_names_field_and_registered_stages():
    e = bad(lambda d: d["variants"].update(x=[{"stage": "fp4-magic"}]))
    assert e.field == "variants.x[0].stage"
    assert "fp4-magic" in str(e) and "gptq" in str(e)


def test_bad_parameter_value_and_unknown_parameter():
    e = bad(lambda d: d["variants"]["awq"][0].update(bits=3))
    assert e.field == "variants.awq[0].bits"
    e = bad(lambda d: d["variants"]["fp8"][0].update(schema="FP8"))
    assert e.field == "variants.fp8[0].schema" and "unknown key" in str(e)


def test_unknown_top_level_key_and_missing_model():
    assert bad(lambda d: d.update(modle="x")).field == "modle"
    assert bad(lambda d: d.pop("model")).field == "model"


def test_empty_variant_and_reserved_name():
    assert "no stages" in str(bad(lambda d: d["variants"].update(empty=[])))
    assert "reserved" in str(bad(lambda d: d["variants"].update(base=[{"stage": "fp8"}])))


def test_stage_order_that_cannot_work():
    # fp8 consumes an HF checkpoint; a compressed-tensors output cannot be re-quantized by it.
    e = bad(lambda d: d["variants"].update(chain=[{"stage": "gptq"}, {"stage": "fp8"}]))
    assert e.field == "variants.chain[1].stage" and "reorder" in str(e)


@pytest.mark.parametrize(
    "source", ["openai/gsm8k", "cais/mmlu", "../shared/data/gsm8k/train.jsonl", "/data/truthfulqa/generation/validation.jsonl"]
)
def test_calibration_on_evaluation_data_is_refused(source):
    e = bad(lambda d: d.update(calibration={"dataset": source}))
    assert e.field == "calibration.dataset" and "evaluation set" in str(e)


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(QuantpipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(QuantpipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_suite_and_task():
    r = parse_recipe(copy.deepcopy(GOOD) | {"eval": {"suite": "nope"}})
    with pytest.raises(RecipeError, match="no suite 'nope'"):
        resolve_tasks(r)
    r = parse_recipe(copy.deepcopy(GOOD) | {"eval": {"suite": "smoke", "tasks": {"hellaswag": {"limit": 2}}}})
    with pytest.raises(RecipeError, match="unsupported task"):
        resolve_tasks(r)


def test_recipe_overrides_suite_and_null_drops_task():
    r = parse_recipe(
        copy.deepcopy(GOOD) | {"eval": {"suite": "smoke", "batch_size": 2, "tasks": {"gsm8k": {"limit": 5}, "humaneval": None}}}
    )
    batch, tasks = resolve_tasks(r)
    assert batch == 2 and "humaneval" not in tasks
    assert tasks["gsm8k"].limit == 5 and tasks["gsm8k"].max_gen_toks == 16  # suite value kept


def test_batch_size_is_a_positive_integer_or_auto_and_the_budget_needs_auto(tmp_path):
    for value in (0, -4, "autox", True, 2.5, "eight"):
        e = bad(lambda d, v=value: d["eval"].update(batch_size=v))
        assert e.field == "eval.batch_size" and "not a positive integer or 'auto'" in str(e), (value, e)
    e = bad(lambda d: d["eval"].update(batch_size=8, memory_budget_gib=2))
    assert "memory_budget_gib applies only to batch_size: auto" in str(e)
    assert bad(lambda d: d["eval"].update(batch_size="auto", memory_budget_gib=-1)).field == "eval.memory_budget_gib"
    r = parse_recipe(copy.deepcopy(GOOD) | {"eval": {"suite": "smoke", "batch_size": "auto", "memory_budget_gib": 1.5}})
    assert resolve_tasks(r)[0] == "auto" and r.eval.memory_budget_gib == 1.5
    assert parse_recipe(copy.deepcopy(GOOD) | {"eval": {"suite": "smoke", "batch_size": "3"}}).eval.batch_size == 3  # as before


def test_fixed_batch_size_keeps_its_settings_and_auto_keys_its_budget(tmp_path):
    """The evaluation key's settings: a fixed batch size has exactly the fields it always had (stored
    results stay valid); auto adds its budget, so another budget is another key."""
    from pipeline.evaluation import Evaluator

    def settings(**ev):
        r = parse_recipe(copy.deepcopy(GOOD) | {"eval": {"suite": "smoke", "tasks": {"humaneval": None}, **ev}})
        return Evaluator(r, tmp_path / str(len(list(tmp_path.iterdir()))), False).settings("gsm8k")

    fixed = settings(batch_size=8)
    assert set(fixed) == {"task", "limit", "samples", "num_fewshot", "max_gen_toks", "batch_size", "lm_eval", "seeds", "data"}.union(
        {"task_config", "engine"}
    )
    assert fixed["batch_size"] == 8 and settings()["batch_size"] == 4  # the smoke suite's
    auto, one, two = (
        settings(batch_size="auto"),
        settings(batch_size="auto", memory_budget_gib=1),
        settings(batch_size="auto", memory_budget_gib=2),
    )
    assert auto["batch_size"] == "auto" and auto["memory_budget_gib"] is None and one["memory_budget_gib"] == 1
    assert len({json.dumps(x, sort_keys=True) for x in (fixed, auto, one, two)}) == 4
    with pytest.raises(QuantpipeError, match="memory_budget_gib is not used by engine vllm"):
        settings(batch_size="auto", memory_budget_gib=1, engine="vllm")


def test_model_checks(tiny_model, tmp_path):
    with pytest.raises(QuantpipeError, match="no config.json"):
        resolve_model(str(tmp_path / "missing-model"), offline=True)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # a truncated GGUF: refused before transformers reads it
    with pytest.raises(QuantpipeError, match="m.gguf is not a readable GGUF file"):
        resolve_model(str(tmp_path / "m.gguf"), offline=True)
    (tmp_path / "notok").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "notok" / f).write_bytes((tiny_model / f).read_bytes())
    with pytest.raises(QuantpipeError, match="no tokenizer"):
        resolve_model(str(tmp_path / "notok"), offline=True)
    with pytest.raises(QuantpipeError, match="not in the local HF cache"):
        resolve_model("nobody/no-such-model", offline=True)


def test_group_size_must_divide_layer_widths(tiny_model):
    info = model_info(tiny_model)  # hidden 256, intermediate 512
    r = parse_recipe(copy.deepcopy(GOOD) | {"variants": {"g": [{"stage": "gptq", "group_size": 96}]}})
    with pytest.raises(RecipeError) as e:
        check_against_model(r, info)
    assert e.value.field == "variants.g[0]" and "does not divide" in str(e.value) and "256" in str(e.value)
    ok = parse_recipe(copy.deepcopy(GOOD) | {"variants": {"g": [{"stage": "gptq", "group_size": 64}]}})
    check_against_model(ok, info)


# Generated recipes: the validator answers with a RecipeError/QuantpipeError or a Recipe, never a traceback.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.text(max_size=8), st.floats(allow_nan=False))
values = st.recursive(
    scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)), max_leaves=8
)
stage_specs = st.fixed_dictionaries(
    {"stage": st.one_of(st.sampled_from(["fp8", "awq", "gptq", "nope"]), scalars)},
    optional={"bits": values, "group_size": values, "scheme": values, "backend": values, "junk": values},
)
recipes = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.text(max_size=10), scalars),
        "model": st.one_of(st.fixed_dictionaries({"id": st.text(max_size=10)}, optional={"dtype": values}), values),
        "variants": st.one_of(
            st.dictionaries(st.text(max_size=6), st.one_of(st.lists(stage_specs, max_size=3), values), max_size=3), values
        ),
        "calibration": st.one_of(st.fixed_dictionaries({}, optional={"dataset": st.text(max_size=12), "num_samples": values}), values),
        "eval": values,
        "extra": values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(recipes, values))
def test_validator_never_tracebacks(data):
    try:
        r = parse_recipe(data)
    except QuantpipeError:
        return
    assert r.variants  # anything accepted is a usable recipe
    for name in r.variants:
        r.stages(name)


def test_repo_recipe_survives_a_yaml_roundtrip_of_its_validated_form():
    """Dump the validated recipe back to YAML and parse that: nothing is lost or changed (stage
    params, gate, eval settings), so recipe.json and Ray workers rebuild the same recipe."""
    first = parse_recipe(yaml.safe_load(open("recipes/smollm2-135m.yaml")))
    again = parse_recipe(yaml.safe_load(yaml.safe_dump(first.model_dump(mode="json"))))
    assert again.model_dump() == first.model_dump()
    assert again.variants["gptq-4bit"][0].params_dict() == {"bits": 4, "group_size": 64}
    assert [s.stage for s in again.variants["awq+tq-kv-3.5bit"]] == ["awq", "turboquant"]


def test_builtin_calibration_corpus_does_not_depend_on_what_the_process_imported():
    """A Ray worker, a CLI run and a test import different libraries first; the calibration text
    (and so every calibrated artifact) must be the same in each."""
    import subprocess
    import sys

    code = (
        "import sys, hashlib; {pre}; from pipeline.calibration import _python_docs; "
        "print(hashlib.sha256(repr(_python_docs()).encode()).hexdigest())"
    )
    plain = subprocess.run([sys.executable, "-c", code.format(pre="pass")], capture_output=True, text=True, check=True)
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            code.format(pre="import email.feedparser, logging.handlers, typing; typing._collect_parameters = lambda a: ()"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert plain.stdout.strip() and plain.stdout == loaded.stdout


def test_calibrated_stage_keys_follow_the_calibration_text(tmp_path):
    from pipeline.calibration import calibration_fingerprint
    from pipeline.recipe import parse_recipe

    text = tmp_path / "calib.txt"
    text.write_text("some calibration text\n")
    recipe = parse_recipe(
        {
            "name": "x",
            "model": {"id": "m"},
            "calibration": {"dataset": str(text)},
            "variants": {"g": [{"stage": "gptq"}], "f": [{"stage": "fp8"}]},
        }
    )
    before = calibration_fingerprint(recipe)
    text.write_text("other calibration text\n")
    assert calibration_fingerprint(recipe) != before
    assert recipe.stages("g")[0].uses_calibration() and not recipe.stages("f")[0].uses_calibration()
