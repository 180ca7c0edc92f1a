"""Adapter registry keyed by ``config.model_type``."""

from __future__ import annotations

from typing import Any

from gradprobe.models.base import ModelAdapter
from gradprobe.models.llama import LlamaAdapter
from gradprobe.models.mistral import MistralAdapter
from gradprobe.models.qwen2 import Qwen2Adapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls for cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter) for t in cls.model_types
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(ADAPTERS))


def get_adapter(model_or_config: Any) -> ModelAdapter:
    """The adapter for a model (anything with ``.config``) or a config (anything with ``.model_type``).

    Raises:
        ValueError: the family is not supported (the message lists the supported ones).
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"get_adapter needs a Hugging Face model or config with .model_type, got {type(model_or_config).__name__}"
        )
    try:
        return ADAPTERS[model_type]()
    except KeyError:
        raise ValueError(
            f"unsupported model family {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "ModelAdapter", "get_adapter"]
