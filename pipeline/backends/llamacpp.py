"""Evaluate a .gguf with llama.cpp's own kernels, in process, as an lm-eval model.

Why not lm-eval's `gguf` model: it scores through an OpenAI-style server's echoed logprobs,
which llama.cpp's server does not return and llama-cpp-python's server misaligns (prompt
token i is paired with the logits of the wrong position). Why not load the GGUF in
transformers: that dequantizes the weights and skips llama.cpp's activation quantization in
its matmuls, which moves answers as much as the weight error itself.

Here: token ids go straight into llama.cpp (`llama_decode` on our own batch) and log-probs are
read from its output rows. Tokenization is the HF tokenizer's, through the same TemplateLM
code path as lm-eval's HF model, so every row scores the very same token sequences; `load`
first checks that it tokenizes as llama.cpp's own vocabulary of the file (tokenizer_check). Requests
are sorted so that neighbours share prefixes, and the KV cache of the shared prefix is kept
(the few-shot prefix of MMLU/GSM8K is computed once per subject, not once per item).

Bounded memory: the context is made with `logits_all=False` (llama-cpp-python would otherwise keep
`Llama.scores`, [n_ctx, vocab] float32: 4.3 GB at a 262k vocabulary, and llama.cpp an output
buffer of n_batch rows). Each decode call marks as outputs only the positions whose log-probs are
read (a request's continuation; every position for rolling log-likelihood and the KL reference;
the last for generation), at most `out_rows` of them (64 MiB of float32 logits), so llama.cpp
runs its last layer's FFN, final norm and LM head on those rows alone. Each call's rows are read
with `llama_get_logits_ith`, made float64, reduced at once (log-softmax, the continuation's
log-probs, argmax) and dropped. The values are the old [n, vocab] path's (compared on 370
requests); see docs/performance-memory.md.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from ..placement import Target
from ..remote_code import trust
from ..tasks import SEEDS
from ..types import Artifact
from .base import Backend, LoadedModel

N_BATCH = 512  # tokens per llama_decode call (and per ubatch)
LOGITS_CHUNK_BYTES = 64 << 20  # one decode call's output rows as float64 (llama.cpp holds them as float32: half that)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    m = rows.max(axis=-1, keepdims=True)
    return rows - m - np.log(np.exp(rows - m).sum(axis=-1, keepdims=True))


def _log_softmax_(rows: np.ndarray) -> np.ndarray:
    """`_log_softmax` of a float64 matrix in place, with the same operations in the same order, so
    the same values; exp is taken a row at a time (a row's sum is the same pairwise sum either way),
    so no temporary of the matrix's size is made (the old one made four)."""
    rows -= rows.max(axis=-1, keepdims=True)
    sums = np.array([np.exp(r).sum() for r in rows])
    rows -= np.log(sums)[:, None]
    return rows


class LlamaCppLM(TemplateLM):
    def __init__(self, gguf_path: str | Path, tokenizer, n_ctx: int = 4096, max_gen_toks: int = 256, n_gpu_layers: int = 0):
        super().__init__()
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            n_gpu_layers=n_gpu_layers,  # -1: every layer on the GPU (offload), 0: CPU kernels
            n_ctx=n_ctx,
            n_batch=N_BATCH,
            n_ubatch=N_BATCH,
            logits_all=False,  # see the module docstring: outputs are asked for per position instead
            n_threads=os.cpu_count() or 1,
            n_threads_batch=os.cpu_count() or 1,
            verbose=False,
            seed=SEEDS["torch_random_seed"],
        )
        self.n_vocab = self.llm.n_vocab()
        self.out_rows = max(1, LOGITS_CHUNK_BYTES // (8 * self.n_vocab))  # output rows per decode call
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        self._cached: list[int] = []  # the tokens whose KV cells are in the context, from position 0
        self.tokenizer = tokenizer
        self.add_bos_token = None  # as lm-eval's HF model by default: the tokenizer decides
        self._max_length = n_ctx
        self._max_gen_toks = max_gen_toks
        self.prefix_reused_tokens = 0  # tokens whose KV state came from the previous request
        self.evaluated_tokens = 0

    # -- tokenization: identical to lm_eval.models.huggingface.HFLM ---------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kw) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **special)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- llama.cpp with prefix reuse, outputs only where read --------------------------------------------
    def logits_from(self, tokens: list[int], first: int, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Decode `tokens`, reusing the cached prefix, and yield (a, float64 logits [k, vocab]) for
        positions a..a+k-1 from `first` on (row i predicts token i+1), k <= rows and <= out_rows.
        The positions before `first` get no output rows; the KV cells of `tokens` stay cached."""
        import llama_cpp

        if len(tokens) > self._max_length:
            raise ValueError(f"{len(tokens)} tokens exceed the llama.cpp context of {self._max_length}")
        rows = min(rows or self.out_rows, self.out_rows)
        first = max(0, first)
        # cached positions that need an output are decoded again: their logits were not kept
        n, limit = 0, min(len(self._cached), len(tokens), first)
        while n < limit and self._cached[n] == tokens[n]:
            n += 1
        ctx = self.llm.ctx
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), -1, n, -1)  # as Llama.eval: drop cells from n on
        del self._cached[n:]
        self.prefix_reused_tokens += n
        self.evaluated_tokens += len(tokens) - n
        b, pos = self._batch, n
        while pos < len(tokens):
            end = min(len(tokens), pos + N_BATCH)
            out = max(pos, first)
            if out < end:
                end = min(end, out + rows)
            b.n_tokens = end - pos
            for j, t in enumerate(tokens[pos:end]):
                b.token[j], b.pos[j], b.n_seq_id[j], b.seq_id[j][0] = t, pos + j, 1, 0
                b.logits[j] = pos + j >= first
            if (rc := llama_cpp.llama_decode(ctx, b)) != 0:
                self._cached.clear()  # the context's cells are no longer known
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), -1, 0, -1)
                raise RuntimeError(f"llama_decode returned {rc}")
            self._cached.extend(tokens[pos:end])
            if out < end:
                x = np.empty((end - out, self.n_vocab), dtype=np.float64)
                for j in range(end - out):
                    x[j] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, out - pos + j), shape=(self.n_vocab,))
                yield out, x
            pos = end

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of `tokens`, [n, vocab] float64: for tests and short inputs only
        (the evaluation paths read `logits_from` chunk by chunk)."""
        return np.concatenate([x for _, x in self.logits_from(tokens, 0)])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
        for i in tqdm(order, disable=disable_tqdm, desc="llama.cpp loglikelihood"):
            key, ctx, cont = requests[i]
            # as HFLM: the model sees (context + continuation) minus its last token, truncated on the left
            whole = (ctx + cont)[-(self._max_length + 1) :]
            inp = whole[:-1]
            first = len(inp) - len(cont)
            target, picked, greedy = np.array(cont), np.empty(len(cont)), True
            for a, x in self.logits_from(inp, first):
                rows, k = _log_softmax_(x), a - first
                picked[k : k + len(rows)] = rows[np.arange(len(rows)), target[k : k + len(rows)]]
                greedy = greedy and bool((rows.argmax(-1) == target[k : k + len(rows)]).all())
            results[i] = (float(picked.sum()), greedy)  # one sum over the continuation, as before: the same rounding
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="llama.cpp rolling"):
            windows = list(
                map(
                    utils.make_disjoint_window,
                    utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                )
            )
            nll = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            total = sum(x[0] for x in nll)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: requests[i].args[0])
        for i in tqdm(order, disable=disable_tqdm, desc="llama.cpp generate_until"):
            context, gen_kwargs = requests[i].args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self._max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError("the llama.cpp backend decodes greedily; sampling tasks are not supported")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            ctx = self.tok_encode(context, left_truncate_len=self._max_length - max_gen)
            nxt = self._next_greedy(ctx)
            gen: list[int] = []
            for _ in range(max_gen):
                if nxt == self.eot_token_id:
                    break
                gen.append(nxt)
                text = self.tok_decode(gen, skip_special_tokens=False)
                if any(s and s in text for s in until):
                    break
                nxt = self._next_greedy(ctx + gen)
            s = postprocess_generated_text(self.tok_decode(gen), until, None)
            results[i] = s
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), s)
        return results  # type: ignore[return-value]

    def _next_greedy(self, tokens: list[int]) -> int:
        """argmax of the last position's logits: one output row."""
        *_, (_, x) = self.logits_from(tokens, len(tokens) - 1)
        return int(x[-1].argmax())


def offload(device: str, supports_gpu_offload: bool) -> tuple[int, str]:
    """(n_gpu_layers, where): every layer on the GPU when the run is on CUDA and this llama-cpp-python
    was built with GPU offload (scripts/setup.sh builds it with CUDA where nvcc is found), else CPU."""
    if device != "cuda":
        return 0, "on CPU"
    if supports_gpu_offload:
        return -1, "on CUDA (every layer offloaded)"
    return 0, "on CPU (this llama-cpp-python was built without GPU offload: rerun scripts/setup.sh where nvcc is found)"


class LlamaCppBackend(Backend):
    name = "llamacpp"
    formats = ("gguf",)
    libraries = ("llama-cpp-python", "transformers")

    def load(
        self,
        art: Artifact,
        dtype: str,
        batch_size: int | str,
        max_length: int,
        memory_budget: int | None = None,
        target: Target | None = None,
    ) -> LoadedModel:
        # batch_size (a number or auto) does not apply: requests run one at a time, sharing the KV
        # cache of their common prefix, so the record states 1. The memory budget is not enforced.
        import llama_cpp
        from transformers import AutoTokenizer

        from ..tokenizer_check import check_gguf_tokenizer

        tokenizer = AutoTokenizer.from_pretrained(art.path, **trust())
        # the HF tokenizer's ids go straight into llama.cpp: they must be the ids llama.cpp would produce
        check_gguf_tokenizer(art.path / "model.gguf", tokenizer, f"the HF tokenizer in {art.path}", file_key=art.key or None)
        layers, where = offload((target or Target()).device, bool(llama_cpp.llama_supports_gpu_offload()))
        lm = LlamaCppLM(art.path / "model.gguf", tokenizer, n_ctx=max_length, n_gpu_layers=layers)
        how = f"GGUF ({art.meta.get('bits_per_weight')} bpw), llama.cpp kernels {where} (llama-cpp-python, in process)"

        return LoadedModel(lm, how, "llama.cpp", self, int(llama_cpp.llama_model_size(lm.llm.model)), batch_size=1)

    def next_token_logprobs(self, loaded: LoadedModel, ids: list[int], rows: int):
        # positions 0..n-2: the last token predicts nothing read here, so it is not decoded
        for _, x in loaded.lm.logits_from(ids[:-1], 0, rows):
            yield _log_softmax_(x)
