"""Prefix sharing below float32: its contract, and the check at load that guards it.

In bfloat16 and float16 stock lm-eval is not batch-invariant: another batch, padding or split
rounds differently, and stock sums each request's log-probs in the model's dtype (a -300 nat
TruthfulQA answer is a multiple of 2 nats in bfloat16). So below float32 the reference is stock
HFLM at batch size 1 on the same model in the same dtype, and the contract of a shared-prefix
evaluation is, per log-likelihood request:

- |its log-likelihood - stock's at batch size 1| <= TOLERANCE_EPS x eps(dtype) x (|LL| + tokens):
  1.6% of |LL| + 0.016 nats per continuation token in bfloat16 (eps 2^-7), 0.2% + 0.002 per token
  in float16 (eps 2^-10). Stock's rounding alone reaches eps per nat (eps/2 as its log-probs are
  rounded to the dtype, eps/2 more as their sum is); on the CPU measurement of docs/backends.md
  stock's own batch-size-8 scores moved up to 0.74 eps per (nat + token) from its
  batch-size-1 scores, shared prefixes up to 0.59. The shared path's log-softmax and sums
  are float32.
- its greedy flag (is_greedy) equals stock's at batch size 1.

Generation is stock's `generate` (generation_cache.py) in the same batches as stock, so its tokens
are stock's at the same batch size; docs/backends.md says what was measured against batch size 1.

A model meets the contract or not through its kernels, so it is checked at load (`check_requests`,
`stock_bs1`, `Agreement`): a few requests after a shared random prefix, scored through the shared
path (padded, and packed where packing applies) and as stock scores them one at a time. A model
that misses keeps stock batches, and its "evaluated as" line says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOLERANCE_EPS = 2
LOW_PRECISION = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
# the check's shared prefix (at least the scorer's min_shared) and its requests after it:
# (suffix length, continuation tokens, greedy continuation); suffixes 1 and 2 share their first
# CHECK_SHARED tokens, so a packed row runs them as a trie
CHECK_PREFIX = 48
CHECK_SUFFIXES = ((5, 1, False), (8, 2, True), (8, 3, False), (3, 1, True))
CHECK_SHARED = 3


def below_float32(model) -> bool:
    return model.dtype in LOW_PRECISION


def tolerance(ll: float, tokens: int, dtype: torch.dtype) -> float:
    """The most a request's log-likelihood may differ from stock's at batch size 1 (nats)."""
    return TOLERANCE_EPS * torch.finfo(dtype).eps * (abs(ll) + tokens)


@dataclass(frozen=True)
class Agreement:
    """Shared-prefix scores against stock's at batch size 1: the largest |difference| as a share of
    its tolerance (at most 1 holds), the largest difference in nats, and greedy flags that differ."""

    requests: int
    worst_share: float
    worst_nats: float
    greedy_differ: int

    @classmethod
    def of(cls, got: list[tuple[float, bool]], want: list[tuple[float, bool]], tokens: list[int], dtype: torch.dtype) -> Agreement:
        diffs = [abs(a - b) for (a, _), (b, _) in zip(got, want)]
        tols = [tolerance(b, n, dtype) for (b, _), n in zip(want, tokens)]
        shares = [d / t if t else float("inf") if d else 0.0 for d, t in zip(diffs, tols)]
        greedy = sum(ga != gb for (_, ga), (_, gb) in zip(got, want))
        return cls(len(want), max(shares, default=0.0), max(diffs, default=0.0), greedy)

    @property
    def holds(self) -> bool:
        return self.worst_share <= 1 and self.greedy_differ == 0

    def describe(self) -> str:
        return f"|dLL| up to {self.worst_nats:.3g} nats, {self.worst_share:.2f} of the tolerance; {self.greedy_differ} greedy flags differ"


def stock_bs1(model, seqs: list[tuple], conts: list[list[int]], softmax_dtype: torch.dtype | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each request as stock HFLM computes it at batch size 1: the
    model's logits for the input alone, lm-eval's log_softmax (in the logits' dtype unless
    softmax_dtype), the continuation's entries gathered and summed in that dtype."""
    out = []
    for seq, cont in zip(seqs, conts):
        with torch.no_grad():
            logits = model(torch.tensor([seq], device=model.device), use_cache=False).logits
        logp = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)[0, -len(cont) :]
        want = torch.tensor(cont, device=logp.device)
        greedy = bool((logp.argmax(-1) == want).all())
        out.append((float(logp.gather(1, want[:, None]).sum()), greedy))
    return out


def check_requests(model, prefix_len: int = CHECK_PREFIX) -> tuple[list[tuple], list[list[int]]]:
    """The load check's requests as model inputs (context + continuation, last token dropped, as
    lm-eval feeds them) and their continuations: random tokens after one random prefix, some
    continuations the model's own greedy tokens (so greedy flags are tested both ways)."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    prefix = torch.randint(vocab, (prefix_len,), generator=gen).tolist()
    seqs, conts, suffix = [], [], []
    for i, (n, k, greedy) in enumerate(CHECK_SUFFIXES):
        fresh = torch.randint(vocab, (n,), generator=gen).tolist()
        suffix = (suffix[:CHECK_SHARED] + fresh[CHECK_SHARED:]) if i == 2 else fresh
        ctx = prefix + suffix
        if greedy:
            cont = []
            for _ in range(k):
                with torch.no_grad():
                    logits = model(torch.tensor([ctx + cont], device=model.device), use_cache=False).logits
                cont.append(int(logits[0, -1].argmax()))
        else:
            cont = torch.randint(vocab, (k,), generator=gen).tolist()
        seqs.append(tuple((ctx + cont)[:-1]))
        conts.append(cont)
    return seqs, conts
