"""Evaluate a .gguf with llama.cpp's own kernels, in process, as an lm-eval model.

Why not lm-eval's `gguf` model: it scores through an OpenAI-style server's echoed logprobs,
which llama.cpp's server does not return and llama-cpp-python's server misaligns (prompt
token i is paired with the logits of the wrong position). Why not load the GGUF in
transformers: that dequantizes the weights and skips llama.cpp's activation quantization in
its matmuls, which moves answers as much as the weight error itself.

Here: token ids go straight into llama.cpp (`Llama.eval`, all logits kept) and log-probs are
read from `Llama.scores`. Tokenization is the HF tokenizer's, through the same TemplateLM
code path as lm-eval's HF model, so every row scores the very same token sequences; `load`
first checks that it tokenizes as llama.cpp's own vocabulary of the file (tokenizer_check). Requests
are sorted so that neighbours share prefixes, and the KV cache of the shared prefix is kept
(the few-shot prefix of MMLU/GSM8K is computed once per subject, not once per item).
"""

from __future__ import annotations

import os
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

from ..evaluation import SEEDS
from ..remote_code import trust
from ..types import Artifact
from .base import Backend, LoadedModel


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    m = rows.max(axis=-1, keepdims=True)
    return rows - m - np.log(np.exp(rows - m).sum(axis=-1, keepdims=True))


class LlamaCppLM(TemplateLM):
    def __init__(self, gguf_path: str | Path, tokenizer, n_ctx: int = 4096, max_gen_toks: int = 256):
        super().__init__()
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_batch=512,
            n_ubatch=512,
            logits_all=True,
            n_threads=os.cpu_count() or 1,
            n_threads_batch=os.cpu_count() or 1,
            verbose=False,
            seed=SEEDS["torch_random_seed"],
        )
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

    # -- llama.cpp with prefix reuse ---------------------------------------------------------------------
    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of `tokens` (row i predicts token i+1), reusing the cached prefix."""
        if len(tokens) > self._max_length:
            raise ValueError(f"{len(tokens)} tokens exceed the llama.cpp context of {self._max_length}")
        cached = self.llm.input_ids[: self.llm.n_tokens]
        n = 0
        limit = min(len(cached), len(tokens))
        while n < limit and cached[n] == tokens[n]:
            n += 1
        self.llm.n_tokens = n  # Llama.eval drops the KV cells from n on before decoding the rest
        if n < len(tokens):
            self.llm.eval(tokens[n:])
        self.prefix_reused_tokens += n
        self.evaluated_tokens += len(tokens) - n
        return self.llm.scores[: len(tokens)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
        for i in tqdm(order, disable=disable_tqdm, desc="llama.cpp loglikelihood"):
            key, ctx, cont = requests[i]
            # as HFLM: the model sees (context + continuation) minus its last token, truncated on the left
            whole = (ctx + cont)[-(self._max_length + 1) :]
            inp = whole[:-1]
            rows = _log_softmax(self.logits(inp)[len(inp) - len(cont) :])
            target = np.array(cont)
            logprob = float(rows[np.arange(len(cont)), target].sum())
            greedy = bool((rows.argmax(-1) == target).all())
            results[i] = (logprob, greedy)
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
            rows = self.logits(ctx)
            nxt = int(rows[-1].argmax())
            gen: list[int] = []
            for _ in range(max_gen):
                if nxt == self.eot_token_id:
                    break
                gen.append(nxt)
                text = self.tok_decode(gen, skip_special_tokens=False)
                if any(s and s in text for s in until):
                    break
                nxt = int(self.logits(ctx + gen)[-1].argmax())
            s = postprocess_generated_text(self.tok_decode(gen), until, None)
            results[i] = s
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), s)
        return results  # type: ignore[return-value]


class LlamaCppBackend(Backend):
    name = "llamacpp"
    formats = ("gguf",)
    libraries = ("llama-cpp-python", "transformers")

    def load(self, art: Artifact, dtype: str, batch_size: int | str, max_length: int, memory_budget: int | None = None) -> LoadedModel:
        # batch_size (a number or auto) does not apply: requests run one at a time, sharing the KV
        # cache of their common prefix, so the record states 1. The memory budget is not enforced.
        from transformers import AutoTokenizer

        from ..tokenizer_check import check_gguf_tokenizer

        tokenizer = AutoTokenizer.from_pretrained(art.path, **trust())
        # the HF tokenizer's ids go straight into llama.cpp: they must be the ids llama.cpp would produce
        check_gguf_tokenizer(art.path / "model.gguf", tokenizer, f"the HF tokenizer in {art.path}", file_key=art.key or None)
        lm = LlamaCppLM(art.path / "model.gguf", tokenizer, n_ctx=max_length)
        how = f"GGUF ({art.meta.get('bits_per_weight')} bpw), llama.cpp kernels on CPU (llama-cpp-python, in process)"
        import llama_cpp

        return LoadedModel(lm, how, "llama.cpp", self, int(llama_cpp.llama_model_size(lm.llm.model)), batch_size=1)

    def next_token_logprobs(self, loaded: LoadedModel, ids: list[int], rows: int):
        logits = loaded.lm.logits(ids)  # llama.cpp keeps them; only `rows` are made float64 at a time
        for a in range(0, len(ids) - 1, rows):
            yield _log_softmax(np.array(logits[a : min(a + rows, len(ids) - 1)]))
