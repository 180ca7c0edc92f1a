"""The probe's arguments: allowed values, defaults and every check, done before the model is touched
(:func:`_probe_arguments` binds :func:`gradprobe.probe_prune_`'s signature).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.pipeline.gradients import as_device as _as_device
from gradprobe.probe.tolerance import check_threshold
from gradprobe.select import check_sparsity

if TYPE_CHECKING:
    from gradprobe.probe.targets import _Target


METHODS = ("wanda", "magnitude")
SCOPES = ("row", "layer", "global")
MODES = ("layerwise", "model", "regional")
ORDERS = ("reverse", "forward")
TARGETS = ("candidates", "exact")
OVERSELECT = 0.2  # default s' = s + OVERSELECT * (1 - s) for target="exact"


def _check_batches(batches: Any) -> list[torch.Tensor]:
    """A 2-D (n, seqlen) tensor is n batches of one row; a 3-D (B, b, seqlen) tensor or a sequence of
    (b, seqlen) / (seqlen,) tensors is B batches."""
    if isinstance(batches, torch.Tensor):
        if batches.dim() == 2:
            out = [batches[i : i + 1] for i in range(batches.shape[0])]
        elif batches.dim() == 3:
            out = list(batches.unbind(0))
        else:
            raise ValueError(f"batches as a tensor must be (n, seqlen) or (B, batch, seqlen) token ids, got shape {tuple(batches.shape)}")
    elif isinstance(batches, Sequence) and not isinstance(batches, str):
        out = []
        for i, b in enumerate(batches):
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"batches[{i}] must be a tensor of token ids, got {type(b).__name__}")
            if b.dim() == 1:
                b = b.unsqueeze(0)
            if b.dim() != 2:
                raise ValueError(f"batches[{i}] must be (batch, seqlen) or (seqlen,) token ids, got shape {tuple(b.shape)}")
            out.append(b)
    else:
        raise TypeError(f"batches must be a tensor or a list of tensors of token ids, got {type(batches).__name__}")
    if not out:
        raise ValueError("batches is empty; the probe needs at least one calibration batch of token ids")
    for i, b in enumerate(out):
        if b.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"batches[{i}] must hold integer token ids (int64), got {b.dtype}")
        if b.shape[-1] < 2 or b.shape[0] < 1:
            raise ValueError(f"batches[{i}] needs >= 1 row of >= 2 tokens for a next-token loss, got shape {tuple(b.shape)}")
    return out


def _check_norms(norms: Mapping[str, torch.Tensor] | None, targets: Sequence[_Target]) -> None:
    """Every probed weight's norm: a finite, >= 0 float tensor of shape (in_features,); the error names the key."""
    if norms is None:
        return
    from gradprobe.select import check_norm

    for t in targets:
        n = norms[t.name]
        if not n.dtype.is_floating_point:
            raise TypeError(f"norms[{t.name!r}] must be a float32 tensor (activation norms), got {n.dtype}")
        check_norm(n.detach().to(device=t.param.device, dtype=torch.float32), t.param, f"norms[{t.name!r}]", t.name)


def _check_args(sparsity, method, scope, mode, order, reduction_factor, gradient_threshold, structure, loss, norms):
    if structure not in (None, "unstructured"):
        raise ValueError(
            f"structure={structure!r}: N:M structure cannot be combined with the gradient probe (restoring a "
            "candidate would leave its group of M with fewer than N zeros); prune N:M with gradprobe.prune "
            "without the probe, or pass structure=None"
        )
    sparsity = check_sparsity(sparsity)
    for name, value, allowed in (("method", method, METHODS), ("scope", scope, SCOPES), ("mode", mode, MODES),
                                 ("order", order, ORDERS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)):
        raise TypeError(f"reduction_factor must be a float in (0, 1), got {type(reduction_factor).__name__}")
    if not (0.0 < float(reduction_factor) < 1.0):
        raise ValueError(
            f"reduction_factor must be in (0, 1) exclusive (candidates are scaled by it; 0.1 is the default), got {reduction_factor}"
        )
    gradient_threshold = check_threshold(gradient_threshold)
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be None or a callable (logits, input_ids) -> scalar tensor, got {type(loss).__name__}")
    if norms is not None:
        if method != "wanda":
            raise ValueError('norms are Wanda activation norms; pass them only with method="wanda"')
        if not isinstance(norms, Mapping):
            raise TypeError("norms must be a mapping parameter name -> (in_features,) float32 tensor")
    return sparsity, float(reduction_factor), gradient_threshold


def _probe_arguments(model, batches, sparsity, options: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`probe_prune_`'s arguments by name with defaults filled in, checked before the model is
    touched: sparsity, reduction_factor (float) and gradient_threshold normalised, batches as a list."""
    # probe_prune_'s signature lives with it, in the package, which imports this module
    from gradprobe.probe import _SIGNATURE

    try:
        bound = _SIGNATURE.bind(model, batches, sparsity, **options)
    except TypeError as exc:
        raise TypeError(f"{exc} (the probe takes the arguments of gradprobe.probe_prune_)") from None
    bound.apply_defaults()
    a = bound.arguments
    a["sparsity"], a["reduction_factor"], a["gradient_threshold"] = _check_args(
        a["sparsity"], a["method"], a["scope"], a["mode"], a["order"], a["reduction_factor"], a["gradient_threshold"],
        a["structure"], a["loss"], a["norms"])
    a["batches"] = _check_batches(batches)
    if a["norms"] is not None:
        for k, v in a["norms"].items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"norms[{k!r}] must be a (in_features,) float32 tensor, got {type(v).__name__}")
    a["candidate_sparsity"] = _check_target(a["target"], a["candidate_sparsity"], a["sparsity"])
    if a["device"] is not None:
        try:
            a["device"] = _as_device(a["device"])
        except (RuntimeError, TypeError, AssertionError) as exc:
            raise ValueError(f"device must be None or a torch device such as 'cpu' or 'cuda:0', got {a['device']!r} "
                             f"({exc})") from None
    if not isinstance(a["streamed"], bool):
        raise TypeError(f"streamed must be True or False, got {type(a['streamed']).__name__}")
    if a["resume_dir"] is not None and not isinstance(a["resume_dir"], (str, os.PathLike)):
        raise TypeError(f"resume_dir must be None or a directory path, got {type(a['resume_dir']).__name__}")
    return a


def default_candidate_sparsity(sparsity: float) -> float:
    """s' for ``target="exact"`` when none is given: s + OVERSELECT * (1 - s)."""
    return sparsity + OVERSELECT * (1.0 - sparsity)


def _check_target(target: Any, candidate_sparsity: Any, sparsity: float) -> float | None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "candidates":
        if candidate_sparsity is not None:
            raise ValueError('candidate_sparsity is used only with target="exact"; drop it or pass target="exact"')
        return None
    if candidate_sparsity is None:
        return default_candidate_sparsity(sparsity)
    cs = check_sparsity(candidate_sparsity, "candidate_sparsity")
    if cs < sparsity:
        raise ValueError(f"candidate_sparsity must be >= sparsity ({sparsity}) so that every row has enough "
                         f"candidates for the exact count, got {cs}")
    return cs
