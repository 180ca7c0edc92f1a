"""``gradprobe.prune``: the one-call entry point for an already-loaded Hugging Face causal LM."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradprobe.config import PruneConfig
from gradprobe.pipeline.layerwise import LayerwisePruner
from gradprobe.report import PruneReport, TensorRow


def prune(
    model: nn.Module,
    tokenizer_or_batches: Any = None,
    config: PruneConfig | None = None,
    *,
    resume_dir: str | os.PathLike | None = None,
    callback: Callable[[int, list[TensorRow]], None] | None = None,
    **overrides: Any,
) -> PruneReport:
    """Prune the decoder-layer linears (q, k, v, o, gate, up, down) of ``model`` in place.

    Args:
        model: a loaded ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` (any
            dtype), kept on its device (CPU); only the current decoder layer and the calibration
            activations go to ``config.device``.
        tokenizer_or_batches: calibration token ids, an integer tensor (nsamples, seqlen) (its
            shape overrides ``config.nsamples`` / ``config.seqlen``); or a tokenizer, in which case
            ``gradprobe.data.calibration_batches(tokenizer, source=config.calib_source,
            nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed)`` supplies them; or
            None for ``method="magnitude"``.
        config: a :class:`PruneConfig` (default ``PruneConfig()``: Wanda, 50 %, per row).
        resume_dir: directory for per-layer checkpoints; rerunning with the same directory, model,
            calibration and config skips finished layers and gives a bit-identical result.
        callback: called as ``callback(layer_idx, rows)`` after each finished layer.
        **overrides: PruneConfig fields replacing those of ``config`` (e.g. ``sparsity=0.6``).

    Returns:
        :class:`PruneReport` with one row per pruned tensor.

    Raises:
        ValueError / TypeError: unsupported model family, bad config values, empty or malformed
            calibration batches. Raised before the model is touched.
    """
    if config is None:
        config = PruneConfig(**overrides) if overrides else PruneConfig()
    elif not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a gradprobe.PruneConfig or None, got {type(config).__name__}")
    elif overrides:
        config = config.replace(**overrides)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"model must be a loaded Hugging Face model (nn.Module with .config), got {type(model).__name__}"
        )
    from gradprobe.models import get_adapter

    get_adapter(model)  # unknown family -> ValueError before anything else
    batches = tokenizer_or_batches
    if config.needs_calibration and batches is not None and not isinstance(batches, torch.Tensor):
        from gradprobe.data import calibration_batches

        batches = calibration_batches(
            batches,
            source=config.calib_source,
            nsamples=config.nsamples,
            seqlen=config.seqlen,
            seed=config.seed,
        )
    return LayerwisePruner(model, config, batches, resume_dir=resume_dir, callback=callback).run()
