"""Tensor-level public API: exact k-smallest selection of Wanda / magnitude scores.

Every function validates its arguments completely before any op runs, so bad input raises
``ValueError`` / ``TypeError`` naming the argument and the fix, and leaves the tensors unchanged.
The work is done by ``torch.ops.gradprobe.*`` (``gradprobe/ops/_schemas.py``); the backend is chosen
by the tensors' device (see ``gradprobe/_backend.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from gradprobe import _backend

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCOPES = ("row", "layer")


class Threshold(NamedTuple):
    """The exact k-th score of each group and how many of its ties are pruned.

    Attributes:
        value: fp32, the k-th smallest score (``-inf`` when k == 0); shape (out,) for scope="row", () else.
        take: int64, how many scores equal to ``value`` are pruned (the first ones in index order).
        equal: int64, how many scores of the group equal ``value``.
    """

    value: torch.Tensor
    take: torch.Tensor
    equal: torch.Tensor


def num_pruned(n: int, sparsity: float) -> int:
    """k = floor(sparsity * n), computed in float64: the exact count every op prunes from n scores."""
    return int(math.floor(sparsity * n))


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(sparsity).__name__}")
    sparsity = float(sparsity)
    if not (0.0 <= sparsity < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1) (the fraction of weights to prune), got {sparsity}")
    return sparsity


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (out_features, in_features), got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}; "
            "reshape it (e.g. weight.flatten(1)) first"
        )
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {weight.dtype}; convert it first")


def check_norm(norm: torch.Tensor | None, weight: torch.Tensor, name: str = "norm", wname: str = "weight") -> None:
    """norm: (in_features,) float32 on weight's device, finite and >= 0."""
    if norm is None:
        return
    if not isinstance(norm, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (in_features,) or None, got {type(norm).__name__}")
    if norm.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (per-input-channel activation norms), got {norm.dtype}; pass {name}.float()")
    if norm.dim() != 1 or norm.shape[0] != weight.shape[1]:
        raise ValueError(
            f"{name} must have shape ({weight.shape[1]},) = ({wname}.shape[1],), got {tuple(norm.shape)}"
        )
    if norm.device != weight.device:
        raise ValueError(f"{name} is on {norm.device} but {wname} is on {weight.device}; move both to one device")
    if norm.numel() and norm.device.type != "meta":  # a meta dry run has shapes only, no values to check
        if not bool(torch.isfinite(norm).all()):
            raise ValueError(f"{name} contains NaN or Inf; activation norms must be finite")
        if bool((norm < 0).any()):
            raise ValueError(f"{name} has negative entries; norms are >= 0 (pass sqrt of the sum of squares)")


def _contiguous_inplace(weight: torch.Tensor, fn) -> torch.Tensor:
    """Run in-place ``fn`` on a contiguous version of ``weight`` and write the result back."""
    if weight.is_contiguous():
        return fn(weight)
    work = weight.contiguous()
    mask = fn(work)
    weight.copy_(work)
    return mask


def parse_structure(structure: str | None, name: str = "structure") -> tuple[int, int] | None:
    """``"N:M"`` -> (N, M); None / "unstructured" -> None. ValueError naming ``name`` otherwise.

    The one parser of a structure string (tensor ops, :class:`gradprobe.PruneConfig`, SparseGPT, CLI)."""
    if structure is None or structure == "unstructured":
        return None
    if not isinstance(structure, str) or structure.count(":") != 1:
        raise ValueError(f'{name} must be None, "unstructured" or "N:M" (e.g. "2:4"), got {structure!r}')
    try:
        n, m = (int(p) for p in structure.split(":"))
    except ValueError:
        raise ValueError(f'{name} must be "N:M" with integers (e.g. "2:4"), got {structure!r}') from None
    if not (0 < n < m <= 32):
        raise ValueError(f"{name} {structure!r} needs 0 < N < M <= 32 (N pruned of every M)")
    return n, m


def check_nm_sparsity(
    sparsity: object,
    nm: tuple[int, int],
    structure: str,
    *,
    names: tuple[str, str] = ("sparsity", "structure"),
    cli: bool = False,
) -> None:
    """The N:M rule, written once: a sparsity given with an N:M structure must be None or exactly N/M.

    ``names``: how the caller's user spells the two arguments; ``cli=True`` words the message for
    command-line flags (``--sparsity 0.6 conflicts with --structure 2:4 ...; drop --sparsity``)."""
    n, m = nm
    if sparsity is None:
        return
    ok = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool)
    if ok and math.isclose(float(sparsity), n / m, rel_tol=0, abs_tol=1e-12):
        return
    if cli:
        raise ValueError(
            f"{names[0]} {sparsity} conflicts with {names[1]} {structure} (prunes {n}/{m}); drop {names[0]}"
        )
    raise ValueError(
        f"{names[0]}={sparsity!r} conflicts with {names[1]}={structure!r} (prunes {n}/{m}); "
        f"pass {names[0]}=None or {n / m}"
    )


def _check_nm(weight: torch.Tensor, sparsity: float | None, nm: tuple[int, int], structure: str) -> None:
    if sparsity is not None:
        check_sparsity(sparsity)
    check_nm_sparsity(sparsity, nm, structure)
    m = nm[1]
    if weight.shape[1] % m:
        raise ValueError(
            f"structure={structure!r} needs in_features divisible by {m}, got weight shape {tuple(weight.shape)}"
        )


def _prepare(weight, sparsity, norm, scope, structure):
    check_weight(weight)
    check_norm(norm, weight)
    nm = parse_structure(structure)
    if nm is not None:
        _check_nm(weight, sparsity, nm, structure)
        return nm
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} (use global_prune_masks for a group of tensors), got {scope!r}")
    return check_sparsity(sparsity)


def prune_mask(
    weight: torch.Tensor,
    sparsity: float | None,
    *,
    norm: torch.Tensor | None = None,
    scope: str = "row",
    structure: str | None = None,
) -> torch.Tensor:
    """Mask of the weights to prune: the k smallest scores of each group, ties to the lower index.

    Args:
        weight: (out_features, in_features), float32 / bfloat16 / float16. Not modified.
        sparsity: fraction in [0, 1); each group of n scores prunes exactly floor(sparsity * n).
            With ``structure`` it must be N/M or None.
        norm: (in_features,) float32, per-input-channel activation norms ||X_j||_2 (Wanda score
            ``|W| * norm``); None = magnitude score ``|W|``.
        scope: "row" (each output row is a group, the Wanda default) or "layer" (the whole tensor).
        structure: None / "unstructured", or "N:M": prune the N smallest of every M consecutive
            inputs of a row (in_features % M == 0).

    Returns:
        torch.bool tensor of weight's shape, True = pruned.
    """
    spec = _prepare(weight, sparsity, norm, scope, structure)
    w = weight.contiguous()
    if isinstance(spec, tuple):
        return torch.ops.gradprobe.nm_mask(w, norm, spec[0], spec[1])
    if scope == "row":
        return torch.ops.gradprobe.row_mask(w, norm, num_pruned(w.shape[1], spec))
    return global_prune_masks([w], spec, norms=None if norm is None else [norm])[0]


def prune_(
    weight: torch.Tensor,
    sparsity: float | None,
    *,
    norm: torch.Tensor | None = None,
    scope: str = "row",
    structure: str | None = None,
) -> torch.Tensor:
    """Zero, in place, the weights :func:`prune_mask` selects, and return that mask.

    Args and return as :func:`prune_mask`; ``weight`` is modified (only after validation succeeds).
    """
    spec = _prepare(weight, sparsity, norm, scope, structure)
    if isinstance(spec, tuple):
        return _contiguous_inplace(weight, lambda w: torch.ops.gradprobe.nm_prune_(w, norm, spec[0], spec[1]))
    if scope == "row":
        k = num_pruned(weight.shape[1], spec)
        return _contiguous_inplace(weight, lambda w: torch.ops.gradprobe.row_prune_(w, norm, k))
    return global_prune_([weight], spec, norms=None if norm is None else [norm])[0]


def _prepare_global(weights, sparsity, norms) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError("weights must be a list of 2-D tensors (pass [w] for a single tensor)")
    weights = list(weights)
    if not weights:
        raise ValueError("weights is empty; pass at least one tensor to prune")
    sparsity = check_sparsity(sparsity)
    for i, w in enumerate(weights):
        check_weight(w, f"weights[{i}]")
        if w.device != weights[0].device:
            raise ValueError(f"weights[{i}] is on {w.device} but weights[0] on {weights[0].device}; use one device")
    if norms is None:
        norms = []
    else:
        norms = list(norms)
        if len(norms) != len(weights):
            raise ValueError(f"norms has {len(norms)} entries for {len(weights)} weights; pass one per weight or None")
        if any(n is None for n in norms):
            raise ValueError("norms must hold a tensor for every weight (or be None for magnitude scores)")
        for i, (w, n) in enumerate(zip(weights, norms, strict=True)):
            check_norm(n, w, f"norms[{i}]", f"weights[{i}]")
    return weights, norms, num_pruned(sum(w.numel() for w in weights), sparsity)


def score(weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 score of every weight, as the selection ops define it (``gradprobe/ops/_schemas.py``).

    weight (out, in) float32/bfloat16/float16, norm (in,) float32 or None. Returns fp32 (out, in):
    ``fp32(|W|) * |norm|`` (one fp32 multiply; ``|norm|`` canonicalises -0.0), or ``fp32(|W|)``.
    Materialises the scores: for selection itself use the ops, which never do.
    """
    s = weight.abs().to(torch.float32)
    if norm is not None:
        s = s * norm.abs().to(torch.float32)
    return s


def row_mask_from_threshold(
    weight: torch.Tensor, norm: torch.Tensor | None, threshold: torch.Tensor, take: torch.Tensor
) -> torch.Tensor:
    """bool mask (out, in) of each row's pruned set given its own threshold and take.

    threshold fp32 (out,), take int64 (out,) (a per-row triple without ``equal``, e.g. from
    ``gradprobe::row_cumsum_cut``): row i prunes s < threshold[i] and the first take[i] scores equal
    to threshold[i] in column order (the tie rule of every selection op).
    """
    s = score(weight, norm)
    t = threshold.reshape(-1, 1)
    eq = s == t
    rank = torch.cumsum(eq, dim=-1)  # 1-based position among the row's scores equal to t
    return (s < t) | (eq & (rank <= take.reshape(-1, 1)))


def kth_threshold(
    weight: torch.Tensor | Sequence[torch.Tensor],
    sparsity: float,
    *,
    norm: torch.Tensor | Sequence[torch.Tensor] | None = None,
    scope: str = "row",
) -> Threshold:
    """The exact k-th smallest score of each group, found by radix selection (no sort).

    Args:
        weight: (out, in) tensor for scope "row" / "layer", or a list of them for scope "global".
        sparsity: in [0, 1); k = floor(sparsity * group size).
        norm: (in,) float32 (a list for "global"), or None for magnitude.
        scope: "row", "layer" or "global".
    """
    if scope == "global":
        ws, ns, k = _prepare_global(weight, sparsity, norm)
        return Threshold(*torch.ops.gradprobe.global_threshold([w.contiguous() for w in ws], ns, k))
    spec = _prepare(weight, sparsity, norm, scope, None)
    if scope == "row":
        return Threshold(*torch.ops.gradprobe.row_threshold(weight.contiguous(), norm, num_pruned(weight.shape[1], spec)))
    return kth_threshold([weight], spec, norm=None if norm is None else [norm], scope="global")


def global_prune_masks(
    weights: Sequence[torch.Tensor],
    sparsity: float,
    *,
    norms: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Masks for one selection group spanning all ``weights`` (whole-model "global" pruning).

    Exactly floor(sparsity * total) scores are pruned over all tensors; ties go to the earlier
    (tensor position, flat index). Streams over the tensors: no concatenation, O(buckets) memory.

    Args:
        weights: list of (out_i, in_i) float32/bfloat16/float16 tensors on one device. Not modified.
        sparsity: fraction in [0, 1).
        norms: None (magnitude) or one (in_i,) float32 tensor per weight.

    Returns:
        list of torch.bool masks, one per weight, True = pruned.
    """
    ws, ns, k = _prepare_global(weights, sparsity, norms)
    ws = [w.contiguous() for w in ws]
    if _has_fused_global_masks(ws[0].device.type):
        return torch.ops.gradprobe.global_masks(ws, ns, k)
    thr, take, _ = torch.ops.gradprobe.global_threshold(ws, ns, k)
    return torch.ops.gradprobe.global_mask(ws, ns, thr, take)


def _has_fused_global_masks(device_type: str) -> bool:
    """True when the backend that runs ``global_mask`` here also implements the fused ``global_masks``
    (the C++ CPU backend selects and writes the masks in one read of the weights); otherwise the
    threshold and the masks run as two ops of that backend."""
    try:
        return _backend.resolve("global_masks", device_type)[0] == _backend.resolve("global_mask", device_type)[0]
    except (NotImplementedError, _backend.BackendUnavailableError):
        return False


def global_prune_(
    weights: Sequence[torch.Tensor],
    sparsity: float,
    *,
    norms: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Zero in place what :func:`global_prune_masks` selects; returns the masks."""
    ws, ns, k = _prepare_global(weights, sparsity, norms)
    work = [w.contiguous() for w in ws]
    thr, take, _ = torch.ops.gradprobe.global_threshold(work, ns, k)  # raises on NaN before any write
    masks = [torch.empty(w.shape, dtype=torch.bool, device=w.device) for w in work]
    torch.ops.gradprobe.global_prune_(work, masks, ns, thr, take)
    for w, c in zip(ws, work, strict=True):
        if c is not w:
            w.copy_(c)
    return masks
