"""A GGUF file as the base model: dequantized once by transformers into a cached HF checkpoint.

A llama.cpp user has a `.gguf` file (or a split model, `name-00001-of-0000N.gguf`). Stages take
HF checkpoints, so the file is loaded with transformers (`gguf_file=`, dequantized to FP32) and
saved as a plain checkpoint under `~/.cache/quantpipe/models/gguf/<content key>/`, once per file
content (a renamed or moved file is not converted again). Two things make such a checkpoint usable
by every stage, and both are checked here rather than left to fail late:

- transformers keeps `quantization_config: {quant_method: gguf}` in the config of a model it loaded
  from a GGUF; saved as is, llm-compressor refuses it ("already quantized in a different format")
  and llama.cpp's converter too ("Quant method is not yet supported"). The saved checkpoint drops it
  (the weights are plain FP32 tensors by then), and a folder that still has it is refused as
  `model.id` with one line saying to give the .gguf file instead;
- transformers converts the GGUF's tokenizer itself, and can get it wrong: the conversion must
  tokenize like llama.cpp's own tokenizer of the file (`tokenizer_check.py`), or it is refused.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import QuantpipeError
from .store import content_key, file_sha256s, read_json

CONVERSION = 1  # the saved checkpoint's layout; a change converts every GGUF base again
SHARD = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")  # per-shard bookkeeping of gguf-split


def gguf_shards(path: Path) -> list[Path]:
    """The files of a GGUF model in order: the file itself, or every shard of a split model (any
    of its shards may be named). Missing files are refused."""
    m = SHARD.match(path.name)
    files = [path] if not m else [path.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, int(m["count"]) + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        what = f"split GGUF {path.parent / m['stem']}-*-of-{m['count']}.gguf" if m else "GGUF file"
        raise QuantpipeError(f"{what}: not found: {', '.join(missing)} (in {path.parent})")
    import gguf

    for f in files:  # the header and tensor index only (memory-mapped): a truncated or foreign file fails here
        try:
            gguf.GGUFReader(f)
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct errors, IndexError...
            raise QuantpipeError(f"{f} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    return files


def is_gguf_quantized_folder(folder: Path) -> bool:
    """A checkpoint saved from a model transformers loaded with gguf_file= without dropping its
    quantization_config: no stage can take it."""
    cfg = read_json(folder / "config.json") or {}
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gguf"


def merge_shards(shards: list[Path], out: Path) -> Path:
    """One GGUF from the shards of a split model (transformers reads single files only): the first
    shard's metadata without the split keys, then every shard's tensors, bytes unchanged."""
    import gguf

    readers = [gguf.GGUFReader(s) for s in shards]
    first = readers[0]
    arch = first.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out, arch, endianess=first.endianess)
    for field in first.fields.values():
        if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE, *SPLIT_KEYS):
            continue
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = field.contents()
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    tensors = [t for r in readers for t in r.tensors]
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=first.endianess)
    writer.close()
    return out


@contextmanager
def alone(gguf_file: Path):
    """The file, linked into an empty folder: transformers given gguf_file= also reads tokenizer and
    config files beside it (the GGUF stage's output has them), and the conversion must depend on
    the file's content only, as its cache key does."""
    with tempfile.TemporaryDirectory(prefix="qp-gguf-") as tmp:
        link = Path(tmp) / gguf_file.name
        link.symlink_to(gguf_file.resolve())
        yield link


def tokenizer_from_gguf(gguf_file: Path):
    """transformers' conversion of a GGUF's tokenizer, checked against llama.cpp's tokenization of
    the same file (the conversion can silently produce a character-level tokenizer)."""
    from transformers import AutoTokenizer

    from .tokenizer_check import check_gguf_tokenizer

    try:
        with alone(gguf_file) as link:
            tok = AutoTokenizer.from_pretrained(link.parent, gguf_file=link.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a vocabulary it cannot convert
        raise QuantpipeError(f"transformers cannot convert the tokenizer of {gguf_file}: {type(e).__name__}: {e}") from e
    check_gguf_tokenizer(gguf_file, tok, f"transformers' conversion of the tokenizer of {gguf_file.name}")
    return tok


def check_saved_tokenizer(gguf_file: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    from .tokenizer_check import check_gguf_tokenizer

    check_gguf_tokenizer(gguf_file, AutoTokenizer.from_pretrained(folder), f"the tokenizer saved in {folder}")


def gguf_file_type(gguf_file: Path) -> str | None:
    """The file's general.file_type as llama.cpp names it (Q4_K_M, Q8_0, ...): the grid its weights lie on."""
    import gguf

    field = gguf.GGUFReader(gguf_file).fields.get(gguf.Keys.General.FILE_TYPE)
    if field is None:
        return None
    try:
        return gguf.LlamaFileType(field.contents()).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(field.contents())


def dequantize(gguf_file: Path, dest: Path, source: dict) -> Path:
    """Load `gguf_file` with transformers (FP32), check its tokenizer, and save a plain HF checkpoint
    at `dest` (written under a temporary name, then renamed into place), with `source` (where the
    file came from) in quantpipe-source.json."""
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.tmp-") as tmp:
        print(f"[models] converting {gguf_file.name} to an HF checkpoint (FP32) ...", file=sys.stderr)
        tok = tokenizer_from_gguf(gguf_file)  # first: a bad tokenizer is refused before the weights are converted
        try:
            with alone(gguf_file) as link:
                model = AutoModelForCausalLM.from_pretrained(link.parent, gguf_file=link.name, dtype="float32")
        except Exception as e:  # noqa: BLE001 - e.g. an architecture transformers' GGUF loader does not know
            raise QuantpipeError(f"transformers cannot load the weights of {gguf_file}: {type(e).__name__}: {e}") from e
        # The weights are now plain FP32 tensors: drop the GGUF loader so save_pretrained writes them as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = Path(tmp) / "checkpoint"
        model.save_pretrained(out)
        del model
        tok.save_pretrained(out)
        if is_gguf_quantized_folder(out):  # what every stage would refuse: never cached
            raise QuantpipeError(f"the checkpoint converted from {gguf_file.name} still has quantization_config gguf")
        check_saved_tokenizer(gguf_file, out)  # what evaluation will load: saving must not have changed it
        source = {**source, "file_type": gguf_file_type(gguf_file), "transformers": version("transformers"), "conversion": CONVERSION}
        (out / "quantpipe-source.json").write_text(json.dumps(source, indent=1, sort_keys=True) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        try:
            out.rename(dest)
        except OSError:  # another process converted the same file meanwhile: use its checkpoint
            if not (dest / "config.json").is_file():
                raise
    return dest


def gguf_base(path: Path, cache: Path) -> Path:
    """The HF checkpoint of a GGUF model file (or split model) under `cache`, converted on first use."""
    shards = gguf_shards(path)
    digests = file_sha256s(shards)
    shas = [digests[s.resolve()] for s in shards]
    dest = cache / content_key(CONVERSION, shas)
    if (dest / "config.json").is_file():
        return dest
    source = {"gguf": [s.name for s in shards], "sha256": shas}
    if len(shards) == 1:
        return dequantize(shards[0].resolve(), dest, source)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".merge-") as tmp:
        print(f"[models] merging the {len(shards)} shards of {path.name} ...", file=sys.stderr)
        merged = merge_shards(shards, Path(tmp) / SHARD.sub(r"\g<stem>.gguf", shards[0].name))
        return dequantize(merged, dest, source)
