"""llama.cpp's HF -> GGUF converter, taken from the pinned llama-cpp-python sdist on PyPI.

The converter (convert_hf_to_gguf.py, its conversion/ package and the matching gguf-py) is not
in the llama-cpp-python wheel; it ships in the sdist under vendor/llama.cpp. We download that
sdist once (PyPI, not a model hub), extract those files into the quantpipe cache, and run the
converter in a subprocess so its imports never mix with ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from ..errors import QuantpipeError

_WRAPPER = r"""
import os, runpy, sys
from pipeline.remote_code import guard

guard()  # the converter passes trust_remote_code=True for some architectures: only the recipe decides
tool = sys.argv.pop(1)
sys.path[:0] = [tool, os.path.join(tool, "gguf-py")]
import json
import conversion.base as base
override = os.environ.get("QUANTPIPE_GGUF_PRE_TOKENIZER")
if override:
    original = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # unknown tokenizer hash: use the pre-tokenizer named in the recipe
            return override
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
owner = next(c for c in base.TextModel.__mro__ if "_set_vocab_llama_hf" in vars(c))
llama_hf = owner._set_vocab_llama_hf
def _set_vocab_llama_hf(self):
    # The converter takes any tokenizer.json BPE with byte_fallback for a SentencePiece (Llama 2)
    # vocabulary and labels it "llama". A byte-level BPE (ByteLevel pre-tokenizer, GPT-2 style)
    # with byte_fallback set, as transformers writes when it converts a GGUF's gpt2 vocabulary, is
    # not one: llama.cpp would then abort tokenizing any non-ASCII byte. Convert it as GPT-2 instead.
    path = os.path.join(self.dir_model, "tokenizer.json")
    pre = json.load(open(path, encoding="utf-8")).get("pre_tokenizer") if os.path.isfile(path) else None
    parts = (pre or {}).get("pretokenizers") or [pre or {}]
    if any(p.get("type") == "ByteLevel" for p in parts):
        raise TypeError("a byte-level BPE: converted as GPT-2")  # LlamaModel.set_vocab falls back to GPT-2
    return llama_hf(self)
owner._set_vocab_llama_hf = _set_vocab_llama_hf
sys.argv[0] = os.path.join(tool, "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def tools_dir() -> Path:
    # Shared by every quantpipe home (tests use throwaway homes): it depends only on the version.
    root = Path(os.environ.get("QUANTPIPE_TOOLS", Path.home() / ".cache" / "quantpipe" / "tools"))
    return root / f"llama.cpp-{version('llama-cpp-python')}"


def converter() -> Path:
    dest = tools_dir()
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    ver = version("llama-cpp-python")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, f"llama-cpp-python=={ver}"],
            capture_output=True,
            text=True,
        )
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if r.returncode or not sdists:
            raise QuantpipeError(f"could not fetch the llama-cpp-python {ver} sdist for its GGUF converter: {r.stderr[-300:]}")
        out = Path(tmp) / "tool"
        prefix = f"{sdists[0].name[:-7]}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(sdists[0]) as tar:
            for m in tar.getmembers():
                rel = m.name[len(prefix) :] if m.name.startswith(prefix) else None
                if rel and rel.startswith(wanted) and (m.isfile() or m.isdir()):
                    m.name = rel
                    tar.extract(m, out, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return dest


def convert(hf_dir: Path, out_file: Path, outtype: str, pre_tokenizer: str | None) -> None:
    tool = converter()
    env = dict(os.environ)
    if pre_tokenizer:
        env["QUANTPIPE_GGUF_PRE_TOKENIZER"] = pre_tokenizer
    # the wrapper is written per call (not taken from the shared tools cache), so its guard is current
    wrapper = Path(tempfile.mkdtemp(prefix="qp-convert-")) / "quantpipe_convert.py"
    wrapper.write_text(_WRAPPER)
    r = subprocess.run(
        [
            sys.executable,
            str(wrapper),
            str(tool),
            str(hf_dir),
            "--outfile",
            str(out_file),
            "--outtype",
            outtype,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    shutil.rmtree(wrapper.parent, ignore_errors=True)
    refused = [line for line in r.stderr.splitlines() if "RemoteCodeRefused:" in line]
    if refused:
        raise QuantpipeError(refused[-1].split("RemoteCodeRefused:", 1)[1].strip())
    if r.returncode or not out_file.is_file():
        tail = "\n".join(r.stderr.strip().splitlines()[-6:])
        hint = (
            " (set the stage's pre_tokenizer, e.g. gpt-2, for a tokenizer llama.cpp does not know)" if "pre-tokenizer" in r.stderr else ""
        )
        raise QuantpipeError(f"convert_hf_to_gguf failed for {hf_dir}{hint}:\n{tail}")
