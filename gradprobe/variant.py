"""The Wanda variant: a per-row cumulative-score cut with one alpha per tensor, found by bisection.

Wanda's reference code (``use_variant``, https://github.com/locuslab/wanda/blob/main/lib/prune.py)
prunes, in every output row, the smallest scores whose cumulative sum stays <= alpha x the row's total
score, and bisects alpha until the tensor's sparsity is within 0.001 of the target. gradprobe does the
same with an exact, order-independent definition of the cumulative sum (``gradprobe::row_cumsum_cut``
in ``gradprobe/ops/_schemas.py``):

* scores ``s = |W| * ||X_j||`` (fp32) are quantised per row to int64 fixed point
  ``q = floor(s * 2^(B - e_row))`` (B = 62 - bit_length(in), row max < 2^e_row), so every partial sum is
  an exact integer whatever the summation order (fp32/fp64 sums are not: their rounding depends on the
  order, which a sort-free histogram cannot reproduce);
* row i prunes ``k_i = max{j : C_i(j) <= floor(alpha * total_i)}`` scores, C_i(j) = sum of its j smallest
  q, the first k_i in stable ascending score order (ties -> lower index);
* the cut is found without sorting: a per-row histogram of (count, q-sum) over the order-preserving
  fp32 key, 8 bits at a time, refined 4 times until the cut's bucket is a single key.

Differences from the Wanda code: ties at the cut are split by index (Wanda's ``W_metric <= thres``
prunes all of them); alpha is bisected on [0, 1] (Wanda: [0, 0.8] from 0.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gradprobe.select import check_norm, check_sparsity, check_weight, num_pruned, row_mask_from_threshold

DEFAULT_TOL = 1e-3  # Wanda's: |achieved - target| <= 0.001 (as a fraction of the tensor)
MAX_ITERS = 64


@dataclass(frozen=True)
class VariantResult:
    """Outcome of one variant selection.

    Attributes:
        alpha: the fraction of each row's total (fixed-point) score that may be pruned.
        pruned: weights pruned (sum of the per-row k_i). target: floor(sparsity * numel).
        numel: tensor size. tol: allowed |pruned - target| / numel. iterations: alpha evaluations.
    """

    alpha: float
    pruned: int
    target: int
    numel: int
    tol: float
    iterations: int

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0


def check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0.0 <= float(tol) < 1.0):
        raise ValueError(f"tol must be a float in [0, 1) (allowed |achieved - target sparsity|), got {tol!r}")
    return float(tol)


def _cut(weight: torch.Tensor, norm: torch.Tensor | None, alpha: float):
    return torch.ops.gradprobe.row_cumsum_cut(weight, norm, alpha)


def variant_alpha(
    weight: torch.Tensor,
    sparsity: float,
    *,
    norm: torch.Tensor | None = None,
    tol: float = DEFAULT_TOL,
) -> tuple[VariantResult, torch.Tensor, torch.Tensor]:
    """Bisect alpha in [0, 1] until |pruned - floor(sparsity * numel)| <= floor(tol * numel).

    Args:
        weight: (out, in) float32/bfloat16/float16. Not modified.
        sparsity: target fraction in [0, 1).
        norm: (in,) float32 activation norms, or None (magnitude).
        tol: allowed deviation as a fraction of ``weight.numel()`` (default 0.001, Wanda's).

    Returns:
        (result, threshold fp32 (out,), take int64 (out,)): the triple of the chosen alpha.

    Raises:
        ValueError: bad arguments, or no alpha reaches the target within ``tol`` (e.g. more than
            the target share of the scores quantise to zero, which every alpha prunes).
    """
    check_weight(weight)
    check_norm(norm, weight)
    sparsity = check_sparsity(sparsity)
    tol = check_tol(tol)
    w = weight.contiguous()
    numel = w.numel()
    target = num_pruned(numel, sparsity)
    slack = int(tol * numel)
    lo, hi = 0.0, 1.0
    best = None
    for it in range(1, MAX_ITERS + 1):
        alpha = 0.0 if it == 1 else (lo + hi) / 2
        thr, take, pruned, _ = _cut(w, norm, alpha)
        got = int(pruned.sum())
        if best is None or abs(got - target) < abs(best[0].pruned - target):
            best = (VariantResult(alpha, got, target, numel, tol, it), thr, take)
        if abs(got - target) <= slack:
            return VariantResult(alpha, got, target, numel, tol, it), thr, take
        if got > target:
            if it == 1:
                raise ValueError(
                    f"the Wanda variant cannot reach sparsity={sparsity}: alpha=0 already prunes {got} of "
                    f"{numel} weights (scores that quantise to 0); raise sparsity or tol"
                )
            hi = alpha
        else:
            lo = alpha
    raise ValueError(
        f"the Wanda variant found no alpha within tol={tol} of sparsity={sparsity} (closest: alpha="
        f"{best[0].alpha}, {best[0].pruned} of {numel} pruned, target {target}); raise tol"
    )


def variant_prune_(
    weight: torch.Tensor,
    sparsity: float,
    *,
    norm: torch.Tensor | None = None,
    tol: float = DEFAULT_TOL,
) -> tuple[torch.Tensor, VariantResult]:
    """Zero, in place, the weights the Wanda variant selects; returns (bool mask (out, in), result)."""
    mask, result = variant_prune_mask(weight, sparsity, norm=norm, tol=tol)
    weight.masked_fill_(mask, 0)
    return mask, result


def variant_prune_mask(
    weight: torch.Tensor,
    sparsity: float,
    *,
    norm: torch.Tensor | None = None,
    tol: float = DEFAULT_TOL,
) -> tuple[torch.Tensor, VariantResult]:
    """As :func:`variant_prune_` without modifying ``weight``."""
    result, thr, take = variant_alpha(weight, sparsity, norm=norm, tol=tol)
    return row_mask_from_threshold(weight, norm, thr, take), result


class VariantMaskFn:
    """A :class:`gradprobe.config.MaskFn` for the driver: the variant per tensor, results recorded.

    ``PruneConfig(mask_fn=VariantMaskFn(tol))``; afterwards ``fn.results[(layer, name)]`` holds each
    tensor's :class:`VariantResult` (alpha included).
    """

    def __init__(self, tol: float = DEFAULT_TOL):
        self.tol = check_tol(tol)
        self.results: dict[tuple[int, str], VariantResult] = {}

    def __call__(
        self, weight: torch.Tensor, norm: torch.Tensor | None, sparsity: float | None, ctx: Any
    ) -> torch.Tensor:
        if sparsity is None:
            raise ValueError("the Wanda variant is unstructured; it cannot be combined with an N:M structure")
        mask, res = variant_prune_(weight, sparsity, norm=norm, tol=self.tol)
        self.results[(ctx.layer_idx, ctx.name)] = res
        return mask
