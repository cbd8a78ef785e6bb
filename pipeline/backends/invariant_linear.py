"""The Linear layers and the LM head of a batch-invariant FP8 model (batch_invariant.py): FP8 codes
and scales exactly as compressed-tensors computes them, and a product that gives each row the same
bits whatever the other rows are, either as float32 GEMM calls of a few fixed shapes (`mm_tiles`,
checked per machine by `tiles_are_invariant`) or exactly in float64 on the codes (`FP8Forward`).
"""

from __future__ import annotations

import weakref

import torch

from ..errors import QuantpipeError

FP8_MAX = 448.0

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


_FP8_VALUES: dict = {}


def from_fp8(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes.to(dtype), on CPU by a lookup in a table of the 256 codes' values made by that same
    cast (so the same bits): torch's float8 -> float32 cast there is scalar, about twice as slow."""
    if codes.device.type != "cpu":
        return codes.to(dtype)
    table = _FP8_VALUES.get(dtype)
    if table is None:
        table = _FP8_VALUES[dtype] = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).to(dtype)
    return torch.take(table, codes.view(torch.uint8).long())


def fp8_codes(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' round_to_quantized_type for FP8: clamp to +-448, round to e4m3, back."""
    return from_fp8(torch.clamp(x, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), x.dtype)


def quantize_input(x: torch.Tensor, args, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
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
        return from_fp8((x / scale).to(torch.float8_e4m3fn), x.dtype), scale
    return fp8_codes(x / static_scale), static_scale


def tile_spans(m: int, sizes: tuple[int, ...], pad_up: float = 1.0):
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
    TILES (batch_invariant.py): the same kinds of calls on the same kind of buffer for a row whatever
    the other rows are."""
    m, k = x.shape
    if not x.is_contiguous() or x.data_ptr() % 64:
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh allocation: 64-byte aligned
    y = x.new_empty(m, wt.shape[1])
    for a, t in tile_spans(m, TILES, PAD_UP):
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
    x = fp8_codes(torch.randn(17, wt.shape[0], generator=gen, dtype=wt.dtype).mul_(16.0)).to(wt.device)
    x[3] *= 1e-3  # rows of very different magnitudes side by side
    alone = torch.cat([mm(x[i : i + 1], wt) for i in range(17)])
    order = torch.arange(17, device=wt.device)
    shuffled = torch.randint(0, 17, (max(TILES) + sum(TILES) + 3,), generator=gen).to(wt.device)
    arrangements = [order, order.roll(1), order.flip(0), order[5:9], order[:1].repeat(18), shuffled, shuffled[7:], order.repeat(20)]
    # every tile size full and zero-padded, whatever tiles `_tiles` picks for the lengths above
    arrangements += [shuffled[i : i + n] for i, t in enumerate(TILES) for n in (t, t - 3)]
    return all(torch.equal(mm(x[rows], wt), alone[rows]) for rows in arrangements)


class SharedInput:
    """The last input quantized with a dynamic scale, and what was made of it: q/k/v projections (and
    gate/up) read the same tensor, which is then quantized once. One per model (`install`), shared
    by its FP8 Linear layers. A weak reference: the entry goes when the input does (a weakref's
    target is alive, so its id cannot have been reused)."""

    def __init__(self):
        self.entry: tuple | None = None  # (weak reference to the input, its version, fake_quant, result)

    def _forget(self, ref) -> None:
        if self.entry is not None and self.entry[0] is ref:
            self.entry = None

    def __call__(self, x: torch.Tensor, args, static_scale: torch.Tensor | None, fake_quant: bool = False):
        """`quantize_input` (codes, scale), or with `fake_quant` codes x scale (compressed-tensors'
        fake-quantized input), reusing the previous call's result when it was made from this very
        tensor (same object, unchanged since) with a dynamic scale, which depends on x alone."""
        if not args.dynamic:
            q, s = quantize_input(x, args, static_scale)
            return q * s if fake_quant else (q, s)
        if self.entry is not None:
            ref, version, kind, out = self.entry
            if ref() is x and version == x._version and kind == fake_quant:
                return out
        q, s = quantize_input(x, args, static_scale)
        out = q.mul_(s) if fake_quant else (q, s)
        self.entry = (weakref.ref(x, self._forget), x._version, fake_quant, out)
        return out


class FP8Forward:
    """A compressed-tensors FP8 Linear's forward, batch-invariant (batch_invariant.py): on the float32
    tiles path stock's product (fake-quantized input x decompressed weight, in `mm_tiles`); on the
    float64 path exact, on the FP8 codes."""

    def __init__(self, module: torch.nn.Linear, scale: torch.Tensor, tiles: bool, inputs: SharedInput):
        # float64: module.weight holds the codes (install); `inputs`: the model's quantized-input memo
        self.module, self.tiles, self.inputs = module, tiles, inputs
        self.threads = torch.get_num_threads()  # what the tiles were checked with
        self.args = module.quantization_scheme.input_activations
        self.out_scale = scale.reshape(-1).double()  # per output channel, or one per tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.tiles:
            if (now := torch.get_num_threads()) != self.threads:  # another thread count may block the sums otherwise
                raise QuantpipeError(f"batch-invariant FP8: torch's threads went from {self.threads} to {now} after the load check; reload")
            xq = self.inputs(x, self.args, getattr(m, "input_scale", None), fake_quant=True)
            y = mm_tiles(xq.reshape(-1, xq.shape[-1]), m.weight.T).reshape(*xq.shape[:-1], -1).to(x.dtype)
        else:
            q, s = self.inputs(x, self.args, getattr(m, "input_scale", None))
            s = s if s.ndim == x.ndim else s.reshape(1)
            acc = q.double() @ m.weight.double().T  # exact (batch_invariant.py)
            y = (acc * s.double() * self.out_scale).to(x.dtype)
        return y if m.bias is None else y + m.bias


def fp64_head(head: torch.nn.Linear):
    """The LM head in float64, rounded once; the weight is converted HEAD_BLOCK vocabulary rows at a
    time, so memory holds a block's float64 copy, not the whole head's (0.5 GiB at 262k x 576)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, xd = head.weight, x.double()
        y = x.new_empty(*x.shape[:-1], w.shape[0])
        for a in range(0, w.shape[0], HEAD_BLOCK):  # each logit is still one float64 dot product, rounded once
            y[..., a : a + HEAD_BLOCK] = (xd @ w[a : a + HEAD_BLOCK].double().T).to(x.dtype)
        return y if head.bias is None else y + head.bias

    return forward


def tiled_head(head: torch.nn.Linear):
    """The LM head as float32 tiles (`mm_tiles`)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = mm_tiles(x.reshape(-1, x.shape[-1]).to(head.weight.dtype), head.weight.T).reshape(*x.shape[:-1], -1).to(x.dtype)
        return y if head.bias is None else y + head.bias

    return forward


def call_shapes(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """One transposed weight slice per distinct `mm_tiles` call shape: the first and the last
    COL_BLOCK columns of each distinct weight shape."""
    seen: dict[tuple, torch.Tensor] = {}
    for w in weights:
        wt = w.T
        for c in (0, (wt.shape[1] - 1) // COL_BLOCK * COL_BLOCK):
            block = wt[:, c : c + COL_BLOCK]
            seen.setdefault((block.shape, block.dtype, block.device), block)
    return list(seen.values())
