"""Exact k-th smallest score of every row by radix select on order-preserving keys: ``triton`` backend
of ``gradprobe::row_threshold`` / ``row_mask`` / ``row_prune_``.

The uint32 key of a score (``_score.float_to_key``) is resolved in three digits of 11/11/10 bits.
Pass ``d`` histograms digit ``d`` of the keys whose higher digits equal the prefix found so far; the
bucket holding the (remaining) rank-``r`` key is the first bin whose cumulative count reaches ``r``
(``_radix.find_bucket``); ``r`` -= the counts of the lower bins. After the last digit the prefix is
the exact k-th key ``t``, ``r`` = ``take`` (how many keys equal to ``t`` are pruned) and that bin's
count = ``equal``; ``count(key < t) = k - take``.

One program per row does all three passes (the row stays in L1/L2) and, for the mask ops, a fourth
pass writing the mask with the tie rule (``_radix.write_block``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradprobe._backend import impl
from gradprobe.kernels import _configs
from gradprobe.kernels._radix import (
    as_norm,
    check_input,
    check_k,
    find_bucket,
    raise_nonfinite,
    write_block,
)
from gradprobe.kernels._score import key_to_float, score_key
from gradprobe.ops._checks import check_finite


@triton.jit
def _row_digit_hist(w_row, norm_ptr, n_cols, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr,
                    HAS_NORM: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram (2^BITS,) int32 of digit (key >> SHIFT) & (2^BITS - 1) over one row's keys whose
    bits above SHIFT + BITS equal those of ``prefix``; plus the row's non-finite W count."""
    lanes = tl.arange(0, BLOCK)
    h = tl.zeros([1 << BITS], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + lanes
        valid = cols < n_cols
        key, nonfinite = score_key(w_row, norm_ptr, cols, cols, valid, HAS_NORM)
        sel = valid
        if SHIFT + BITS < 32:
            sel = sel & ((key >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS)))
        digit = ((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
        h += tl.histogram(digit, 1 << BITS, mask=sel)
        bad += nonfinite.to(tl.int32)
    return h, tl.sum(bad, 0)


@_configs.autotune(_configs.ROW_CONFIGS, key=["n_bucket", "HAS_NORM", "WRITE_MASK"])
@triton.jit
def _row_select_kernel(w_ptr, norm_ptr, thr_ptr, take_ptr, eq_ptr, bad_ptr, mask_ptr, n_cols, k, n_bucket,
                       HAS_NORM: tl.constexpr, WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of W (rows, n_cols), scores s = fp32(|W[r]|) * |norm| (or fp32(|W[r]|)), 1 <= k <= n_cols:
    thr[r] = k-th smallest s (fp32), take[r] = k - #{s < thr[r]}, eq[r] = #{s == thr[r]} (int64),
    bad[r] = #{non-finite W[r, j]} (int32). WRITE_MASK: mask[r, j] = s_j < thr | (s_j == thr and
    j is among the first take[r] such j), bool written as uint8.
    """
    row = tl.program_id(0).to(tl.int64)
    w_row = w_ptr + row * n_cols
    prefix = tl.zeros([], tl.uint32)
    rank = k
    h, bad = _row_digit_hist(w_row, norm_ptr, n_cols, prefix, 21, 11, HAS_NORM, BLOCK)
    b, rank, cnt = find_bucket(h, rank, 2048)
    prefix = prefix | (b.to(tl.uint32) << 21)
    h = _row_digit_hist(w_row, norm_ptr, n_cols, prefix, 10, 11, HAS_NORM, BLOCK)[0]
    b, rank, cnt = find_bucket(h, rank, 2048)
    prefix = prefix | (b.to(tl.uint32) << 10)
    h = _row_digit_hist(w_row, norm_ptr, n_cols, prefix, 0, 10, HAS_NORM, BLOCK)[0]
    b, rank, cnt = find_bucket(h, rank, 1024)
    tkey = prefix | b.to(tl.uint32)
    tl.store(thr_ptr + row, key_to_float(tkey))
    tl.store(take_ptr + row, rank.to(tl.int64))
    tl.store(eq_ptr + row, cnt.to(tl.int64))
    tl.store(bad_ptr + row, bad)
    if WRITE_MASK:
        lanes = tl.arange(0, BLOCK)
        take = rank.to(tl.int64)
        carry = tl.zeros([], tl.int64)
        for start in range(0, n_cols, BLOCK):
            cols = start + lanes
            valid = cols < n_cols
            key = score_key(w_row, norm_ptr, cols, cols, valid, HAS_NORM)[0]
            carry = write_block(w_ptr, mask_ptr, row * n_cols + cols, key, valid, tkey, take, carry, False)


# ---- host side: per row ----------------------------------------------------------------------------


def _row_launch(weight: torch.Tensor, norm: torch.Tensor | None, k: int, write_mask: bool):
    """(thr, take, eq, mask or None) of every row; raises ValueError on NaN/Inf (nothing written to W)."""
    check_input(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    rows, n_cols = weight.shape
    check_k(k, n_cols, "per row, in_features")
    w = weight.contiguous()
    nrm = as_norm(norm, w, "norm")
    dev = w.device
    thr = torch.empty(rows, dtype=torch.float32, device=dev)
    take = torch.empty(rows, dtype=torch.int64, device=dev)
    eq = torch.empty(rows, dtype=torch.int64, device=dev)
    mask = torch.empty(w.shape, dtype=torch.bool, device=dev) if write_mask else None
    if k == 0 or rows == 0:
        check_finite(w)
        thr.fill_(float("-inf"))
        take.zero_()
        eq.zero_()
        if mask is not None:
            mask.zero_()
        return thr, take, eq, mask
    bad = torch.empty(rows, dtype=torch.int32, device=dev)
    _row_select_kernel[(rows,)](
        w, nrm if nrm is not None else w, thr, take, eq, bad, mask.view(torch.uint8) if write_mask else bad,
        n_cols, k, _configs.log2_bucket(n_cols), HAS_NORM=nrm is not None, WRITE_MASK=write_mask,
    )
    if bool(bad.any()):
        raise_nonfinite(bad.sum().reshape(1), ["weight"])
    return thr, take, eq, mask


@impl("row_threshold", "triton")
def row_threshold(weight: torch.Tensor, norm: torch.Tensor | None, k: int):
    thr, take, eq, _ = _row_launch(weight, norm, k, write_mask=False)
    return thr, take, eq


@impl("row_mask", "triton")
def row_mask(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    return _row_launch(weight, norm, k, write_mask=True)[3]


@impl("row_prune_", "triton")
def row_prune_(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    mask = _row_launch(weight, norm, k, write_mask=True)[3]  # raises before W is touched
    weight.masked_fill_(mask, 0)
    return mask
