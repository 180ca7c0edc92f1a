"""Llama / Llama-2 / Llama-3 (and SmolLM2, which is a Llama) adapter."""

from __future__ import annotations

from gradprobe.models.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)
