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
"evaluated as" text); hf.py calls it for such checkpoints and then shares prefixes. The Linear
layers and the LM head are in invariant_linear.py, the attention in invariant_attention.py.
"""

from __future__ import annotations

import torch

from ..errors import QuantpipeError
from .attention import full_attention_only, register_attention
from .invariant_attention import KEY_BLOCK, Generating, attention_is_invariant, f32_attention, fp64_attention
from .invariant_linear import TILES, FP8Forward, SharedInput, call_shapes, fp8_codes, fp64_head, tiled_head, tiles_are_invariant

# False: always the exact float64 path (tests compare both).
FLOAT32_TILES = True


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
    codes = w.float() if w.dtype == torch.float8_e4m3fn else fp8_codes(w.float() / scale)
    if w.dtype != torch.float8_e4m3fn and not torch.equal(codes * scale, w.float()):
        raise QuantpipeError(f"{name}: its decompressed weight is not FP8 codes x weight_scale; cannot evaluate it batch-invariantly")
    return codes


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
        tiles = FLOAT32_TILES and on_cpu and all(tiles_are_invariant(wt) for wt in call_shapes(weights))
    inputs = SharedInput()  # q/k/v (and gate/up) quantize the input they share once
    for name, m in linears:
        # float64 multiplies the codes, the tiles codes x scales (the decompressed weight); same size
        w = codes[name] if not tiles else codes[name] * m.weight_scale.data.float()
        m.weight = torch.nn.Parameter(w, requires_grad=False)
        m.forward = FP8Forward(m, m.weight_scale.data.float(), tiles, inputs)
    f32 = tiles and _f32_attention_applies(model)
    name, attention = ("f32_invariant", f32_attention) if f32 else ("fp64_invariant", fp64_attention)
    register_attention(name, attention)
    model.set_attn_implementation(name)
    if f32:
        model.generate = Generating(model.generate)
    if head is not None:
        head.forward = tiled_head(head) if tiles else fp64_head(head)
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
