"""Attention implementations quantpipe adds to transformers, and what they need to know of a model.

`register_attention` makes one known to transformers under a name (its mask: sdpa's boolean mask);
it is called where a model is set up to use it (PrefixCachingHFLM, batch_invariant.install), not at
import. `sdpa_gqa` is transformers' SDPA attention with grouped-query key/value heads read in place:
transformers copies each key/value head once per query head before SDPA unless the device is CUDA
with no mask; on CPU that copy cost as much as the attention itself. torch's CPU flash kernel reads
the shared head directly (`enable_gqa`) and returns bit-identical outputs (tested), so nothing else
changes.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


def register_attention(name: str, forward) -> None:
    """Make `forward` transformers' attention implementation `name`, masked as sdpa is (idempotent)."""
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def full_attention_only(model) -> bool:
    """Whether every layer attends to all earlier keys (no sliding-window layer)."""
    cfg = model.config.get_text_config()
    return not getattr(cfg, "sliding_window", None) and not any("sliding" in str(t) for t in getattr(cfg, "layer_types", None) or [])


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, with GQA key/value heads read in place on CPU."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type != "cpu" or groups == 1 or kwargs.get("position_bias") is not None or key.shape[-1] != value.shape[-1]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # the rest of sdpa_attention_forward's CPU path, with enable_gqa instead of repeat_kv
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > query.shape[2]:
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def use_sdpa_gqa(model) -> None:
    """Switch a model on transformers' sdpa attention to `sdpa_gqa` (the same outputs, bit for bit)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        register_attention("sdpa_gqa", sdpa_gqa_forward)
        model.set_attn_implementation("sdpa_gqa")
