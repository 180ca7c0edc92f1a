"""Mistral adapter: a Llama layout whose causal mask may carry a sliding window."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradprobe.models.base import ModelAdapter


class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)

    def attention_mask(
        self,
        model: nn.Module,
        layer_idx: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> Any:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        fn = (
            create_causal_mask
            if getattr(model.config, "sliding_window", None) is None
            else create_sliding_window_causal_mask
        )
        return fn(
            config=model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
