"""TurboQuant stage: KV-cache quantization (default) or weight-only quantization.

It plugs in through the `quantpipe.stages` entry point like any third-party stage; the
algorithm lives in pipeline/stages/_turboquant.py. In KV-cache mode the weights are untouched: the
output artifact is the input checkpoint (hard-linked, so it costs no space) plus a *runtime
patch* in its metadata, which the evaluator applies to the loaded model. That generic hook is
how any stage can change how a model runs without the core knowing about it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..remote_code import trust
from .base import Artifact, ModelInfo, Stage, StageContext, StageParams


class TurboQuantParams(StageParams):
    target: Literal["kv_cache", "weights"] = "kv_cache"
    # KV cache: a preset named after vLLM's --kv-cache-dtype, optionally overridden field by field
    preset: Literal["turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"] | None = None
    key_bits: int | None = Field(None, ge=1, le=8)
    value_bits: int | None = Field(None, ge=1, le=8)
    key_method: Literal["lloyd-max", "uniform"] | None = None
    value_method: Literal["lloyd-max", "uniform"] | None = None
    qjl: bool | None = None
    norm_correction: bool | None = None
    skip_layers: list[int] | None = None
    mode: Literal["stress", "engine"] = "stress"
    seed: int = 0
    # weights
    bits: int = Field(4, ge=1, le=8)
    block_size: int = Field(128, gt=0)
    ignore: list[str] = ["lm_head"]

    def kv_config(self):
        from ._turboquant import PRESETS, KVConfig

        base = PRESETS[self.preset] if self.preset else KVConfig()
        fields = {k: v for k, v in self.model_dump().items() if k in KVConfig.__dataclass_fields__ and v is not None}
        return KVConfig(**{**base.__dict__, "skip_layers": list(base.skip_layers), **fields})

    def preset_unmodified(self) -> bool:
        overrides = ("key_bits", "value_bits", "key_method", "value_method", "qjl", "norm_correction", "skip_layers")
        return self.preset is not None and all(getattr(self, f) is None for f in overrides)


def _link_tree(src: Path, dst: Path) -> None:
    for f in src.rglob("*"):
        if f.is_file() and f.name != "manifest.json":
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


class TurboQuantStage(Stage):
    name = "turboquant"
    Params = TurboQuantParams
    libraries = ("torch", "transformers")

    @property
    def accepts(self) -> tuple[str, ...]:
        return ("hf",) if self.params.target == "weights" else ("hf", "compressed-tensors", "gptq", "awq")

    def output_format(self, input_format: str = "hf") -> str:
        return "hf" if self.params.target == "weights" else input_format

    def check(self, model: ModelInfo) -> None:
        p: TurboQuantParams = self.params
        if p.target == "weights":
            for what, width in model.input_widths():
                if width % p.block_size:
                    raise ValueError(f"block_size {p.block_size} does not divide the model's {what} ({width})")
            return
        cfg = p.kv_config()
        for i in cfg.skip_layers:
            if not -model.num_layers <= i < model.num_layers:
                raise ValueError(f"skip_layers entry {i} is outside the model's {model.num_layers} layers")
        if cfg.qjl and (cfg.key_method != "lloyd-max" or cfg.key_bits < 2):
            raise ValueError("qjl needs key_method lloyd-max and key_bits >= 2 (one bit goes to the QJL sketch)")

    def run(self, inp: Artifact, out_dir: Path, ctx: StageContext) -> Artifact:
        p: TurboQuantParams = self.params
        if p.target == "weights":
            return self._weights(inp, out_dir)
        from ._turboquant import kv_config_dict

        cfg = p.kv_config()
        cfg_json = json.loads((Path(inp.path) / "config.json").read_text())
        text = cfg_json.get("text_config", cfg_json)
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        eff = cfg.effective_bits(head_dim, text["num_hidden_layers"])
        _link_tree(Path(inp.path), out_dir)
        patches = list(inp.meta.get("runtime_patches", [])) + [
            {"entry": "pipeline.stages._turboquant:apply_kv_cache", "config": kv_config_dict(cfg)}
        ]
        label = f"KV k{cfg.key_bits}v{cfg.value_bits} {cfg.mode} ({eff:.2f} b/elt)"
        bits = f"{inp.bits or 'base weights'} + {label}"
        return Artifact(
            out_dir,
            inp.format,
            key="",
            bits=bits,
            meta={
                **inp.meta,
                "runtime_patches": patches,
                "kv_bits_per_element": round(eff, 3),
                # the same cache on vLLM: its --kv-cache-dtype preset (unmodified presets only)
                "engine_options": {"vllm": {"kv_cache_dtype": p.preset}} if p.preset_unmodified() else {},
            },
        )

    def _weights(self, inp: Artifact, out_dir: Path) -> Artifact:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ._turboquant import quantize_weight

        p: TurboQuantParams = self.params
        model = AutoModelForCausalLM.from_pretrained(inp.path, dtype="auto", **trust())
        done = []
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and not any(name.endswith(i) for i in p.ignore):
                    mod.weight.copy_(quantize_weight(mod.weight, p.bits, p.block_size, p.seed + len(done)))
                    done.append(name)
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(inp.path, **trust()).save_pretrained(out_dir)
        # Stored dequantized (no serving kernel exists for it); the metadata reproduces the codes.
        (out_dir / "turboquant.json").write_text(
            json.dumps(
                {
                    "method": "TurboQuant_mse weights (rotation + Lloyd-Max per block)",
                    "bits": p.bits,
                    "block_size": p.block_size,
                    "seed_base": p.seed,
                    "modules": done,
                },
                indent=1,
            )
        )
        eff = p.bits + 16 / p.block_size
        return Artifact(
            out_dir,
            "hf",
            key="",
            bits=f"TQ-W{p.bits} b{p.block_size} ({eff:.2f} bpw, stored dequantized)",
            meta={"turboquant_weights": {"bits": p.bits, "block_size": p.block_size}},
        )
