"""Model-family adapters: the explicit map from a Hugging Face causal LM to what the driver needs.

An adapter never patches ``transformers``; it only reads modules and builds the keyword arguments a
decoder layer's ``forward`` expects. Checked against transformers 5.x, where every decoder layer is
called as ``layer(hidden_states, attention_mask=..., position_ids=..., position_embeddings=(cos, sin))``
with the rotary ``(cos, sin)`` computed once by ``model.model.rotary_emb`` and returns a tensor
(4.x returned a tuple; :meth:`ModelAdapter.layer_output` accepts both).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

# Order matters: it is the order of the report rows and of the "global" selection group.
LLAMA_LINEARS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class ModelAdapter:
    """Base adapter for Llama-style decoder-only models (``model.model.layers``, ``model.lm_head``).

    Subclasses set ``model_types`` and override only what differs.
    """

    model_types: tuple[str, ...] = ()
    linear_names: tuple[str, ...] = LLAMA_LINEARS

    # --- structure ----------------------------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        """The bare decoder (``LlamaModel``): ``model.model`` for a ``*ForCausalLM``, else ``model``."""
        return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in execution order."""
        return self.backbone(model).layers

    def prunable_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Prunable linears of one decoder layer, ordered q, k, v, o, gate, up, down.

        Keys are names relative to the layer (``"self_attn.q_proj"``); values are the ``nn.Linear``
        modules, weight shape (out_features, in_features).
        """
        out: dict[str, nn.Linear] = {}
        for name in self.linear_names:
            mod = layer.get_submodule(name)
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"{type(layer).__name__}.{name} is {type(mod).__name__}, expected nn.Linear")
            out[name] = mod
        return out

    def embed(self, model: nn.Module) -> nn.Embedding:
        """Token embedding, weight (vocab, hidden)."""
        return self.backbone(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last decoder layer (its output feeds ``lm_head``)."""
        return self.backbone(model).norm

    def lm_head(self, model: nn.Module) -> nn.Linear | None:
        """Output projection, weight (vocab, hidden); None for a bare backbone."""
        return getattr(model, "lm_head", None)

    def rotary_emb(self, model: nn.Module) -> nn.Module | None:
        return getattr(self.backbone(model), "rotary_emb", None)

    def lm_head_tied(self, model: nn.Module) -> bool:
        head = self.lm_head(model)
        return head is not None and head.weight is self.embed(model).weight

    # --- forward ------------------------------------------------------------------------------
    def attention_mask(
        self,
        model: nn.Module,
        layer_idx: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> Any:
        """The mask object layer ``layer_idx`` takes, built as the model's own forward builds it."""
        build = self.mask_builder(model, layer_idx)
        # no KV cache; newer transformers name that argument ``cache`` (``past_key_values`` is deprecated)
        no_cache = {_cache_kwarg(build): None}
        return build(
            config=model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **no_cache,
        )

    def mask_builder(self, model: nn.Module, layer_idx: int) -> Any:
        """The transformers mask factory for layer ``layer_idx`` (full causal attention here)."""
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask

    def kwargs_key(self, model: nn.Module, layer_idx: int) -> Hashable:
        """Layers with equal keys take identical :meth:`layer_forward_kwargs` (for the same hidden
        shape): the mask factory, since the rotary embedding is the backbone's one module."""
        return self.mask_builder(model, layer_idx)

    def layer_forward_kwargs(
        self,
        model: nn.Module,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        layer_idx: int = 0,
    ) -> dict[str, Any]:
        """Keyword arguments for ``decoder_layers(model)[layer_idx](hidden, **kwargs)``.

        Args:
            hidden: (batch, seqlen, hidden) in the model's dtype, on the compute device; only its
                shape, dtype and device are used.
            attention_mask: (batch, seqlen) 0/1 padding mask or None (calibration windows are unpadded).
            position_ids: (1 or batch, seqlen) int64, default ``arange(seqlen)``.

        Returns:
            ``attention_mask`` (None, a 4-D additive/bool mask, or a BlockMask, as the model's
            attention implementation wants), ``position_ids``, ``position_embeddings`` = (cos, sin),
            each (1 or batch, seqlen, head_dim), and ``use_cache=False``.
        """
        seqlen = hidden.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=hidden.device).unsqueeze(0)
        kwargs: dict[str, Any] = {
            "attention_mask": self.attention_mask(model, layer_idx, hidden, attention_mask, position_ids),
            "position_ids": position_ids,
            "use_cache": False,
        }
        rotary = self.rotary_emb(model)
        if rotary is not None:
            rot_device = (
                next(rotary.buffers()).device if any(True for _ in rotary.buffers()) else hidden.device
            )
            if rot_device != hidden.device:
                cos, sin = rotary(hidden.to(rot_device), position_ids=position_ids.to(rot_device))
                kwargs["position_embeddings"] = (cos.to(hidden.device), sin.to(hidden.device))
            else:
                kwargs["position_embeddings"] = rotary(hidden, position_ids=position_ids)
        return kwargs

    @staticmethod
    def layer_output(out: Any) -> torch.Tensor:
        """The hidden states a decoder layer returned (a tensor in transformers 5, a tuple in 4.x)."""
        return out[0] if isinstance(out, (tuple, list)) else out


@functools.cache
def _cache_kwarg(factory: Any) -> str:
    """``"cache"`` if the transformers mask factory takes it, else the older ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(factory).parameters else "past_key_values"
