"""TurboQuant (Zandieh, Daliri, Hadian, Mirrokni; arXiv 2504.19874): online vector quantization.

MSE quantizer (TurboQuant_mse), for a vector x in R^d:
  store ||x||; rotate u = x/||x|| by a fixed random orthogonal Pi, so each coordinate of Pi u
  follows the law of one coordinate of a uniform point on the sphere (density proportional to
  (1 - t^2)^((d-3)/2), about N(0, 1/d)); quantize each coordinate with the b-bit Lloyd-Max
  codebook of that law. The paper bounds E||u - u_hat||^2 by (sqrt(3)*pi/2) * 4^-b and reports
  about 0.36, 0.117, 0.03, 0.009 for b = 1..4.
Inner-product quantizer (TurboQuant_prod): b-1 bits of MSE quantization, then a 1-bit QJL sketch
  of the residual r: sign(S r) with S Gaussian, decoded as ||r|| sqrt(pi/2)/d * S^T sign(S r).
  <y, x_hat> is then an unbiased estimate of <y, x>; the MSE quantizer alone shrinks it.

Also here: the KV-cache hook (a transformers DynamicCache that quantizes what it stores) and the
weight quantizer, both used by stages/turboquant.py. Everything is plain torch on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import torch

PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}


def mse_bound(bits: int) -> float:
    return math.sqrt(3) * math.pi / 2 * 4.0 ** (-bits)


@lru_cache(maxsize=64)
def lloyd_max_codebook(d: int, bits: int, iters: int = 300) -> torch.Tensor:
    """Optimal scalar codebook (2^bits centroids) for one coordinate of a uniform unit vector in R^d."""
    t = np.linspace(-1, 1, 200_001)[1:-1]
    logpdf = ((d - 3) / 2) * np.log1p(-t * t)
    w = np.exp(logpdf - logpdf.max())
    w /= w.sum()
    k = 2**bits
    # start from quantiles, then alternate nearest-centroid boundaries and conditional means
    cdf = np.cumsum(w)
    c = np.interp((np.arange(k) + 0.5) / k, cdf, t)
    for _ in range(iters):
        edges = (c[1:] + c[:-1]) / 2
        idx = np.searchsorted(edges, t)
        mass = np.bincount(idx, weights=w, minlength=k)
        new = np.bincount(idx, weights=w * t, minlength=k) / np.maximum(mass, 1e-300)
        if np.allclose(new, c, atol=1e-12):
            break
        c = new
    return torch.tensor(np.sort(c), dtype=torch.float32)


@lru_cache(maxsize=64)
def rotation(d: int, seed: int) -> torch.Tensor:
    """A fixed random orthogonal matrix (Haar, via QR of a Gaussian with sign fix)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    return q.to(torch.float32)


@lru_cache(maxsize=64)
def qjl_matrix(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randn(d, d, generator=g, dtype=torch.float32)


def quantize_mse(x: torch.Tensor, bits: int, seed: int = 0, norm_correction: bool = False) -> torch.Tensor:
    """Quantize-dequantize the last dimension of x with TurboQuant_mse (returns x's dtype)."""
    d = x.shape[-1]
    xf = x.float()
    norm = xf.norm(dim=-1, keepdim=True)
    u = xf / norm.clamp_min(1e-30)
    pi = rotation(d, seed)
    y = u @ pi.T
    cb = lloyd_max_codebook(d, bits)
    idx = torch.bucketize(y, (cb[1:] + cb[:-1]) / 2)
    yq = cb[idx]
    if norm_correction:  # re-normalise the reconstruction to unit length before scaling back
        yq = yq / yq.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return ((yq @ pi) * norm).to(x.dtype)


def quantize_prod(x: torch.Tensor, bits: int, seed: int = 0) -> torch.Tensor:
    """TurboQuant_prod: (bits-1)-bit MSE quantization + 1-bit QJL of the residual (unbiased <y, x>)."""
    if bits < 1:
        raise ValueError("bits must be >= 1")
    d = x.shape[-1]
    xf = x.float()
    base = quantize_mse(xf, bits - 1, seed) if bits > 1 else torch.zeros_like(xf)
    r = xf - base
    s = qjl_matrix(d, seed)
    signs = torch.sign(r @ s.T)
    signs[signs == 0] = 1
    est = math.sqrt(math.pi / 2) / d * r.norm(dim=-1, keepdim=True) * (signs @ s)
    return (base + est).to(x.dtype)


def quantize_uniform(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max uniform quantization per vector (what vLLM's presets use for values)."""
    xf = x.float()
    lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    return (torch.round((xf - lo) / scale) * scale + lo).to(x.dtype)


# -- KV cache ---------------------------------------------------------------------------------------


@dataclass
class KVConfig:
    key_bits: int = 3
    value_bits: int = 4
    key_method: str = "lloyd-max"  # lloyd-max (rotation + codebook) | uniform
    value_method: str = "uniform"
    qjl: bool = False  # spend one key bit on the QJL residual sketch (TurboQuant_prod)
    norm_correction: bool = False
    skip_layers: list[int] = field(default_factory=lambda: [0, 1, -2, -1])
    seed: int = 0
    mode: str = "stress"  # stress: prefill K/V quantized too | engine: exact prefill, quantized cache

    def skipped(self, num_layers: int) -> set[int]:
        return {i % num_layers for i in self.skip_layers}

    def _bits(self, bits: int, method: str, head_dim: int) -> float:
        # per-vector side information: one fp16 norm (lloyd-max) or fp16 scale + zero (uniform)
        return bits + (16 if method == "lloyd-max" else 32) / head_dim

    def effective_bits(self, head_dim: int, num_layers: int) -> float:
        """Average stored bits per KV element, skipped layers counted at 16 (bf16)."""
        q = (self._bits(self.key_bits, self.key_method, head_dim) + self._bits(self.value_bits, self.value_method, head_dim)) / 2
        n_skip = len(self.skipped(num_layers))
        return (q * (num_layers - n_skip) + 16 * n_skip) / num_layers


PRESETS = {  # named after vLLM's --kv-cache-dtype values; "nc" = norm correction
    "turboquant_k8v4": KVConfig(key_bits=8, value_bits=4),
    "turboquant_4bit_nc": KVConfig(key_bits=4, value_bits=4, norm_correction=True),
    "turboquant_k3v4_nc": KVConfig(key_bits=3, value_bits=4, norm_correction=True),
    "turboquant_3bit_nc": KVConfig(key_bits=3, value_bits=3, norm_correction=True),
}


def _qdq(x: torch.Tensor, bits: int, method: str, cfg: KVConfig, layer: int, qjl: bool) -> torch.Tensor:
    if method == "uniform":
        return quantize_uniform(x, bits)
    seed = cfg.seed * 1000 + layer
    if qjl:
        return quantize_prod(x, bits, seed)
    return quantize_mse(x, bits, seed, cfg.norm_correction)


def make_kv_cache(cfg: KVConfig, model_config):
    """A DynamicCache whose update() stores quantize-dequantized K/V (per token, per KV head).

    Quantizing inside update() (not after it) means every token is quantized exactly once and the
    prefill sees quantized K/V in `stress` mode; transformers' own QuantizedCache returns the
    unquantized states on its first update, so log-likelihood tasks would show no effect.
    In `engine` mode the current forward's own K/V stay exact (as an engine's prefill attends to
    the fresh K/V), while everything read back from the cache later is quantized.
    """
    from transformers import DynamicCache

    text_cfg = getattr(model_config, "text_config", model_config)
    skipped = cfg.skipped(text_cfg.num_hidden_layers)

    class TurboQuantKVCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if layer_idx in skipped:
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            kq = _qdq(key_states, cfg.key_bits, cfg.key_method, cfg, layer_idx, cfg.qjl)
            vq = _qdq(value_states, cfg.value_bits, cfg.value_method, cfg, layer_idx, False)
            k_all, v_all = super().update(kq, vq, layer_idx, *args, **kwargs)
            n = key_states.shape[-2]
            if cfg.mode == "engine" and n > 1:
                return (
                    torch.cat([k_all[..., :-n, :], key_states], dim=-2),
                    torch.cat([v_all[..., :-n, :], value_states], dim=-2),
                )
            return k_all, v_all

    return TurboQuantKVCache(config=model_config)


KV_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def kv_cache_problem(model_config) -> str | None:
    """Why the KV-cache quantizer cannot run on this architecture, or None. It quantizes what each
    attention layer stores per token; recurrent or compressed layer states are something else."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text_cfg = model_config.get_text_config(decoder=True)
    arch = (getattr(model_config, "architectures", None) or [model_config.model_type])[0]
    other = sorted(set(get_layer_types_and_kwargs(text_cfg)[0]) - set(KV_LAYER_TYPES))
    if other:
        return (
            f"TurboQuant KV cache: {arch} has {', '.join(other)} layers, whose cached state is not per-token "
            f"keys and values; only {', '.join(KV_LAYER_TYPES)} layers can be quantized"
        )
    return None


def apply_kv_cache(model, config: dict) -> str:
    """Runtime patch (named in an artifact's meta): every forward without a cache of ours gets one.
    The wrapper keeps forward's signature (functools.wraps): transformers and PrefixCachingHFLM read
    it to find `logits_to_keep`, without which generate computes logits at every prompt position."""
    import functools

    from transformers import DynamicCache

    from ..errors import QuantpipeError

    if problem := kv_cache_problem(model.config):
        raise QuantpipeError(problem)
    cfg = KVConfig(**config)
    original = model.forward
    cache_type = type(make_kv_cache(cfg, model.config))

    @functools.wraps(original)
    def forward(*args, past_key_values=None, use_cache=None, **kwargs):
        fresh = past_key_values is None or (
            isinstance(past_key_values, DynamicCache)
            and not isinstance(past_key_values, cache_type)
            and past_key_values.get_seq_length() == 0
        )
        if fresh:
            past_key_values, use_cache = make_kv_cache(cfg, model.config), True
        return original(*args, past_key_values=past_key_values, use_cache=use_cache, **kwargs)

    model.forward = forward
    text_cfg = getattr(model.config, "text_config", model.config)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    bits = cfg.effective_bits(head_dim, text_cfg.num_hidden_layers)
    return (
        f"TurboQuant KV k{cfg.key_bits}{'+qjl' if cfg.qjl else ''}/v{cfg.value_bits} "
        f"({bits:.2f} b/elt, {cfg.mode} mode, layers {sorted(cfg.skipped(text_cfg.num_hidden_layers))} unquantized)"
    )


def kv_config_dict(cfg: KVConfig) -> dict:
    return asdict(cfg)


# -- weights ----------------------------------------------------------------------------------------


def quantize_weight(w: torch.Tensor, bits: int, block: int, seed: int) -> torch.Tensor:
    """Rotation + Lloyd-Max per block of `block` consecutive input weights of each row."""
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"input width {cols} is not a multiple of block {block}")
    blocks = w.float().reshape(rows, cols // block, block)
    return quantize_mse(blocks, bits, seed).reshape(rows, cols).to(w.dtype)
