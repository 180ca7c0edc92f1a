"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon weight updates.

Reference algorithm: ``SparseGPT.fasterprune`` of https://github.com/IST-DASLab/sparsegpt (also
llm-compressor's ``SparseGPTModifier``). For one linear ``y = x W^T``, W (rows, cols):

1. Hessian of the layer-wise reconstruction loss ``||W X - W' X||^2`` over the calibration inputs:
   ``H = 2/N sum_t x_t x_t^T`` (cols, cols) fp32 (:class:`gradprobe.stats.HessianStats`).
2. Dead inputs (``H_jj == 0``: channel j is zero on every calibration token) get ``H_jj = 1`` and
   ``W[:, j] = 0``. Dampening: ``H += percdamp * mean(diag H) * I`` (percdamp 0.01).
3. ``U = chol(H^-1)^T``: the upper Cholesky factor of the inverse (``torch.linalg.cholesky``,
   ``cholesky_inverse``, ``cholesky(upper=True)``). Row i of U holds the OBS update coefficients
   of column i given that columns < i are already fixed.
4. Columns are processed in blocks of ``blocksize`` (128). At the start of a block [i1, i2) (for
   N:M: at the first column of every group of M) the mask is chosen from the current, already
   updated weights by the OBS saliency ``w^2 / U_jj^2``, smallest first. For every column i of the
   block: ``q = w`` with the masked entries zeroed, ``err = (w - q) / U_ii``, and the remaining
   columns of the block get ``W[:, i:] -= err U[i, i:]``; after the block, the later columns get
   ``W[:, i2:] -= Err U[i1:i2, i2:]`` (lazy batch update). The result is Q (zeros at the mask).

Selection (the only change to the published algorithm): the published code prunes, per block, the
scores ``<= `` the ``int(numel * s)``-th sorted value (one more than ``s`` of the block, plus ties)
and uses ``topk`` for N:M (unspecified tie order). Here every selection is one of gradprobe's exact
ops on the saliency (the ``k`` smallest, ties -> lower index; :func:`torch.ops.gradprobe.row_mask`,
:func:`torch.ops.gradprobe.nm_mask`), and the counts are exact:

* ``scope="row"``: row r prunes ``k_r`` weights (``floor(s * cols)`` each for a sparsity ``s``; for an
  explicit total ``k`` the first ``k % rows`` rows prune ``k // rows + 1``, the others ``k // rows``).
  ``k_r`` is split over the blocks in proportion to their widths (largest remainder, ties -> earlier
  block; :func:`gradprobe.allocation.split_count`) and each row selects its share within the block.
* ``scope="layer"``: the tensor prunes ``floor(s * rows * cols)``, split over the blocks in
  proportion to their sizes; the selection within a block is over all its rows x columns (flat,
  row-major index), as the published per-block sort.
* ``structure="N:M"``: N of every M consecutive inputs per row, chosen when the group starts. The
  block size is rounded down to a multiple of M (at least M) so groups never straddle blocks.

The "global" scope is not defined (the OBS updates change the weights while the mask is chosen, one
linear at a time) and raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gradprobe.allocation import split_count
from gradprobe.select import check_sparsity, check_weight, num_pruned, parse_structure
from gradprobe.stats import HessianStats

SCOPES = ("row", "layer")


def _check_args(weight, hessian, sparsity, scope, structure, blocksize, percdamp):
    check_weight(weight)
    rows, cols = weight.shape
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(
            f"hessian must be a (in_features, in_features) float32 tensor, got {type(hessian).__name__}"
        )
    if hessian.dtype != torch.float32 or tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"hessian must be float32 of shape ({cols}, {cols}) = (weight.shape[1],) * 2, got "
            f"{hessian.dtype} {tuple(hessian.shape)}"
        )
    if hessian.device != weight.device:
        raise ValueError(
            f"hessian is on {hessian.device} but weight is on {weight.device}; move both to one device"
        )
    if scope not in SCOPES:
        hint = (
            " (SparseGPT updates the weights while it selects, one linear at a time)"
            if scope == "global"
            else ""
        )
        raise ValueError(f"scope must be one of {SCOPES} for SparseGPT, got {scope!r}{hint}")
    nm = parse_structure(structure)
    if nm is not None:
        if sparsity is not None:
            raise ValueError(
                f"sparsity must be None with structure={structure!r} (it prunes {nm[0]}/{nm[1]})"
            )
        if cols % nm[1]:
            raise ValueError(f"structure={structure!r} needs in_features divisible by {nm[1]}, got {cols}")
    elif sparsity is None:
        raise ValueError("sparsity is None; give a float in [0, 1) or an N:M structure")
    else:
        check_sparsity(sparsity)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int (published: 128), got {blocksize!r}")
    if (
        isinstance(percdamp, bool)
        or not isinstance(percdamp, (int, float))
        or not (percdamp >= 0 and math.isfinite(percdamp))
    ):
        raise ValueError(f"percdamp must be a finite float >= 0 (published: 0.01), got {percdamp!r}")
    if weight.numel() and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf; SparseGPT needs finite weights")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or Inf; check the calibration activations for overflow")
    return nm


def inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U (cols, cols) fp32 upper Cholesky factor of the damped ``H^-1``; dead (cols,) bool.

    ``hessian`` (cols, cols) fp32 is not modified. Raises ValueError (suggesting a larger
    ``percdamp``) if the damped Hessian is not positive definite.
    """
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damp
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise ValueError(
            f"the damped Hessian is not positive definite (percdamp={percdamp}); use a larger percdamp "
            "(e.g. 0.1) or more calibration data"
        )
    return L, dead


def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianStats,
    sparsity: float | None = None,
    *,
    scope: str = "row",
    structure: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    k: int | None = None,
) -> torch.Tensor:
    """Prune ``weight`` in place with SparseGPT (module docstring) and return the mask.

    Args:
        weight: (out_features, in_features) float32 / bfloat16 / float16; overwritten with the
            pruned and OBS-updated weights (computed in fp32, cast back).
        hessian: (in_features, in_features) fp32 ``H = 2/N sum x x^T`` on weight's device, or the
            :class:`HessianStats` that accumulated it (its inverse factor is cached and shared by the
            linears reading the same input).
        sparsity: fraction in [0, 1) (unstructured), or None with ``structure``.
        scope: "row" (each row prunes floor(s * in_features)) or "layer" (the tensor prunes
            floor(s * numel)).
        structure: None or "N:M" (N pruned of every M consecutive inputs of a row).
        blocksize: columns per lazy-update block (published 128). percdamp: dampening fraction of
            the mean Hessian diagonal (published 0.01).
        k: instead of ``sparsity``, the exact total number to prune (unstructured only).

    Returns:
        bool (out_features, in_features), True = pruned; exactly the requested count.

    Raises:
        ValueError / TypeError: bad arguments (nothing is modified), or a Hessian that is not
            positive definite after dampening.
    """
    stats = hessian if isinstance(hessian, HessianStats) else None
    H = stats.H if stats is not None else hessian
    rows, cols = weight.shape if isinstance(weight, torch.Tensor) and weight.dim() == 2 else (0, 0)
    if k is not None:
        if structure is not None or sparsity is not None:
            raise ValueError("give either sparsity or k (an exact count), and k only without structure")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= rows * cols:
            raise ValueError(f"k must be an int in [0, {rows * cols}] (weights to prune), got {k!r}")
        nm = _check_args(weight, H, 0.0, scope, None, blocksize, percdamp)
    else:
        nm = _check_args(weight, H, sparsity, scope, structure, blocksize, percdamp)
        if nm is None:
            k = rows * num_pruned(cols, sparsity) if scope == "row" else num_pruned(rows * cols, sparsity)
    if stats is not None:
        key = ("inverse_cholesky", float(percdamp))
        if key not in stats.cache:
            stats.cache[key] = inverse_cholesky(H, percdamp)
        U, dead = stats.cache[key]
    else:
        U, dead = inverse_cholesky(H, percdamp)

    if nm is not None:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    starts = list(range(0, cols, blocksize))
    widths = [min(cols, b + blocksize) - b for b in starts]
    if nm is None and scope == "row":
        a, r = divmod(k, rows)
        per_block = [split_count(a, widths), split_count(a + 1, widths) if r else None]
    elif nm is None:
        per_block = [split_count(k, [rows * w for w in widths])]

    W = weight.detach().float().clone()
    W[:, dead] = 0
    mask = torch.zeros((rows, cols), dtype=torch.bool, device=weight.device)
    for b, i1 in enumerate(starts):
        i2 = i1 + widths[b]
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        mask1 = mask[:, i1:i2]
        if nm is None:
            sal = W1**2 / d1.reshape(1, -1) ** 2
            if scope == "layer":
                mask1.copy_(
                    torch.ops.gradprobe.row_mask(sal.reshape(1, -1), None, per_block[0][b]).reshape(sal.shape)
                )
            else:
                mask1[r:] = torch.ops.gradprobe.row_mask(sal[r:], None, per_block[0][b])
                if r:
                    mask1[:r] = torch.ops.gradprobe.row_mask(sal[:r].contiguous(), None, per_block[1][b])
        for i in range(i2 - i1):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i : i + nm[1]] ** 2 / d1[i : i + nm[1]].reshape(1, -1) ** 2
                mask1[:, i : i + nm[1]] = torch.ops.gradprobe.nm_mask(sal, None, nm[0], nm[1])
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err1 = (w - q) / U1[i, i]
            # rank-1 update as a broadcast product: one rounding per entry, bitwise the published
            # err1.unsqueeze(1).matmul(...) with inner dimension 1, without a GEMM call per column
            W1[:, i:] -= err1.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
    weight.copy_(W.to(weight.dtype))
    return mask


@dataclass(frozen=True)
class SparseGPTMaskFn:
    """The driver's select-and-prune step for ``PruneConfig(method="sparsegpt")`` (a ``MaskFn``).

    Uses the Hessian the driver collected for the tensor (``ctx.stats.hessian``), the config's
    scope ("row" / "layer") and structure. Pass an instance with other settings as
    ``PruneConfig(method="sparsegpt", mask_fn=SparseGPTMaskFn(blocksize=64, percdamp=0.05))``.
    """

    blocksize: int = 128
    percdamp: float = 0.01

    def __call__(
        self,
        weight: torch.Tensor,
        norm: torch.Tensor | None,
        sparsity: float | None,
        ctx: Any,
        k: int | None = None,
    ) -> torch.Tensor:
        """Prune ``weight`` with the tensor's Hessian; ``k``: an exact total count instead of ``sparsity``."""
        hess = getattr(ctx.stats, "hessian", None)
        if hess is None:
            raise ValueError(
                f"SparseGPT needs the Hessian of layer {ctx.layer_idx} {ctx.name}; "
                "use PruneConfig(method='sparsegpt')"
            )
        cfg = ctx.config
        return sparsegpt_prune_(
            weight,
            hess,
            None if k is not None else sparsity,
            scope=cfg.scope,
            structure=None if k is not None else cfg.structure,
            k=k,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
        )
