"""A stage from a separate, throwaway distribution plugs in through its own entry point and runs
in a recipe, exactly as TurboQuant and the built-in stages do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow

PLUGIN = '''
"""Round every Linear weight to bfloat16 and back: a real (if mild) weight quantizer."""
from pathlib import Path

from pipeline.stages.base import Artifact, Stage, StageParams


class RoundParams(StageParams):
    dtype: str = "bfloat16"


class RoundStage(Stage):
    name = "round-bf16"
    Params = RoundParams
    libraries = ("torch",)

    def run(self, inp, out_dir: Path, ctx):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(inp.path, dtype=torch.float32)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(m.weight.to(getattr(torch, self.params.dtype)).float())
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(inp.path).save_pretrained(out_dir)
        return Artifact(out_dir, "hf", key="", bits="W16-bf16-rounded")
'''


def install_plugin(tmp_path, name: str, package: str, source: str, entry_points: str, version: str = "0.0.1") -> dict:
    """Install a throwaway distribution into its own folder; the environment that sees it."""
    src = tmp_path / f"src-{name}-{version}"
    (src / package).mkdir(parents=True)
    (src / package / "__init__.py").write_text(source)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n{entry_points}\n[tool.setuptools]\npackages = ["{package}"]\n'
    )
    site = tmp_path / f"site-{name}-{version}"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(src)],
        check=True,
        capture_output=True,
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_third_party_stage_via_entry_point(tiny_model, data_dir, tmp_path):
    env = install_plugin(
        tmp_path,
        "qp-round-stage",
        "qp_round_stage",
        PLUGIN,
        '[project.entry-points."quantpipe.stages"]\nround-bf16 = "qp_round_stage:RoundStage"\n',
    )

    stages = subprocess.run([sys.executable, "-m", "pipeline.cli", "stages"], env=env, capture_output=True, text=True)
    assert "round-bf16" in stages.stdout and "qp-round-stage" in stages.stdout
    without = subprocess.run([sys.executable, "-m", "pipeline.cli", "stages"], capture_output=True, text=True)
    assert "round-bf16" not in without.stdout  # nothing but the installed distribution adds it

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "plug",
                "model": {"id": str(tiny_model), "dtype": "float32"},
                "offline": True,
                "eval": {"suite": "smoke", "data_dir": str(data_dir), "tasks": {"humaneval": None, "gsm8k": None, "mmlu": None}},
                "variants": {
                    "rounded": [{"stage": "round-bf16"}],
                    "rounded-then-tq": [
                        {"stage": "round-bf16"},
                        {"stage": "turboquant", "preset": "turboquant_3bit_nc", "skip_layers": []},
                    ],
                },
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--artifacts", str(tmp_path / "art")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((tmp_path / "art" / "plug" / "report" / "degradation.json").read_text())
    rows = {r["name"]: r for r in t["rows"]}
    assert rows["rounded"]["bits"] == "W16-bf16-rounded" and rows["rounded"]["cells"]["TruthfulQA"]["n"] == 3
    assert "TurboQuant KV k3/v3" in rows["rounded-then-tq"]["evaluated_as"]
    # without the plugin installed, the same recipe is refused before any work, naming the stage
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(recipe)], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown stage 'round-bf16'" in bad.stderr


FORMAT_PLUGIN = '''
"""A stage that writes its own artifact format, and the backend that evaluates it."""
import json
from pathlib import Path

from pipeline.backends.base import Backend, LoadedModel
from pipeline.stages.base import Artifact, Stage, StageParams


class HalfStage(Stage):
    name = "half-folder"
    Params = StageParams
    libraries = ("torch",)

    def output_format(self, input_format="hf"):
        return "half-folder"

    def run(self, inp, out_dir: Path, ctx):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(inp.path, dtype=torch.float32)
        torch.save({k: v.half() for k, v in model.state_dict().items()}, out_dir / "weights.pt")
        model.config.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(inp.path).save_pretrained(out_dir)
        (out_dir / "half.json").write_text(json.dumps({"dtype": "float16"}))
        return Artifact(out_dir, "half-folder", key="", bits="W16-fp16 (plug-in format)")


class HalfBackend(Backend):
    name = "half-backend"
    formats = ("half-folder",)

    def load(self, art, dtype, batch_size, max_length):
        import torch
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(art.path), dtype=torch.float32)
        model.load_state_dict({k: v.float() for k, v in torch.load(art.path / "weights.pt").items()})
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(art.path), batch_size=batch_size, device="cpu")
        return LoadedModel(lm, "fp16 weights through the half-backend plug-in", "plug-in", self)

    def next_token_logprobs(self, loaded, ids, rows):
        import torch

        with torch.no_grad():
            logits = loaded.lm.model(torch.tensor([ids])).logits[0, :-1]
        return torch.log_softmax(logits.double(), dim=-1).numpy()
'''


def test_third_party_backend_via_entry_point_evaluates_a_new_format(tiny_model, data_dir, tmp_path):
    stage_ep = '[project.entry-points."quantpipe.stages"]\nhalf-folder = "qp_half:HalfStage"\n'
    backend_ep = '[project.entry-points."quantpipe.backends"]\nhalf-backend = "qp_half:HalfBackend"\n'
    with_backend = install_plugin(tmp_path, "qp-half-both", "qp_half", FORMAT_PLUGIN, stage_ep + backend_ep)
    stage_only = install_plugin(tmp_path, "qp-half-stage", "qp_half", FORMAT_PLUGIN, stage_ep)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "half",
                "model": {"id": str(tiny_model), "dtype": "float32"},
                "offline": True,
                "eval": {"suite": "smoke", "data_dir": str(data_dir), "tasks": {"humaneval": None, "gsm8k": None, "mmlu": None}},
                "variants": {"half": [{"stage": "half-folder"}]},
            }
        )
    )
    listed = subprocess.run([sys.executable, "-m", "pipeline.cli", "backends"], env=with_backend, capture_output=True, text=True)
    assert "half-backend" in listed.stdout and "half-folder" in listed.stdout and "qp-half-both" in listed.stdout
    # a stage whose format no backend evaluates is refused before any work, naming the format
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--artifacts", str(tmp_path / "a1")],
        env=stage_only,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no evaluation backend for artifact format 'half-folder'" in r.stderr
    assert not (tmp_path / "a1" / "half" / "half").exists()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--artifacts", str(tmp_path / "a2")],
        env=with_backend,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((tmp_path / "a2" / "half" / "report" / "degradation.json").read_text())
    row = {x["name"]: x for x in t["rows"]}["half"]
    assert row["evaluated_as"] == "fp16 weights through the half-backend plug-in" and row["cells"]["TruthfulQA"]["n"] == 3
    assert 0 <= row["divergence"]["docs"]["mean_kl"] < 0.01  # KL through the plug-in's next_token_logprobs


COPY = '''
"""A stage that only copies the base weights (what a careless or hostile plug-in might call fp8)."""
import shutil

from pipeline.stages.base import Artifact, Stage, StageParams


class CopyStage(Stage):
    name = "NAME"
    Params = StageParams

    def run(self, inp, out_dir, ctx):
        shutil.copytree(inp.path, out_dir, dirs_exist_ok=True)
        return Artifact(out_dir, "hf", key="", bits="copy")
'''

BACKEND = """
from pipeline.backends.base import Backend


class PlugBackend(Backend):
    name = "plug-hf"
    formats = ("hf",)
    engine = "ENGINE"
"""


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], env=env, capture_output=True, text=True)


def test_a_plugin_may_not_reuse_a_builtin_stage_name(tmp_path):
    env = install_plugin(
        tmp_path,
        "qp-evil",
        "qp_evil",
        COPY.replace("NAME", "fp8"),
        '[project.entry-points."quantpipe.stages"]\nfp8 = "qp_evil:CopyStage"\n',
    )
    r = cli("stages", env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "stage 'fp8' is registered twice" in r.stderr and "quantpipe" in r.stderr and "qp-evil" in r.stderr


def test_a_plugin_backend_for_a_builtin_format_is_used_only_for_its_own_engine(tmp_path):
    pick = "from pipeline.backends import backend_for; import sys; print(backend_for('hf', sys.argv[1]).__name__)"
    for engine, expect in (("default", "TransformersBackend"), ("plug", "PlugBackend")):
        env = install_plugin(
            tmp_path,
            f"qp-plug-{engine}",
            "qp_plug",
            BACKEND.replace("ENGINE", engine),
            '[project.entry-points."quantpipe.backends"]\nplug-hf = "qp_plug:PlugBackend"\n',
        )
        r = subprocess.run([sys.executable, "-c", pick, engine], env=env, capture_output=True, text=True)
        assert r.stdout.strip() == expect, r.stderr
    r = subprocess.run([sys.executable, "-c", pick, "nope"], capture_output=True, text=True)
    assert "unknown eval engine 'nope'" in r.stderr


def test_broken_plugins_are_one_line_naming_their_distribution_and_unused_ones_are_not_imported(tiny_model, data_dir, tmp_path):
    broken = "raise RuntimeError('plug-in bug')\n"
    env = install_plugin(
        tmp_path,
        "qp-broken",
        "qp_broken",
        broken,
        '[project.entry-points."quantpipe.backends"]\nbroken-be = "qp_broken:B"\n'
        '[project.entry-points."quantpipe.stages"]\nbroken-st = "qp_broken:S"\n',
    )
    r = cli("backends", env=env)
    assert r.returncode == 0 and "UNUSABLE" in r.stdout and "qp-broken" in r.stdout and "transformers" in r.stdout
    spec = {
        "name": "b",
        "model": {"id": str(tiny_model), "dtype": "float32"},
        "offline": True,
        "eval": {"suite": "smoke", "data_dir": str(data_dir)},
    }
    fine, bad = tmp_path / "fine.yaml", tmp_path / "bad.yaml"
    fine.write_text(yaml.safe_dump({**spec, "variants": {"f": [{"stage": "fp8"}]}}))
    bad.write_text(yaml.safe_dump({**spec, "variants": {"x": [{"stage": "broken-st"}]}}))
    # everything `run` checks before any work, backends included: the broken backend is never imported
    r = cli("validate", fine, "--artifacts", tmp_path / "art", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("validate", bad, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "qp-broken" in r.stderr and "plug-in bug" in r.stderr and "internal error" not in r.stderr


def test_a_stage_key_names_the_distribution_that_built_it(tiny_model, tmp_path):
    """The same stage name and parameters from another implementation never reuses the first one's record."""
    recipe = tmp_path / "r.yaml"
    spec = {"name": "c", "model": {"id": str(tiny_model), "dtype": "float32"}, "offline": True, "variants": {"c": [{"stage": "copy"}]}}
    recipe.write_text(yaml.safe_dump(spec))
    outs, envs = [], {}
    for version in ("0.0.1", "0.0.1", "0.0.2"):
        if version not in envs:
            ep = '[project.entry-points."quantpipe.stages"]\ncopy = "qp_copy:CopyStage"\n'
            envs[version] = install_plugin(tmp_path, "qp-copy", "qp_copy", COPY.replace("NAME", "copy"), ep, version)
        env = envs[version]
        r = cli("build", recipe, "--artifacts", tmp_path / "art", env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append([line for line in r.stderr.splitlines() if "build c[0] copy" in line][0])
    assert not outs[0].endswith("reused") and outs[1].endswith("reused") and not outs[2].endswith("reused"), outs
