"""Exact k-th smallest score by radix select on order-preserving keys: ``triton`` backend of
``gradprobe::row_threshold`` / ``row_mask`` / ``row_prune_`` / ``global_threshold``.

The uint32 key of a score (``wanda_score.float_to_key``) is resolved in three digits of 11/11/10
bits. Pass ``d`` histograms digit ``d`` of the keys whose higher digits equal the prefix found so
far; the bucket holding the (remaining) rank-``r`` key is the first bin whose cumulative count
reaches ``r``; ``r`` -= the counts of the lower bins. After the last digit the prefix is the exact
k-th key ``t``, ``r`` = ``take`` (how many keys equal to ``t`` are pruned) and that bin's count =
``equal``; ``count(key < t) = k - take``.

* Per row: one program per row does all three passes (the row stays in L1/L2) and, for the mask
  ops, a fourth pass writing the mask with the tie rule (``mask.write_block``).
* Global: a persistent streaming kernel per tensor and digit accumulates a per-program histogram
  (``tl.histogram``) into one int64 device histogram (atomics on its non-empty bins only); a
  one-program kernel finds the bucket and updates the device-side (prefix, rank) state. Nothing
  leaves the device between passes; one host sync after the first pass checks for NaN/Inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradprobe._backend import impl
from gradprobe.kernels import _configs
from gradprobe.kernels.mask import as_norm, check_input, raise_nonfinite, tiling, write_block
from gradprobe.kernels.wanda_score import key_to_float, score_key
from gradprobe.ops.reference import check_finite

# (shift, bits) of the three digits of a uint32 key, most significant first
DIGITS = ((21, 11), (10, 11), (0, 10))
NBINS = 2048


@triton.jit
def find_bucket(h, rank, NB: tl.constexpr):
    """(bin b, rank - #below b, count of b) for the histogram ``h`` (NB,) and 1-based ``rank``:
    b = the first bin whose inclusive cumulative count is >= rank."""
    bins = tl.arange(0, NB)
    c = tl.cumsum(h, 0)
    b = tl.sum((c < rank).to(h.dtype), 0)
    below = tl.sum(tl.where(bins < b, h, 0), 0)
    cnt = tl.sum(tl.where(bins == b, h, 0), 0)
    return b, rank - below, cnt


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


@triton.jit
def _global_histogram_kernel(w_ptr, norm_ptr, hist_ptr, state_ptr, bad_ptr, n_cols, tiles_per_row, n_tiles,
                             HAS_NORM: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                             BLOCK: tl.constexpr):
    """hist[d] += #{e : (key(e) >> SHIFT) & (2^BITS - 1) == d and key(e) >> (SHIFT + BITS) ==
    prefix >> (SHIFT + BITS)} over W (rows, n_cols), prefix = state[0]; the first digit also adds
    W's non-finite count to bad[0]. Persistent: program p takes tiles p, p + P, ... (tile as in
    ``mask._global_count_kernel``); hist (2^BITS,) int64 is shared by every tensor of the group.
    """
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    prefix = tl.load(state_ptr).to(tl.uint32)
    lanes = tl.arange(0, BLOCK)
    h = tl.zeros([1 << BITS], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for t in range(pid, n_tiles, nprog):
        row = t // tiles_per_row
        cols = (t - row * tiles_per_row) * BLOCK + lanes
        valid = cols < n_cols
        key, nonfinite = score_key(w_ptr, norm_ptr, row * n_cols + cols, cols, valid, HAS_NORM)
        sel = valid
        if SHIFT + BITS < 32:
            sel = sel & ((key >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS)))
        h += tl.histogram(((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32), 1 << BITS, mask=sel)
        bad += nonfinite.to(tl.int32)
    bins = tl.arange(0, 1 << BITS)
    # only the occupied bins: a digit of real scores fills few of the 2048 bins
    tl.atomic_add(hist_ptr + bins, h.to(tl.int64), mask=h != 0)
    if SHIFT + BITS == 32:
        tl.atomic_add(bad_ptr, tl.sum(bad, 0).to(tl.int64))


@triton.jit
def _global_bucket_kernel(hist_ptr, state_ptr, thr_ptr, take_ptr, eq_ptr, SHIFT: tl.constexpr,
                          BITS: tl.constexpr, LAST: tl.constexpr):
    """One program. state = (prefix, rank) int64: b = first bin of hist (2^BITS,) with cumulative count
    >= rank; prefix |= b << SHIFT; rank -= #below b. LAST: thr = fp32 of the key prefix,
    take = rank, eq = hist[b] (0-dim outputs)."""
    h = tl.load(hist_ptr + tl.arange(0, 1 << BITS))
    prefix = tl.load(state_ptr)
    b, rank, cnt = find_bucket(h, tl.load(state_ptr + 1), 1 << BITS)
    prefix = prefix | (b << SHIFT)
    tl.store(state_ptr, prefix)
    tl.store(state_ptr + 1, rank)
    if LAST:
        tl.store(thr_ptr, key_to_float(prefix.to(tl.uint32)))
        tl.store(take_ptr, rank)
        tl.store(eq_ptr, cnt)


# ---- host side: per row ----------------------------------------------------------------------------


def _check_k(k: int, n: int, what: str) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} must lie in [0, {n}] ({what}); compute it with gradprobe.select.num_pruned")


def _row_launch(weight: torch.Tensor, norm: torch.Tensor | None, k: int, write_mask: bool):
    """(thr, take, eq, mask or None) of every row; raises ValueError on NaN/Inf (nothing written to W)."""
    check_input(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    rows, n_cols = weight.shape
    _check_k(k, n_cols, "per row, in_features")
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


# ---- host side: global -----------------------------------------------------------------------------


@impl("global_threshold", "triton")
def global_threshold(weights, norms, k: int):
    if not weights:
        raise ValueError("weights is empty: a global group needs at least one tensor")
    if norms and len(norms) != len(weights):
        raise ValueError(f"norms must be empty or hold one norm per weight ({len(weights)}), got {len(norms)}")
    dev = weights[0].device
    ws = []
    for i, w in enumerate(weights):
        check_input(w, f"weights[{i}]")
        if w.device != dev:
            raise ValueError(f"weights[{i}] is on {w.device} but weights[0] on {dev}; move the group to one device")
        ws.append(w.contiguous())
    ns = [as_norm(n, w, f"norms[{i}]") for i, (w, n) in enumerate(zip(ws, norms, strict=True))] if norms else []
    total = sum(w.numel() for w in ws)
    _check_k(k, total, "the group's total number of elements")
    thr = torch.full((), float("-inf"), dtype=torch.float32, device=dev)
    take = torch.zeros((), dtype=torch.int64, device=dev)
    eq = torch.zeros((), dtype=torch.int64, device=dev)
    if k == 0:
        for i, w in enumerate(ws):
            check_finite(w, f"weights[{i}]")
        return thr, take, eq
    hist = torch.zeros(len(DIGITS), NBINS, dtype=torch.int64, device=dev)
    state = torch.tensor([0, k], dtype=torch.int64, device=dev)  # (key prefix, remaining rank)
    bad = torch.zeros(len(ws), dtype=torch.int64, device=dev)
    plans = []
    for w in ws:
        n_cols, block, warps, tpr, n_tiles = tiling(w)
        plans.append((n_cols, block, warps, tpr, n_tiles, min(n_tiles, _configs.max_programs(dev))))
    for d, (shift, bits) in enumerate(DIGITS):
        for i, (w, (n_cols, block, warps, tpr, n_tiles, grid)) in enumerate(zip(ws, plans, strict=True)):
            if grid:
                nrm = ns[i] if ns else None
                _global_histogram_kernel[(grid,)](
                    w, nrm if nrm is not None else w, hist[d], state, bad[i:], n_cols, tpr, n_tiles,
                    HAS_NORM=nrm is not None, SHIFT=shift, BITS=bits, BLOCK=block, num_warps=warps,
                )
        if d == 0:
            raise_nonfinite(bad, [f"weights[{i}]" for i in range(len(ws))])
        _global_bucket_kernel[(1,)](hist[d], state, thr, take, eq, SHIFT=shift, BITS=bits, LAST=d == len(DIGITS) - 1)
    return thr, take, eq
