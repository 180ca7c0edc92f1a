"""Triton N:M selection: the ``triton`` backend of ``gradprobe::nm_mask`` and ``gradprobe::nm_prune_``.

Each program takes ``BLOCK_G`` consecutive groups of ``m`` elements (a row holds in/m groups, so the
groups of the whole weight are contiguous) as a (BLOCK_G, M_P2) tile, M_P2 = next power of two >= m.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradprobe._backend import impl
from gradprobe.ops._checks import check_finite, check_nm


@triton.jit
def _nm_mask_kernel(
    w_ptr,
    norm_ptr,
    mask_ptr,
    num_groups,
    in_features,
    n,
    m,
    HAS_NORM: tl.constexpr,
    PRUNE: tl.constexpr,
    M_P2: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """mask[g, i] = rank(s[g, i]) < n with s = fp32(|w|) * |norm[col]| and
    rank(s_i) = #{j : s_j < s_i} + #{j < i : s_j == s_i} (stable ascending order, ties to the lower
    index). PRUNE: also w[g, i] = 0 where masked."""
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    j = tl.arange(0, M_P2)
    valid = (g[:, None] < num_groups) & (j[None, :] < m)
    offs = g[:, None] * m + j[None, :]
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    s = tl.abs(w).to(tl.float32)
    if HAS_NORM:
        nrm = tl.load(norm_ptr + offs % in_features, mask=valid, other=0.0)
        s = s * tl.abs(nrm)
    # padding columns sort last: +inf is never smaller, and their index is never lower
    s = tl.where(valid, s, float("inf"))
    si = s[:, :, None]
    sj = s[:, None, :]
    lower = j[None, None, :] < j[None, :, None]
    before = (sj < si) | ((sj == si) & lower)
    rank = tl.sum(before.to(tl.int32), axis=2)
    pruned = (rank < n) & valid
    tl.store(mask_ptr + offs, pruned.to(tl.uint8), mask=valid)
    if PRUNE:
        tl.store(w_ptr + offs, tl.zeros_like(w), mask=valid & pruned)


def _launch(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int, prune: bool) -> torch.Tensor:
    check_nm(weight, n, m)
    check_finite(weight)
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous; call .contiguous() first")
    mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    num_groups = weight.numel() // m
    if num_groups == 0:
        return mask
    m_p2 = triton.next_power_of_2(m)
    block_g = max(1, 1024 // (m_p2 * m_p2)) * 16  # (BLOCK_G, M_P2, M_P2) compare tile of <= 16K entries
    grid = (triton.cdiv(num_groups, block_g),)
    _nm_mask_kernel[grid](
        weight,
        norm if norm is not None else weight,
        mask.view(torch.uint8),
        num_groups,
        weight.shape[1],
        n,
        m,
        HAS_NORM=norm is not None,
        PRUNE=prune,
        M_P2=m_p2,
        BLOCK_G=block_g,
    )
    return mask


@impl("nm_mask", "triton")
def nm_mask(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    return _launch(weight, norm, n, m, prune=False)


@impl("nm_prune_", "triton")
def nm_prune_(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    return _launch(weight, norm, n, m, prune=True)
