"""The gradient probe: keep a pruning candidate only if shrinking it does not raise its gradient.

For a set of prunable tensors W (the linears of the decoder layers):

1. G0 = element-wise max over the B calibration batches of |dL/dW| (L = the model's causal-LM loss
   ``model(input_ids=b, labels=b).loss``, or ``loss(logits, b)``);
2. candidates T = the ``sparsity`` smallest scores (magnitude |W| or Wanda |W| * ||X_j||_2; scope
   row, layer or global) — selected by the exact ``gradprobe::`` selection ops;
3. W[T] *= r (``reduction_factor``); G1 = the same statistic on the *same* batches;
4. prune F = T & (G1 <= G0 * (1 + tau)) (``gradient_threshold`` tau, computed in fp32); every other
   candidate gets its original value back bit for bit (from a backup of the candidate values only,
   never by dividing by r).

Targets (``target``):

* ``"candidates"`` (default): step 4 as written; the achieved sparsity is <= ``sparsity`` (every
  restored candidate lowers it).
* ``"exact"``: the achieved count equals the requested one exactly — floor(s * in) per row for
  ``scope="row"``, floor(s * numel) per tensor for ``"layer"``, floor(s * total) over the probed model
  for ``"global"`` (each tensor gets the count the global score selection at s gives it). Candidates T
  are chosen at ``candidate_sparsity`` s' >= s (default s + 0.2 (1 - s)); steps 1 and 3 as above; then
  each group prunes exactly its count of T: first the candidates whose gradient did not grow
  (G1 <= G0 (1 + tau), or already zero), then the grown ones, each in score order, ties by lower flat
  index (:func:`exact_key` then score, :func:`select_by_key`: two passes of the exact selection ops).
  With s' = s it is the plain score selection. Measured alternatives (README): ranking the candidates
  by the growth G1 / G0 itself was far worse (the ratio carries no per-weight information); a per-row
  tau tuned to hit the count is that same ratio ranking.

Modes:

* ``mode="model"``: one G0 and one G1 pass for all tensors at once (all probed weights need grads).
* ``mode="layerwise"`` (default): one decoder layer at a time, ``order="reverse"`` (last layer first)
  or ``"forward"``. Only that layer's linears require grad; its decisions are applied before the next
  layer is probed. Forward and backward start from cached boundary activations (the input of the
  layer), since everything before the layer is unchanged: in reverse order the dense inputs of all
  layers come from one no-grad pass; in forward order the next layer's input is the pruned layer's
  output, computed once with no grad.
* ``mode="regional"``: as ``"layerwise"``, but the loss is block-local (as Wanda++'s regional
  gradients): L = ||layer_i(h)||_2^2 (fp32) of the decoder layer's output for its cached input h,
  so each gradient pass runs only that one block forward and backward (no tail, no LM head, no labels).

Memory (``streamed=True``, the default): the model-loss gradients of ``"model"`` and ``"layerwise"``
go through :class:`gradprobe.pipeline.backward.StreamedBackward`, one decoder layer's autograd graph
at a time (no-grad forward keeping each layer's input, then per layer a recomputed forward and its
backward; the gradients equal the whole graph's bit for bit on the CPU). With ``device`` set to other
than where the model lives, each decoder layer (and the embedding, the head) is moved to the device
only while it runs, so the device holds about one layer + the boundary activations of one batch +
lm_head and its logits (``bench/bench_probe_memory.py``). ``resume_dir`` checkpoints every finished
layer (model mode: the G0 pass, then the result) so that an interrupted run continues where it stopped.

Gradient statistics are accumulated on the device as gradients arrive (a post-accumulate-grad hook
calling ``gradprobe::probe_accumulate_``; the ``.grad`` is dropped at once), so at most one gradient
per probed tensor lives at a time and nothing is copied to the CPU per batch. The decision, restore
and zeroing are one op, ``gradprobe::probe_apply_``. The cache kept per tensor (for threshold tuning,
:meth:`ProbeResult.apply_`) holds only candidate entries: original values, G0 and G1 (fp32).

Wanda norms: ||X_j||_2 over all calibration tokens of each linear's input, collected during the G0
pass (so with the earlier part of the model exactly as it is when the layer is probed) by
:class:`gradprobe.stats.ChannelStats` (per-window fp32 partials summed in window order, as every
collector; a streamed backward's recomputed forward is not counted again); with
``scope="global"`` all candidates are chosen up front, from one dense no-grad pass (as the driver's
global scope does). Pass ``norms`` to use your own.

N:M structure is not supported with the probe: restoring a candidate would leave its group with fewer
than N zeros. Prune N:M with :func:`gradprobe.prune` (no probe) instead; a ``structure`` argument
raises ``ValueError``.

The package, one job a module: :mod:`~gradprobe.probe.tolerance` (``gradient_threshold``),
:mod:`~gradprobe.probe.rule` (candidates and the exact rule), :mod:`~gradprobe.probe.state`
(:class:`TensorProbe`, :class:`ProbeResult`), :mod:`~gradprobe.probe.args` (argument checks),
:mod:`~gradprobe.probe.targets` (the probed linears, Wanda norms), :mod:`~gradprobe.probe.modes` (the
run: one probe step, model / layerwise / regional), :mod:`~gradprobe.probe.resume` (the checkpoint) and
:mod:`~gradprobe.probe.cli` (``gradprobe prune --probe``); this module is the public API. The decoder
layers are walked (inputs captured, forward / backward, the gradient passes, one layer on the device)
by :class:`gradprobe.pipeline.gradients.GradientRunner`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradprobe import distributed
from gradprobe.pipeline.gradients import default_loss as _default_loss  # noqa: F401  (re-exported)
from gradprobe.pipeline.gradients import scalar_backward as _backward  # noqa: F401  (re-exported)
from gradprobe.probe.args import (  # noqa: F401  (re-exported)
    METHODS,
    MODES,
    ORDERS,
    OVERSELECT,
    SCOPES,
    TARGETS,
    _as_device,
    _check_args,
    _check_batches,
    _check_norms,
    _check_target,
    _probe_arguments,
    default_candidate_sparsity,
)
from gradprobe.probe.modes import (  # noqa: F401  (re-exported)
    _capture_inputs,
    _probe,
    _probe_group,
    _probe_layerwise,
    _probe_model,
    _Runner,
    _to_home,
    _undo,
)
from gradprobe.probe.resume import _norms_digest, _Resume  # noqa: F401  (re-exported)
from gradprobe.probe.rule import KEY_MAX, RATIO_MAX, _candidates, _Exact, exact_key, select_by_key  # noqa: F401
from gradprobe.probe.selector import ProbeSelector  # noqa: F401  (re-exported)
from gradprobe.probe.state import ProbeResult, TensorProbe  # noqa: F401  (re-exported)
from gradprobe.probe.targets import _Norms, _Target, _targets  # noqa: F401  (re-exported)
from gradprobe.probe.tolerance import (  # noqa: F401  (re-exported)
    GradientThreshold,
    SizeAdaptive,
    _check_tau,
    check_threshold,
    resolve_threshold,
    scale_threshold,
    threshold_is_zero,
)
from gradprobe.report import PruneReport


def probe(model: nn.Module, batches: torch.Tensor | Sequence[torch.Tensor], sparsity: float, **options: Any) -> ProbeResult:
    """Run the gradient probe and prune in place; returns the :class:`ProbeResult` (masks + cache).

    Arguments, defaults and errors: exactly those of :func:`probe_prune_` (``options`` are its keywords).
    Under ``torch.distributed`` the batches are split over the ranks (contiguous shares), G0 / G1 are
    max-reduced and the norms summed in batch order across ranks: every rank gets the masks one process
    gets, checked by a digest before returning.
    """
    with distributed.guard():
        result = _probe(model, batches, sparsity, **options)
        if distributed.active():
            masks = result.masks
            distributed.agree("probe masks", distributed.masks_digest(masks[k] for k in sorted(masks)))
        distributed.barrier()
    return result


def probe_prune_(
    model: nn.Module,
    batches: torch.Tensor | Sequence[torch.Tensor],
    sparsity: float,
    *,
    method: str = "wanda",
    scope: str = "row",
    reduction_factor: float = 0.1,
    gradient_threshold: GradientThreshold = 0.0,
    mode: str = "layerwise",
    order: str = "reverse",
    target: str = "candidates",
    candidate_sparsity: float | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    norms: Mapping[str, torch.Tensor] | None = None,
    structure: str | None = None,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    streamed: bool = True,
    resume_dir: str | os.PathLike | None = None,
) -> PruneReport:
    """Prune the decoder linears of ``model`` in place with the gradient probe (module docstring).

    Args:
        model: a Hugging Face causal LM of a supported family (``gradprobe.models``); any dtype/device.
        batches: calibration token ids: a (n, seqlen) int64 tensor (n batches of one row), a
            (B, batch, seqlen) tensor, or a list of (batch, seqlen) / (seqlen,) tensors. The same
            batches are used for G0 and G1.
        sparsity: fraction in [0, 1): the candidate fraction with ``target="candidates"`` (achieved <= it,
            restored candidates); exactly the pruned fraction with ``target="exact"``.
        method: "wanda" (|W| * ||X_j||_2) or "magnitude" (|W|) candidate scores.
        scope: "row", "layer" (each tensor) or "global" (one group over all probed tensors).
        reduction_factor: r in (0, 1); candidates are scaled by r for the G1 pass.
        gradient_threshold: tau >= 0: a float, a mapping (keys: full parameter name, decoder layer
            index, linear name such as "mlp.down_proj", or "default"; lookup in that order, else 0),
            or :class:`SizeAdaptive` (tau * sqrt(numel / n_ref)).
        mode: "layerwise" (one decoder layer at a time), "model" (all tensors in one probe) or
            "regional" (one layer at a time, loss = squared norm of that layer's output).
        order: "reverse" (last layer first) or "forward"; layerwise / regional only.
        target: "candidates" (prune the candidates whose gradient did not grow) or "exact" (prune
            exactly the requested count, the least-grown of candidates at ``candidate_sparsity``).
        candidate_sparsity: s' in [sparsity, 1) for ``target="exact"`` (default s + 0.2 (1 - s));
            must be None with ``target="candidates"``.
        loss: optional ``loss(logits (batch, seqlen, vocab), input_ids (batch, seqlen)) -> 0-dim``;
            default the model's causal-LM loss ``model(input_ids=b, labels=b).loss``.
        norms: optional Wanda norms, parameter name -> (in_features,) float32.
        structure: must be None / "unstructured" (N:M raises ValueError, see the module docstring).
        layers: probe only these decoder layer indices (default all).
        progress: tqdm bar over layers.
        device: where the probe computes (default: where the decoder layers are). When the model lives
            elsewhere (e.g. on the host), each decoder layer, the embedding and the head visit the device
            only while they run; cached layer inputs and (model mode) the |grad| statistics wait on the host.
        streamed: model-loss gradients (``mode="model"``, ``"layerwise"``) by a streamed forward/backward,
            one decoder layer's autograd graph at a time (:mod:`gradprobe.pipeline.backward`; same
            gradients as the whole graph, bit for bit on the CPU; peak memory about one layer + the
            boundary activations of one batch + the head). False: one graph of the whole model (or tail),
            which needs ``device`` None or the model's device.
        resume_dir: checkpoint directory: each finished step is saved there, checksummed (layerwise /
            regional: each decoder layer's pruned weights and masks; model mode: the candidates and their
            G0 after the G0 pass, then the pruned weights and masks), and a rerun with the same arguments
            on the same dense model restores the finished steps and continues; the result equals an
            uninterrupted run's.

    Returns:
        :class:`gradprobe.report.PruneReport`: ``masks`` = {parameter name: bool mask of the weight's
        shape, True = pruned}; ``rows`` = one per probed tensor; ``resumed_layers``, ``seconds``.
        :func:`probe` returns the :class:`ProbeResult` with the cache for threshold tuning.

    Raises:
        ValueError / TypeError for bad arguments, before the model is touched.
    """
    return probe(**locals()).report(model)  # locals() here: exactly the arguments


_SIGNATURE = inspect.signature(probe_prune_)  # bound by probe(): the arguments, whoever replaces the name
probe.__signature__ = _SIGNATURE.replace(return_annotation="ProbeResult")
