"""Distribution distance of a variant to the base on fixed text: mean KL per token, top-1 token
agreement ("same top p" in llama.cpp's terms) and the perplexity ratio.

The base's full logits are never stored (llama.cpp's KL mode keeps all of them: 37 GiB for
Llama-3 on wikitext-2). For each position we keep the base's top-K log-probs (K=64) and the
log-prob of the actual next token. KL is computed on the distribution coarsened to those K
tokens plus one "rest" bucket; by the data-processing inequality this never exceeds the true KL
and is within a hair of it when the top-64 hold nearly all the mass (their mass is reported).

Texts: `docs` — docstrings of standard-library modules that are *not* in the calibration corpus;
`prompts` — benchmark questions (GSM8K test, TruthfulQA) from the data directory, when given.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .calibration import stdlib_docstrings

TOP_K = 64
CHUNK = 256  # tokens per window
# Disjoint from calibration._DOC_MODULES: KL is not measured on what the quantizers calibrated on.
_KL_MODULES = (
    "difflib",
    "heapq",
    "bisect",
    "random",
    "shutil",
    "tempfile",
    "inspect",
    "doctest",
    "pickle",
    "enum",
    "dataclasses",
    "contextlib",
    "operator",
    "codecs",
    "gzip",
    "hashlib",
)


def corpus(data_dir: Path | None, max_docs: int = 32) -> dict[str, str]:
    docs = stdlib_docstrings(_KL_MODULES, 300)
    out = {"docs": "\n\n".join(docs[:max_docs])}
    if data_dir is not None and (Path(data_dir) / "gsm8k" / "test.jsonl").is_file():
        qs = [json.loads(x)["question"] for x in (Path(data_dir) / "gsm8k" / "test.jsonl").read_text().split("\n")[:24] if x]
        tq = Path(data_dir) / "truthfulqa" / "generation" / "validation.jsonl"
        if tq.is_file():
            qs += [json.loads(x)["question"] for x in tq.read_text().split("\n")[:24] if x]
        out["prompts"] = "\n\n".join(qs)
    return out


def windows(tokenizer, text: str, max_tokens: int = 2048) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    return [ids[i : i + CHUNK] for i in range(0, len(ids) - 1, CHUNK) if len(ids[i : i + CHUNK]) > 1]


def corpus_key(texts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:16] + f"-k{TOP_K}-c{CHUNK}"


ROWS = 32  # positions whose log-probs are held at once: ROWS x vocab float64 (64 MiB at a 262k vocabulary)


def sequence_logprobs(loaded, ids: list[int]) -> Iterator[np.ndarray]:
    """float64 next-token log-probs for positions 0..n-2, in order, [<= ROWS, vocab] at a time, from
    the row's backend (a window's [n, vocab] float64 matrix is never built where the backend chunks;
    a backend may also return the whole window as one array)."""
    chunks = loaded.next_token_logprobs(ids, ROWS)
    for logp in [chunks] if isinstance(chunks, np.ndarray) else chunks:
        yield np.asarray(logp, dtype=np.float64)


def _rows(chunks: Iterator[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """(first position, log-prob rows) for each chunk."""
    a = 0
    for logp in chunks:
        yield a, logp
        a += len(logp)


def base_reference(loaded, tokenizer, texts: dict[str, str]) -> dict:
    ref = {}
    for name, text in texts.items():
        idx, lp, tgt_lp = [], [], []
        wins = windows(tokenizer, text)
        for w in wins:
            parts = []
            for a, logp in _rows(sequence_logprobs(loaded, w)):
                top = np.argpartition(-logp, TOP_K, axis=-1)[:, :TOP_K]
                parts.append(
                    (
                        top.astype(np.int32),
                        np.take_along_axis(logp, top, -1).astype(np.float32),
                        logp[np.arange(len(logp)), w[a + 1 : a + 1 + len(logp)]].astype(np.float32),
                    )
                )
            idx.append(np.concatenate([p[0] for p in parts]))
            lp.append(np.concatenate([p[1] for p in parts]))
            tgt_lp.append(np.concatenate([p[2] for p in parts]))
        ref[name] = {"windows": wins, "top_idx": idx, "top_lp": lp, "target_lp": tgt_lp}
    return ref


def save_reference(ref: dict, path: Path) -> None:
    arrays, meta = {}, {}
    for name, r in ref.items():
        meta[name] = r["windows"]
        for i in range(len(r["windows"])):
            arrays[f"{name}/{i}/idx"] = r["top_idx"][i]
            arrays[f"{name}/{i}/lp"] = r["top_lp"][i]
            arrays[f"{name}/{i}/tgt"] = r["target_lp"][i]
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, windows=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)


def load_reference(path: Path) -> dict:
    z = np.load(path)
    meta = json.loads(str(z["windows"]))
    return {
        name: {
            "windows": wins,
            "top_idx": [z[f"{name}/{i}/idx"] for i in range(len(wins))],
            "top_lp": [z[f"{name}/{i}/lp"] for i in range(len(wins))],
            "target_lp": [z[f"{name}/{i}/tgt"] for i in range(len(wins))],
        }
        for name, wins in meta.items()
    }


def compare(loaded, ref: dict) -> dict:
    """KL(base || variant) per token (top-K coarsened), top-1 agreement, perplexity ratio."""
    out = {}
    for name, r in ref.items():
        kls, agree, nll_b, nll_v, mass = [], [], [], [], []
        for w, idx_w, lp_w, tgt_w in zip(r["windows"], r["top_idx"], r["top_lp"], r["target_lp"]):
            for a, logq in _rows(sequence_logprobs(loaded, w)):
                rows = slice(a, a + len(logq))
                idx, lp_b, nxt = idx_w[rows], lp_w[rows], w[a + 1 : a + 1 + len(logq)]
                p_top = np.exp(lp_b.astype(np.float64))
                q_top = np.exp(np.take_along_axis(logq, idx.astype(np.int64), -1))
                p_rest = np.clip(1 - p_top.sum(-1), 1e-12, None)
                q_rest = np.clip(1 - q_top.sum(-1), 1e-12, None)
                kl = (p_top * (lp_b - np.log(np.clip(q_top, 1e-300, None)))).sum(-1) + p_rest * (np.log(p_rest) - np.log(q_rest))
                kls.append(np.maximum(kl, 0))
                base_top1 = idx[np.arange(len(idx)), lp_b.argmax(-1)]
                agree.append(logq.argmax(-1) == base_top1)
                nll_b.append(-tgt_w[rows])
                nll_v.append(-logq[np.arange(len(logq)), nxt])
                mass.append(p_top.sum(-1))
        kls, agree = np.concatenate(kls), np.concatenate(agree)
        nb, nv = np.concatenate(nll_b), np.concatenate(nll_v)
        out[name] = {
            "tokens": int(len(kls)),
            "mean_kl": float(kls.mean()),
            "kl_p99": float(np.percentile(kls, 99)),
            "top1_agreement": float(agree.mean()),
            "ppl_base": float(np.exp(nb.mean())),
            "ppl": float(np.exp(nv.mean())),
            "ppl_ratio": float(np.exp(nv.mean() - nb.mean())),
            "base_topk_mass": float(np.concatenate(mass).mean()),
        }
    return out
