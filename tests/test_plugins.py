"""A stage from a separate, throwaway distribution plugs in through its own entry point and runs
in a recipe, exactly as TurboQuant and the built-in stages do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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


def test_third_party_stage_via_entry_point(tiny_model, data_dir, tmp_path):
    src = tmp_path / "src"
    (src / "qp_round_stage").mkdir(parents=True)
    (src / "qp_round_stage" / "__init__.py").write_text(PLUGIN)
    (src / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "qp-round-stage"
        version = "0.0.1"
        [project.entry-points."quantpipe.stages"]
        round-bf16 = "qp_round_stage:RoundStage"
        [tool.setuptools]
        packages = ["qp_round_stage"]
    """)
    )
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(src)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

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
