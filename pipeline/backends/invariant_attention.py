"""The attention of a batch-invariant FP8 model (batch_invariant.py): float32 in fixed key blocks
(`f32_attention`, checked per machine and head shape by `attention_is_invariant`) or float64
rounded once (`fp64_attention`). Both are transformers attention functions; `batch_invariant.install`
registers them (attention.register_attention) when it sets a model to use one.
"""

from __future__ import annotations

import contextvars

import torch

from ..errors import QuantpipeError
from .invariant_linear import tile_spans
from .prefix_groups import PACKED_SUFFIXES, SuffixTrie

# Query rows per float64 attention call: bounds the [batch, heads, rows, keys] score matrix.
ATTENTION_ROWS = 256
# Keys per block of the float32 attention, and the zero columns that pad its value product
# ([.., d + 1] with the ones column) to a width the GEMM kernels vectorize.
KEY_BLOCK = 128
VALUE_PAD = 16
# Query rows per attention GEMM (its score blocks are [rows, KEY_BLOCK] per head and block), and 4
# for a generation step's few rows (query heads per key head).
ATTENTION_TILES = (256, 64, 16, 8, 4)
# Suffixes of a packed row unpacked per attention call (_unpacked_attention): bounds its copies of
# the prefix's keys and values, [rows, kv_heads, keys, head_dim] each.
UNPACKED_ROWS = 8


def fp64_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention (AttentionInterface) in float64, rounded to float32 at the end.
    query [b, heads, q, d]; key, value [b, kv_heads, k, d] read in place for grouped queries;
    attention_mask: sdpa's boolean mask (True: attend) or None for a causal pass."""
    # softcapping (Gemma-2), sinks (s_aux) and biases are not reproduced here: refuse rather than drop them
    if dropout or any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "softcap")):
        raise QuantpipeError(f"{type(module).__name__}: batch-invariant attention supports plain softmax attention only")
    b, h, nq, d = query.shape
    hk, nk = key.shape[1], key.shape[2]
    g = h // hk
    scaling = scaling if scaling is not None else d**-0.5
    k, v = key.double(), value.double()
    out = torch.empty((b, nq, h, value.shape[-1]), dtype=query.dtype, device=query.device)
    causal = attention_mask is None and nq > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    for a in range(0, nq, ATTENTION_ROWS):
        z = min(nq, a + ATTENTION_ROWS)
        q = query[:, :, a:z].double().reshape(b, hk, g * (z - a), d)
        s = (q @ k.transpose(-1, -2)).mul_(scaling).reshape(b, hk, g, z - a, nk)
        if attention_mask is not None:
            m = attention_mask[:, :, a:z, :nk]
            if m.dtype == torch.bool:
                s.masked_fill_(~m[:, :, None] if m.shape[1] == 1 else ~m.reshape(b, hk, g, z - a, nk), float("-inf"))
            else:
                s.add_(m[:, :, None].double() if m.shape[1] == 1 else m.reshape(b, hk, g, z - a, nk).double())
        elif causal:
            rows = torch.arange(a, z, device=query.device)[:, None] + (nk - nq)
            s.masked_fill_(torch.arange(nk, device=query.device)[None] > rows, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a fully masked (padding) row attends to nothing
        o = (p.reshape(b, hk, g * (z - a), nk) @ v).reshape(b, h, z - a, -1)
        out[:, a:z] = o.transpose(1, 2).to(query.dtype)
    return out, None


# True inside `model.generate` of a model `install` gave float32 attention: a step after the prompt
# then blocks its keys back from the newest one (f32_attention).
_GENERATING = contextvars.ContextVar("quantpipe_generating", default=False)


def _align(x: torch.Tensor, offsets: list[int], width: int, extra: int = 0, fill=0.0) -> torch.Tensor:
    """x [b, ..., n, c] moved along its second-to-last dim by a per-row offset into a fresh
    [b, ..., width, c + extra]: out[r, ..., i, :c] = x[r, ..., i + offsets[r], :] where that
    exists, `fill` elsewhere; column c (if extra) is 1 and the rest of the extra columns 0."""
    n, c = x.shape[-2], x.shape[-1]
    if len(set(offsets)) > 1:  # left-padded rows (a generation's prompt): row by row into a filled buffer
        out = x.new_full((*x.shape[:-2], width, c + extra), fill)
        for r, off in enumerate(offsets):
            lo, hi = max(0, -off), min(width, n - off)
            if hi > lo:
                out[r, ..., lo:hi, :c] = x[r, ..., lo + off : hi + off, :]
    else:  # one copy, and `fill` only where nothing is copied
        off = offsets[0]
        lo, hi = min(width, max(0, -off)), max(0, min(width, n - off))
        out = x.new_empty((*x.shape[:-2], width, c + extra))
        out[..., :lo, :], out[..., hi:, :] = fill, fill
        if hi > lo:
            out[..., lo:hi, :c] = x[..., lo + off : hi + off, :]
            out[..., lo:hi, c:] = 0
    if extra:
        out[..., c] = 1
    return out


def f32_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention (AttentionInterface) in float32, batch-invariant (batch_invariant.py).
    query [b, heads, q, d]; key, value [b, kv_heads, k, d]; attention_mask: sdpa's boolean mask
    [b, 1, q, k] (True: attend) or None for a causal pass."""
    if dropout or any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "softcap")):
        raise QuantpipeError(f"{type(module).__name__}: batch-invariant attention supports plain softmax attention only")
    if (trie := kwargs.get(PACKED_SUFFIXES)) is not None and not _GENERATING.get():
        return _unpacked_attention(module, query, key, value, trie, scaling)
    b, h, nq, d = query.shape
    hk, nk, dv = key.shape[1], key.shape[2], value.shape[-1]
    g, kb, dev = h // hk, KEY_BLOCK, query.device
    scaling = scaling if scaling is not None else d**-0.5
    if attention_mask is None:
        allowed = (torch.arange(nk, device=dev) <= torch.arange(nk - nq, nk, device=dev)[:, None]).expand(b, nq, nk)
    elif attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1:
        allowed = attention_mask[:, 0, :, :nk]
    else:
        raise QuantpipeError(f"batch-invariant attention: unexpected mask {tuple(attention_mask.shape)} {attention_mask.dtype}")
    if _GENERATING.get() and nk > nq:  # a generation step: every row's newest key is the last one
        if nq > 1:
            raise QuantpipeError("batch-invariant attention: a generation step of several tokens after a cache is not supported")
        nblocks = -(-nk // kb)
        offsets = [nk - nblocks * kb] * b
    else:  # blocks from each row's first key: the first one its last query attends (left padding skipped)
        offsets = allowed[:, -1].to(torch.int8).argmax(-1).tolist()
        nblocks = -(-(nk - min(offsets)) // kb)
    width = nblocks * kb
    keys = _align(key, offsets, width).view(b * hk, nblocks, kb, d)
    values = _align(value, offsets, width, extra=VALUE_PAD).view(b * hk, nblocks, kb, dv + VALUE_PAD)  # column dv: ones
    allowed = _align(allowed.transpose(1, 2), offsets, width, fill=False).transpose(1, 2)  # [b, q, width]
    rows = g * nq  # per (batch row, kv head): its query heads' rows, position-major (a tile spans few positions)
    q = (query * scaling).reshape(b, hk, g, nq, d).transpose(2, 3).reshape(b * hk, rows, d)  # scaled once, before the GEMM
    out = query.new_empty(b * hk, rows, dv)
    for a, t in tile_spans(rows, ATTENTION_TILES):  # a generation step has as few rows as query heads per key head
        n = min(t, rows - a)
        mask = allowed[:, torch.arange(a, a + t, device=dev).clamp_(max=rows - 1) // g].view(b, t, nblocks, kb)
        live = mask.any(dim=3).any(dim=1).any(dim=0).nonzero().flatten().tolist()
        if not live:
            out[:, a : a + n] = 0
            continue
        j0, j1 = live[0], live[-1] + 1  # blocks outside no row of the tile attends: they would add zeros
        nb = j1 - j0
        # every (head, block) pair is one fixed-shape GEMM of the batch: [t, d] x [d, kb], then [t, kb] x [kb, dv + pad]
        qa = q[:, a : a + t] if n == t else torch.cat([q[:, a:], q.new_zeros(b * hk, t - n, d)], 1)
        qa = qa[:, None].expand(b * hk, nb, t, d).reshape(b * hk * nb, t, d)
        s = torch.bmm(qa, keys[:, j0:j1].reshape(b * hk * nb, kb, d).transpose(1, 2)).view(b, hk, nb, t, kb)
        s.masked_fill_(~mask[:, :, j0:j1].permute(0, 2, 1, 3)[:, None], float("-inf"))
        p = s.sub_(s.amax(dim=(2, 4), keepdim=True)).exp_()  # the exact max over all keys: no running rescale
        pv = torch.bmm(p.view(b * hk * nb, t, kb), values[:, j0:j1].reshape(b * hk * nb, kb, dv + VALUE_PAD)).view(b * hk, nb, t, -1)
        acc = pv[:, 0].clone()
        for i in range(1, nb):  # blocks added in order
            acc.add_(pv[:, i])
        out[:, a : a + n] = (acc[:, :n, :dv] / acc[:, :n, dv : dv + 1]).nan_to_num_(0.0)  # a fully masked row: 0
    return out.view(b, hk, nq, g, dv).permute(0, 2, 1, 3, 4).reshape(b, nq, h, dv), None


def _unpacked_attention(module, query, key, value, trie: SuffixTrie, scaling):
    """`f32_attention` of suffixes packed into one row after a prefix (prefix_cache._packed_hidden),
    run as the padded batch they replace: each suffix in its own row, its keys after the prefix's
    (a trie node that several suffixes share copied into each), so every key lands in the same
    block as there; each node's query is computed once, in the row of the suffix that reaches it
    first, as the tokens of a suffix run after a cache are, with the causal mask. Every query thus
    gets the bits it gets in the padded batch (the Linear layers around it are row-wise, so running
    each node once is exact). UNPACKED_ROWS suffixes per call bound the copies of the prefix."""
    nodes, dev = query.shape[2], query.device
    prefix = key.shape[2] - nodes
    keep = (trie.fresh > 0).nonzero().flatten()  # a suffix whose nodes all came earlier asks nothing
    paths, fresh = trie.paths[keep], trie.fresh[keep]
    lengths, width, most = (paths >= 0).sum(1), paths.shape[1], int(fresh.max())
    # suffix r's queries: its fresh nodes, numbered consecutively; the rows past them repeat its last
    i = torch.arange(most).clamp(max=fresh[:, None] - 1)  # [suffixes, most]
    q_nodes = (fresh.cumsum(0) - fresh)[:, None] + i
    q_pos = lengths[:, None] - fresh[:, None] + i  # their indices in the suffix
    allowed = torch.arange(prefix + width) <= prefix + q_pos[..., None]  # [suffixes, most, keys]: causal
    paths, q_nodes, allowed = paths.clamp(min=0).to(dev), q_nodes.to(dev), allowed.to(dev)  # past the end: any key, never attended
    out = []
    for a in range(0, len(paths), UNPACKED_ROWS):
        idx = paths[a : a + UNPACKED_ROWS]
        n = len(idx)
        q = query[0][:, q_nodes[a : a + UNPACKED_ROWS]].transpose(0, 1)  # [n, heads, most, d]
        k = torch.cat([key[:, :, :prefix].expand(n, -1, -1, -1), key[0][:, prefix + idx].transpose(0, 1)], 2)
        v = torch.cat([value[:, :, :prefix].expand(n, -1, -1, -1), value[0][:, prefix + idx].transpose(0, 1)], 2)
        out.append(f32_attention(module, q, k, v, allowed[a : a + UNPACKED_ROWS, None], scaling=scaling)[0])  # as unpacked rows
    real = (torch.arange(most) < fresh[:, None]).to(dev)
    return torch.cat(out)[real][None], None  # suffix by suffix, its fresh nodes: the node order


class Generating:
    """`model.generate` run with _GENERATING set."""

    def __init__(self, generate):
        self.generate = generate

    def __call__(self, *args, **kwargs):
        token = _GENERATING.set(True)
        try:
            return self.generate(*args, **kwargs)
        finally:
            _GENERATING.reset(token)


def attention_is_invariant(heads: int, kv_heads: int, head_dim: int, attention=f32_attention) -> bool:
    """Whether `attention` gives a request's queries the same bits alone (batch size 1, one causal
    pass; in generation, its prompt and then one step at a time) as in a batch of 8 beside other
    rows: after a shared prefix's cache with right padding, and left-padded in generation; here
    (this BLAS, this thread count), on these head shapes."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen).mul_(scale)

    class Module:  # what attention functions read from the attention module
        is_causal, num_key_value_groups = True, heads // kv_heads

    mod, n, bsz, r = Module(), 300, 8, 5
    q, k, v = rnd(1, heads, n, head_dim), rnd(1, kv_heads, n, head_dim, scale=3.0), rnd(1, kv_heads, n, head_dim)
    alone = attention(mod, q, k, v, None)[0]
    # the same request as a suffix of 130, 6 and 1 tokens (query rows in tiles of every size) after
    # a shared prefix's cache, row 5 of 8, right padded to 200
    for pre in (170, 294, 299):
        width = 200
        qs, ks, vs = rnd(bsz, heads, width, head_dim), rnd(bsz, kv_heads, pre + width, head_dim), rnd(bsz, kv_heads, pre + width, head_dim)
        ks[:, :, :pre], vs[:, :, :pre] = k[:, :, :pre], v[:, :, :pre]
        qs[r, :, : n - pre], ks[r, :, pre:n], vs[r, :, pre:n] = q[0, :, pre:], k[0, :, pre:], v[0, :, pre:]
        lengths = torch.full((bsz,), pre + width)
        lengths[r] = n
        keys = torch.arange(pre + width)
        mask = (keys <= torch.arange(pre, pre + width)[:, None])[None] & (keys < lengths[:, None, None])
        if not torch.equal(attention(mod, qs, ks, vs, mask[:, None])[0][r, : n - pre], alone[0, pre:]):
            return False
    # generation: a 250-token prompt, then 50 steps; batched with left padding (`first`: each row's first real token)
    prompt, first = 250, torch.tensor([0, 3, 11, 0, 130, 37, 1, 0])
    o = int(first[r])
    p0 = prompt + o
    token = _GENERATING.set(True)
    try:
        steps = [attention(mod, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], None)[0][0]]
        steps += [attention(mod, q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], None)[0][0] for i in range(prompt, n)]
        total = p0 + n - prompt
        qb, kb_, vb = rnd(bsz, heads, p0, head_dim), rnd(bsz, kv_heads, total, head_dim), rnd(bsz, kv_heads, total, head_dim)
        qb[r, :, o:], kb_[r, :, o : o + n], vb[r, :, o : o + n] = q[0, :, :prompt], k[0], v[0]
        positions = torch.arange(total)

        def left_mask(nq, nk):
            return ((positions[:nk] <= torch.arange(nk - nq, nk)[:, None])[None] & (positions[:nk] >= first[:, None, None]))[:, None]

        got = [attention(mod, qb, kb_[:, :, :p0], vb[:, :, :p0], left_mask(p0, p0))[0][r, o:]]
        for i in range(prompt, n):
            j = p0 + i - prompt
            qi = q[:, :, i : i + 1].expand(bsz, -1, -1, -1).contiguous()
            got.append(attention(mod, qi, kb_[:, :, : j + 1], vb[:, :, : j + 1], left_mask(1, j + 1))[0][r])
    finally:
        _GENERATING.reset(token)
    return all(torch.equal(a, b) for a, b in zip(steps, got))
