"""Plain-PyTorch implementations of every ``gradprobe::`` op: the test oracle and the fallback.

They follow the contract in ``gradprobe/ops/_schemas.py`` literally — a stable ascending sort,
first ``k`` taken — with no attempt at speed. Every faster backend must equal them bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradprobe._backend import impl

NEG_INF = float("-inf")


def check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ValueError if ``weight`` holds NaN or Inf (nothing has been written yet)."""
    if weight.numel() and not bool(torch.isfinite(weight).all()):
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise ValueError(
            f"{name} contains NaN or Inf (first at index {tuple(bad)}); "
            "pruning needs finite weights: fix the overflow upstream or replace them with torch.nan_to_num"
        )


def score(weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 score ``|W| * |norm|[None, :]`` (or ``|W|``): weight (out, in) any float, norm (in,) fp32."""
    s = weight.abs().to(torch.float32)
    if norm is not None:
        s = s * norm.abs().to(torch.float32)  # |norm| canonicalises -0.0 so equal scores have equal keys
    return s


def stable_rank_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k smallest entries of each row of ``scores`` (out, n); ties -> lower index."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, idx, True)
    return mask


def threshold_triple(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold triple of each row of ``scores`` (rows, n) fp32: (fp32, int64, int64) of shape (rows,)."""
    rows = scores.shape[0]
    if k == 0:
        thr = torch.full((rows,), NEG_INF, dtype=torch.float32, device=scores.device)
        zero = torch.zeros(rows, dtype=torch.int64, device=scores.device)
        return thr, zero, zero.clone()
    thr = torch.sort(scores, dim=-1, stable=True).values[:, k - 1]
    less = (scores < thr[:, None]).sum(-1)
    equal = (scores == thr[:, None]).sum(-1)
    return thr.contiguous(), (k - less).to(torch.int64), equal.to(torch.int64)


def mask_from_triple(scores: torch.Tensor, threshold: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Mask of each row of ``scores`` (rows, n) given its triple: s < t, or the first ``take`` of s == t."""
    t = threshold.reshape(-1, 1)
    eq = scores == t
    rank = torch.cumsum(eq, dim=-1)  # 1-based position among the row's equal scores, in index order
    return (scores < t) | (eq & (rank <= take.reshape(-1, 1)))


# ---- per-row ops ---------------------------------------------------------------------------------


@impl("row_threshold", "reference")
def row_threshold(weight: torch.Tensor, norm: torch.Tensor | None, k: int):
    check_finite(weight)
    return threshold_triple(score(weight, norm), k)


@impl("row_mask", "reference")
def row_mask(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    check_finite(weight)
    return stable_rank_mask(score(weight, norm), k)


@impl("row_prune_", "reference")
def row_prune_(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    mask = row_mask(weight, norm, k)
    weight.masked_fill_(mask, 0)
    return mask


# ---- global (one group over a list of tensors; one tensor = layer scope) ---------------------------


def _flat_scores(weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor]) -> torch.Tensor:
    for i, w in enumerate(weights):
        check_finite(w, f"weights[{i}]")
    parts = [score(w, norms[i] if norms else None).reshape(-1) for i, w in enumerate(weights)]
    return torch.cat(parts)


def _split_like(flat: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [w.numel() for w in weights]
    return [m.reshape(w.shape) for m, w in zip(torch.split(flat, sizes), weights)]


@impl("global_threshold", "reference")
def global_threshold(weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor], k: int):
    thr, take, equal = threshold_triple(_flat_scores(weights, norms)[None, :], k)
    return thr[0], take[0], equal[0]


@impl("global_mask", "reference")
def global_mask(weights, norms, threshold: torch.Tensor, take: torch.Tensor) -> list[torch.Tensor]:
    flat = _flat_scores(weights, norms)[None, :]
    return _split_like(mask_from_triple(flat, threshold, take)[0], weights)


@impl("global_prune_", "reference")
def global_prune_(weights, masks, norms, threshold: torch.Tensor, take: torch.Tensor) -> None:
    for w, out, m in zip(weights, masks, global_mask(weights, norms, threshold, take)):
        out.copy_(m)
        w.masked_fill_(m, 0)


def global_masks_sorted(weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Oracle for a whole global selection: concatenate, stable sort, first ``k`` (O(total) memory)."""
    flat = _flat_scores(weights, norms)[None, :]
    return _split_like(stable_rank_mask(flat, k)[0], weights)
