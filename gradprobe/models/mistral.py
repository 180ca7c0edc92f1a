"""Mistral adapter: a Llama layout whose causal mask may carry a sliding window."""

from __future__ import annotations

from typing import Any

from torch import nn

from gradprobe.models.base import ModelAdapter


class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)

    def mask_builder(self, model: nn.Module, layer_idx: int) -> Any:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if getattr(model.config, "sliding_window", None) is None:
            return create_causal_mask
        return create_sliding_window_causal_mask
