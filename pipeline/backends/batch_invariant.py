"""Batch-invariant evaluation of compressed-tensors checkpoints that quantize activations at run
time (FP8_DYNAMIC; static FP8 too): every token gets the same bits whether it is computed in a
stock lm-eval batch, alone (batch size 1), or as a suffix after a shared prefix's KV cache, so
prefix sharing is exact for these rows (after "Defeating Nondeterminism in LLM Inference",
Thinking Machines 2025).

Why stock is not: compressed-tensors fake-quantizes each Linear's input to FP8 (3 mantissa bits)
and multiplies in float32. A float32 result depends on the summation order, which depends on the
GEMM's shape (batch size, padded length, a prefix split) and on the attention kernel's blocking;
a 1e-7 difference that moves a value across an FP8 rounding step becomes a visible difference,
and it grows through the layers.

What this does instead:
- **Linear layers in one summation order per row.** The input's FP8 codes and scales are
  computed exactly as compressed-tensors computes them (`_quantize_input`; per-token scales read
  only the token's own row), once per input tensor (q/k/v and gate/up read the same one). The
  product is made independent of the batch one of two ways, picked once per load (`install`):
  - **float32 in fixed-shape tiles** (CPU, where the load-time probe confirms it): stock's own
    product, fake-quantized input (codes x scale) times the decompressed weight (codes x scale),
    but every GEMM call is [t, K] x [K, <= COL_BLOCK] with t one of TILES (the last row tile
    zero-padded), so the BLAS runs one of a few fixed kernels and blockings whatever the batch,
    padded length or prefix split; where each sums a row in the same order, a row's bits depend
    on that row alone. That is a property of the BLAS, not a proof, so `tiles_are_invariant`
    checks it on every call shape at load (each row alone vs at many positions of every tile
    size beside other rows) and the float64 path is used where it fails.
  - **exactly, in float64**, on the codes: y = (acc * s_x * s_w) + bias, where acc sums products
    of FP8 codes. An FP8 e4m3 value is a multiple of 2^-9 of magnitude <= 448, so a product of
    two FP8 codes is a multiple of 2^-18 below 2^18 and a dot product of K <= 2^16 such
    products is a multiple of 2^-18 below 2^52: float64 accumulates it exactly, in any order
    (about twice float32's cost on a CPU; the path on GPUs, checked on an H200).
- **Attention** one of two ways, picked with the Linear path:
  - **float32 in fixed key blocks** (`f32_attention`, with the tiles): scores and the value
    product are GEMMs of fixed shapes ([t, d] x [d, KEY_BLOCK] and [t, KEY_BLOCK] x
    [KEY_BLOCK, d + 16], t in TILES, batched over heads), over key blocks at fixed places
    relative to each request: from its first key (prefill, prefix and suffix passes; left padding
    is skipped) or, for a generation step, back from the newest key. The softmax takes the exact
    max over all keys first (no running rescale), each block's exp-weighted values and their sum
    (a ones column) come out of one GEMM, and the blocks are added in order; a block no query of a
    tile attends is skipped, which is exact (it would add zeros). A key's block and column are
    then the same whatever the batch, the padding or where a prefix cache was split, so a query's
    bits are too, as far as the BLAS computes each row and column of a fixed-shape GEMM alike;
    `attention_is_invariant` checks that at load on the model's head shapes (alone against
    batched, padded, split and generated), and the float64 path is used where it fails.
  - **float64** (`fp64_attention`), rounded to float32 once at the end: its reduction over keys
    still changes order with the number of keys, but in float64, so the float32 result differs
    only when the exact value lies within ~1e-16 relative of a float32 rounding boundary, and then
    only matters if that last-bit change also moves an FP8 code of the next Linear's input.
- Everything else (embeddings, RMSNorm, RoPE, residuals, activation functions) is row-wise and
  was measured invariant as it is; the LM head (not quantized) runs the same way as the Linear
  layers (float32 tiles or float64 rounded once), since a plain float32 GEMM sums in another order
  for another number of rows.

`install(model)` applies all of this to a loaded model and returns what it did (the row's
"evaluated as" text); hf.py calls it for such checkpoints and then shares prefixes.
"""

from __future__ import annotations

import contextvars
import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import QuantpipeError
from .prefix_cache import PACKED, SuffixTrie, full_attention_only

FP8_MAX = 448.0
# Query rows per float64 attention call: bounds the [batch, heads, rows, keys] score matrix.
ATTENTION_ROWS = 256
# Vocabulary rows of the LM head converted to float64 at once: 8192 x hidden x 8 bytes (36 MiB at hidden 576).
HEAD_BLOCK = 8192
# Rows per float32 GEMM call on the tiled path, largest first: a call has one of these shapes
# (a tile not filled is zero-padded), and the load check requires a row's bits to be the same in
# each of them. Tiles of 16 rows and more (x 4 bytes) start 64-byte aligned like the first. Large
# tiles pay: MKL's float32 GEMM at [t, 576] x [576, 1536] on this machine's 2 cores ran 66, 86,
# 108, 119, 122, 154 and 175 GFLOP/s at t = 8, 16, 64, 128, 256, 512 and 1024.
TILES = (1024, 512, 256, 128, 64, 16, 8)
# Rows left that a tile may hold with zero padding rather than split into smaller tiles (460 rows:
# one 512-row call, not 256 + 128 + 64 + 8 + 8 at lower rates).
PAD_UP = 1.3
# Output columns per tiled call: a wide head's weight is multiplied a cache-sized block at a time.
COL_BLOCK = 4096
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
# False: always the exact float64 path (tests compare both).
FLOAT32_TILES = True


_FP8_VALUES: dict = {}


def _from_fp8(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes.to(dtype), on CPU by a lookup in a table of the 256 codes' values made by that same
    cast (so the same bits): torch's float8 -> float32 cast there is scalar, about twice as slow."""
    if codes.device.type != "cpu":
        return codes.to(dtype)
    table = _FP8_VALUES.get(dtype)
    if table is None:
        table = _FP8_VALUES[dtype] = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).to(dtype)
    return torch.take(table, codes.view(torch.uint8).long())


def _fp8_codes(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' round_to_quantized_type for FP8: clamp to +-448, round to e4m3, back."""
    return _from_fp8(torch.clamp(x, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), x.dtype)


def _quantize_input(x: torch.Tensor, args, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of a Linear's input as compressed-tensors' forward_quantize computes them
    (calculate_qparams, symmetric, no zero point): a dynamic per-token scale is max|x| over the
    dims other than the first two, / 448, with 0 replaced by float32's eps; a static one is stored."""
    if args.dynamic:
        # compressed-tensors takes max(|min(lo, 0)|, |max(hi, 0)|) over the dims other than the first
        # two (compute_dynamic_scales_and_zp's TOKEN strategy; a 2-D input is one tensor): that is
        # exactly max |x|, in two passes instead of six
        dims = tuple(range(2, x.ndim))
        scale = (x.abs().amax(dim=dims, keepdim=True) if dims else x.abs().amax()) / torch.tensor(FP8_MAX, dtype=x.dtype)
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
        # |x / scale| <= 448 up to one rounding, and torch's float8 cast saturates: the clamp is a no-op
        return _from_fp8((x / scale).to(torch.float8_e4m3fn), x.dtype), scale
    return _fp8_codes(x / static_scale), static_scale


def _tiles(m: int, sizes: tuple[int, ...], pad_up: float = 1.0):
    """(first row, tile size) covering m rows: while rows are left, the smallest tile that holds
    them if that pads them by at most `pad_up` times, else the largest tile that fits them, else
    the smallest (padded)."""
    a = 0
    while a < m:
        left = m - a
        t = next((t for t in reversed(sizes) if left <= t <= pad_up * left), None)
        t = t or next((t for t in sizes if t <= left), sizes[-1])
        yield a, t
        a += t


@torch.no_grad()  # inference only; torch.mm(out=) refuses a weight that requires grad
def mm_tiles(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """x [m, k] @ wt [k, n] in float32, as GEMM calls of exactly [t, k] x [k, <= COL_BLOCK], t in
    TILES (module docstring): the same kinds of calls on the same kind of buffer for a row whatever
    the other rows are."""
    m, k = x.shape
    if not x.is_contiguous() or x.data_ptr() % 64:
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh allocation: 64-byte aligned
    y = x.new_empty(m, wt.shape[1])
    for a, t in _tiles(m, TILES, PAD_UP):
        xa = x[a : a + t]
        if xa.shape[0] < t:
            xa = torch.cat([xa, xa.new_zeros(t - xa.shape[0], k)])
        for c in range(0, wt.shape[1], COL_BLOCK):
            w = wt[:, c : c + COL_BLOCK]
            if a + t <= m and w.shape[1] == wt.shape[1]:
                torch.mm(xa, w, out=y[a : a + t])  # straight into place: no copy
            else:
                y[a : a + t, c : c + COL_BLOCK] = (xa @ w)[: m - a]
    return y


def tiles_are_invariant(wt: torch.Tensor, mm=mm_tiles) -> bool:
    """Whether `mm(x, wt)` gives each row the same bits alone and beside any other rows, at any
    position of a tile of every size, here (this BLAS, this thread count): 17 random FP8-code rows,
    each alone against arrangements of them that fill tiles of every size. Only one column block
    per distinct call shape needs checking; `install` passes each shape's first and last block."""
    gen = torch.Generator().manual_seed(0)
    x = _fp8_codes(torch.randn(17, wt.shape[0], generator=gen, dtype=wt.dtype).mul_(16.0)).to(wt.device)
    x[3] *= 1e-3  # rows of very different magnitudes side by side
    alone = torch.cat([mm(x[i : i + 1], wt) for i in range(17)])
    order = torch.arange(17, device=wt.device)
    shuffled = torch.randint(0, 17, (max(TILES) + sum(TILES) + 3,), generator=gen).to(wt.device)
    arrangements = [order, order.roll(1), order.flip(0), order[5:9], order[:1].repeat(18), shuffled, shuffled[7:], order.repeat(20)]
    # every tile size full and zero-padded, whatever tiles `_tiles` picks for the lengths above
    arrangements += [shuffled[i : i + n] for i, t in enumerate(TILES) for n in (t, t - 3)]
    return all(torch.equal(mm(x[rows], wt), alone[rows]) for rows in arrangements)


# The last input quantized with a dynamic scale, and what was made of it: q/k/v projections (and
# gate/up) read the same tensor, which is then quantized once. A weak reference: the entry goes
# when the input does (a weakref's target is alive, so its id cannot have been reused).
_LAST_INPUT: list = [None, -1, None, None]


def _forget(ref) -> None:
    if _LAST_INPUT[0] is ref:
        _LAST_INPUT[:] = [None, -1, None, None]


def _shared_input(x: torch.Tensor, args, static_scale: torch.Tensor | None, fake_quant: bool = False):
    """`_quantize_input` (codes, scale), or with `fake_quant` codes x scale (compressed-tensors'
    fake-quantized input), reusing the previous call's result when it was made from this very
    tensor (same object, unchanged since) with a dynamic scale, which depends on x alone."""
    if not args.dynamic:
        q, s = _quantize_input(x, args, static_scale)
        return q * s if fake_quant else (q, s)
    ref, version, kind, out = _LAST_INPUT
    if ref is not None and ref() is x and version == x._version and kind == fake_quant:
        return out
    q, s = _quantize_input(x, args, static_scale)
    out = q.mul_(s) if fake_quant else (q, s)
    _LAST_INPUT[:] = [weakref.ref(x, _forget), x._version, fake_quant, out]
    return out


class _FP8Forward:
    """A compressed-tensors FP8 Linear's forward, batch-invariant (module docstring): on the float32
    tiles path stock's product (fake-quantized input x decompressed weight, in `mm_tiles`); on the
    float64 path exact, on the FP8 codes."""

    def __init__(self, module: torch.nn.Linear, scale: torch.Tensor, tiles: bool):  # float64: module.weight holds the codes (install)
        self.module, self.tiles = module, tiles
        self.threads = torch.get_num_threads()  # what the tiles were checked with
        self.args = module.quantization_scheme.input_activations
        self.out_scale = scale.reshape(-1).double()  # per output channel, or one per tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.tiles:
            if (now := torch.get_num_threads()) != self.threads:  # another thread count may block the sums otherwise
                raise QuantpipeError(f"batch-invariant FP8: torch's threads went from {self.threads} to {now} after the load check; reload")
            xq = _shared_input(x, self.args, getattr(m, "input_scale", None), fake_quant=True)
            y = mm_tiles(xq.reshape(-1, xq.shape[-1]), m.weight.T).reshape(*xq.shape[:-1], -1).to(x.dtype)
        else:
            q, s = _shared_input(x, self.args, getattr(m, "input_scale", None))
            s = s if s.ndim == x.ndim else s.reshape(1)
            acc = q.double() @ m.weight.double().T  # exact (module docstring)
            y = (acc * s.double() * self.out_scale).to(x.dtype)
        return y if m.bias is None else y + m.bias


def _supported(module) -> str | None:
    """Why this quantized Linear cannot be computed exactly here (None: it can)."""
    scheme = getattr(module, "quantization_scheme", None)
    w, a = scheme.weights, scheme.input_activations
    for name, args in (("weights", w), ("input activations", a)):
        if args is None or args.type != "float" or args.num_bits != 8 or not args.symmetric:
            return f"{name} {args}"
    if w.strategy not in ("channel", "tensor") or w.dynamic:
        return f"weight strategy {w.strategy}"
    if not ((a.dynamic is True and a.strategy == "token") or (a.dynamic is False and a.strategy == "tensor")):
        return f"input activation strategy {a.strategy} (dynamic={a.dynamic})"
    if scheme.output_activations is not None or getattr(module, "weight_global_scale", None) is not None:
        return "output activations or a global scale"
    return None


def quantized_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """The compressed-tensors Linear modules that quantize their input at run time."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and getattr(getattr(m, "quantization_scheme", None), "input_activations", None) is not None
    ]


def _decompress(model) -> None:
    """Run transformers' decompression (it otherwise happens on the first forward): afterwards the
    weights are float32 codes x scales, which `install` turns back into codes."""
    with torch.no_grad():
        model(torch.zeros((1, 1), dtype=torch.long, device=model.device), use_cache=False)


def _weight_codes(name: str, module) -> torch.Tensor:
    """The module's FP8 weight codes (float32), checked to reproduce its decompressed weight."""
    w, scale = module.weight.data, module.weight_scale.data.float()
    codes = w.float() if w.dtype == torch.float8_e4m3fn else _fp8_codes(w.float() / scale)
    if w.dtype != torch.float8_e4m3fn and not torch.equal(codes * scale, w.float()):
        raise QuantpipeError(f"{name}: its decompressed weight is not FP8 codes x weight_scale; cannot evaluate it batch-invariantly")
    return codes


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


AttentionInterface.register("fp64_invariant", fp64_attention)
AttentionMaskInterface.register("fp64_invariant", sdpa_mask)

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
    """transformers attention (AttentionInterface) in float32, batch-invariant (module docstring).
    query [b, heads, q, d]; key, value [b, kv_heads, k, d]; attention_mask: sdpa's boolean mask
    [b, 1, q, k] (True: attend) or None for a causal pass."""
    if dropout or any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "softcap")):
        raise QuantpipeError(f"{type(module).__name__}: batch-invariant attention supports plain softmax attention only")
    if (trie := PACKED.get()) is not None and not _GENERATING.get():
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
    for a, t in _tiles(rows, ATTENTION_TILES):  # a generation step has as few rows as query heads per key head
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
    token = PACKED.set(None)
    try:
        for a in range(0, len(paths), UNPACKED_ROWS):
            idx = paths[a : a + UNPACKED_ROWS]
            n = len(idx)
            q = query[0][:, q_nodes[a : a + UNPACKED_ROWS]].transpose(0, 1)  # [n, heads, most, d]
            k = torch.cat([key[:, :, :prefix].expand(n, -1, -1, -1), key[0][:, prefix + idx].transpose(0, 1)], 2)
            v = torch.cat([value[:, :, :prefix].expand(n, -1, -1, -1), value[0][:, prefix + idx].transpose(0, 1)], 2)
            out.append(f32_attention(module, q, k, v, allowed[a : a + UNPACKED_ROWS, None], scaling=scaling)[0])
    finally:
        PACKED.reset(token)
    real = (torch.arange(most) < fresh[:, None]).to(dev)
    return torch.cat(out)[real][None], None  # suffix by suffix, its fresh nodes: the node order


AttentionInterface.register("f32_invariant", f32_attention)
AttentionMaskInterface.register("f32_invariant", sdpa_mask)


class _Generating:
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


def _fp64_head(head: torch.nn.Linear):
    """The LM head in float64, rounded once; the weight is converted HEAD_BLOCK vocabulary rows at a
    time, so memory holds a block's float64 copy, not the whole head's (0.5 GiB at 262k x 576)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, xd = head.weight, x.double()
        y = x.new_empty(*x.shape[:-1], w.shape[0])
        for a in range(0, w.shape[0], HEAD_BLOCK):  # each logit is still one float64 dot product, rounded once
            y[..., a : a + HEAD_BLOCK] = (xd @ w[a : a + HEAD_BLOCK].double().T).to(x.dtype)
        return y if head.bias is None else y + head.bias

    return forward


def _tiled_head(head: torch.nn.Linear):
    """The LM head as float32 tiles (`mm_tiles`)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = mm_tiles(x.reshape(-1, x.shape[-1]).to(head.weight.dtype), head.weight.T).reshape(*x.shape[:-1], -1).to(x.dtype)
        return y if head.bias is None else y + head.bias

    return forward


def _call_shapes(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """One transposed weight slice per distinct `mm_tiles` call shape: the first and the last
    COL_BLOCK columns of each distinct weight shape."""
    seen: dict[tuple, torch.Tensor] = {}
    for w in weights:
        wt = w.T
        for c in (0, (wt.shape[1] - 1) // COL_BLOCK * COL_BLOCK):
            block = wt[:, c : c + COL_BLOCK]
            seen.setdefault((block.shape, block.dtype, block.device), block)
    return list(seen.values())


def unsupported(model) -> str | None:
    """Why `model` cannot be evaluated batch-invariantly (None: it can)."""
    linears = quantized_linears(model)
    if not linears:
        return "no Linear layer quantizes its input at run time"
    problems = [f"{n}: {why}" for n, m in linears if (why := _supported(m))]
    return problems[0] if problems else None


def install(model, tiles: bool | None = None) -> str:
    """Make `model` (a loaded compressed-tensors checkpoint with run-time activation quantization)
    batch-invariant, in place; returns how it is now evaluated. `tiles`: float32 tiles (True) or
    float64 (False); None: tiles on a CPU where every call shape passes `tiles_are_invariant`.
    Changing what this computes needs a new TransformersBackend.activation_kernel (it enters
    these rows' result keys)."""
    if (why := unsupported(model)) is not None:
        raise QuantpipeError(f"batch-invariant FP8 evaluation: {why}")
    linears = quantized_linears(model)
    _decompress(model)
    codes = {name: _weight_codes(name, m) for name, m in linears}
    head = model.get_output_embeddings()
    head = head if isinstance(head, torch.nn.Linear) else None
    if tiles is None:
        weights = [m.weight.data for _, m in linears] + ([head.weight] if head is not None else [])
        on_cpu = all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)
        tiles = FLOAT32_TILES and on_cpu and all(tiles_are_invariant(wt) for wt in _call_shapes(weights))
    for name, m in linears:
        # float64 multiplies the codes, the tiles codes x scales (the decompressed weight); same size
        w = codes[name] if not tiles else codes[name] * m.weight_scale.data.float()
        m.weight = torch.nn.Parameter(w, requires_grad=False)
        m.forward = _FP8Forward(m, m.weight_scale.data.float(), tiles)
    f32 = tiles and _f32_attention_applies(model)
    model.set_attn_implementation("f32_invariant" if f32 else "fp64_invariant")
    if f32:
        model.generate = _Generating(model.generate)
    if head is not None:
        head.forward = _tiled_head(head) if tiles else _fp64_head(head)
    how = f"float32 in fixed {'/'.join(map(str, TILES))}-row GEMM tiles (checked invariant at load)" if tiles else "exact in float64"
    att = f"float32 in {KEY_BLOCK}-key blocks (checked invariant at load)" if f32 else "in float64"
    return f"batch-invariant: {len(linears)} FP8 Linear layers and the LM head {how}, attention {att}"


def _f32_attention_applies(model) -> bool:
    """Whether `f32_attention` can serve this model here: every layer attends to all earlier keys
    (its blocks are placed by key index, which a sliding-window cache shifts) and the load check
    passes on the model's head shapes."""
    if not full_attention_only(model):
        return False
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return attention_is_invariant(heads, kv_heads, head_dim)
