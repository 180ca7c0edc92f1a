"""Qwen2 adapter: Llama layout (q/k/v carry biases) with per-layer full or sliding attention."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradprobe.models.base import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)

    def attention_mask(
        self,
        model: nn.Module,
        layer_idx: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> Any:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        layer_types = getattr(model.config, "layer_types", None) or []
        kind = layer_types[layer_idx] if layer_idx < len(layer_types) else "full_attention"
        fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        return fn(
            config=model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
