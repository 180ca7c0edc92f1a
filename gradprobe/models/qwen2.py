"""Qwen2 adapter: Llama layout (q/k/v carry biases) with per-layer full or sliding attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from gradprobe.models.base import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)

    def mask_builder(self, model: nn.Module, layer_idx: int) -> Any:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        layer_types = getattr(model.config, "layer_types", None) or []
        kind = layer_types[layer_idx] if layer_idx < len(layer_types) else "full_attention"
        return create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
