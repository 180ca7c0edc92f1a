"""Exact selection over a group of whole tensors: ``triton`` backend of ``gradprobe::global_threshold``,
``global_mask`` and ``global_prune_``.

Threshold: the uint32 key of a score (``_score.float_to_key``) is resolved in three digits of
11/11/10 bits (radix select, as ``row_select.py``). A persistent streaming kernel per tensor and digit
accumulates a per-program histogram (``tl.histogram``) into one int64 device histogram (atomics on its
non-empty bins only); a one-program kernel finds the bucket (``_radix.find_bucket``) and updates the
device-side (prefix, rank) state. Nothing leaves the device between passes; one host sync after the
first pass checks for NaN/Inf.

Masks from a threshold triple: element ``e`` of a group (order: tensor position, row-major flat
index) with key ``x`` is pruned iff ``x < t`` or (``x == t`` and ``rank(e) <= take``), ``t`` = key of
the threshold and ``rank(e)`` = 1-based position of ``e`` among the group's elements with key ``t``.
The rank is exact and in group order: each program owns a contiguous chunk of tiles (a tile = BLOCK
consecutive columns of a row, so the tiles of a chunk are in flat order) and scans it block by block
with ``tl.cumsum`` plus a running carry that starts at the chunk's base, the exclusive prefix sum over
all earlier chunks of the per-chunk equal counts (``_global_count_kernel``, summed on device with
``torch.cumsum``).
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
    tiling,
    write_block,
)
from gradprobe.kernels._score import float_to_key, key_to_float, score_key
from gradprobe.ops._checks import check_finite

# (shift, bits) of the three digits of a uint32 key, most significant first
DIGITS = ((21, 11), (10, 11), (0, 10))
NBINS = 2048


@triton.jit
def _global_count_kernel(w_ptr, norm_ptr, thr_ptr, counts_ptr, bad_ptr, n_cols, tiles_per_row, n_tiles,
                         tiles_per_prog, HAS_NORM: tl.constexpr, BLOCK: tl.constexpr):
    """counts[p] = #{e in chunk p : key(score(e)) == key(threshold)}; bad += #{non-finite W in chunk p}.

    Chunk p = tiles [p * tiles_per_prog, (p + 1) * tiles_per_prog) of W (rows, n_cols), tile
    t = (row t // tiles_per_row, columns (t % tiles_per_row) * BLOCK + [0, BLOCK)).
    """
    pid = tl.program_id(0).to(tl.int64)
    tkey = float_to_key(tl.load(thr_ptr))
    lanes = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK], tl.int64)
    bad = tl.zeros([BLOCK], tl.int32)
    first = pid * tiles_per_prog
    for t in range(first, tl.minimum(first + tiles_per_prog, n_tiles)):
        row = t // tiles_per_row
        cols = (t - row * tiles_per_row) * BLOCK + lanes
        valid = cols < n_cols
        key, nonfinite = score_key(w_ptr, norm_ptr, row * n_cols + cols, cols, valid, HAS_NORM)
        cnt += ((key == tkey) & valid).to(tl.int64)
        bad += nonfinite.to(tl.int32)
    tl.store(counts_ptr + pid, tl.sum(cnt, 0))
    tl.atomic_add(bad_ptr, tl.sum(bad, 0).to(tl.int64))


@triton.jit
def _global_mask_kernel(w_ptr, norm_ptr, mask_ptr, thr_ptr, take_ptr, base_ptr, n_cols, tiles_per_row,
                        n_tiles, tiles_per_prog, HAS_NORM: tl.constexpr, PRUNE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """mask[e] = key(e) < t | (key(e) == t & base[p] + rank of e within chunk p <= take), chunk p as in
    ``_global_count_kernel``; base[p] = number of keys equal to t before chunk p in group order.
    PRUNE: also w[e] = 0 where mask[e]. mask is bool (rows, n_cols) written as uint8.
    """
    pid = tl.program_id(0).to(tl.int64)
    tkey = float_to_key(tl.load(thr_ptr))
    take = tl.load(take_ptr)
    carry = tl.load(base_ptr + pid)
    lanes = tl.arange(0, BLOCK)
    first = pid * tiles_per_prog
    for t in range(first, tl.minimum(first + tiles_per_prog, n_tiles)):
        row = t // tiles_per_row
        cols = (t - row * tiles_per_row) * BLOCK + lanes
        valid = cols < n_cols
        offs = row * n_cols + cols
        key = score_key(w_ptr, norm_ptr, offs, cols, valid, HAS_NORM)[0]
        carry = write_block(w_ptr, mask_ptr, offs, key, valid, tkey, take, carry, PRUNE)


@triton.jit
def _global_histogram_kernel(w_ptr, norm_ptr, hist_ptr, state_ptr, bad_ptr, n_cols, tiles_per_row, n_tiles,
                             HAS_NORM: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                             BLOCK: tl.constexpr):
    """hist[d] += #{e : (key(e) >> SHIFT) & (2^BITS - 1) == d and key(e) >> (SHIFT + BITS) ==
    prefix >> (SHIFT + BITS)} over W (rows, n_cols), prefix = state[0]; the first digit also adds
    W's non-finite count to bad[0]. Persistent: program p takes tiles p, p + P, ... (tile as in
    ``_global_count_kernel``); hist (2^BITS,) int64 is shared by every tensor of the group.
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


# ---- host side -------------------------------------------------------------------------------------


def _global_write(weights, masks, norms, threshold: torch.Tensor, take: torch.Tensor, prune: bool) -> None:
    """Count pass (+ NaN/Inf check, before any write), device prefix sum, write pass into ``masks``."""
    if not weights:
        return
    device = weights[0].device
    thr = threshold.reshape(1).to(device=device, dtype=torch.float32)
    tk = take.reshape(1).to(device=device, dtype=torch.int64)
    plans, n_chunks = [], 0
    for i, w in enumerate(weights):
        check_input(w, f"weights[{i}]")
        n_cols, block, warps, tpr, n_tiles = tiling(w)
        tpp = max(1, triton.cdiv(n_tiles, _configs.max_programs(device)))
        grid = triton.cdiv(n_tiles, tpp)
        plans.append((n_cols, block, warps, tpr, n_tiles, tpp, grid, n_chunks))
        n_chunks += grid
    counts = torch.zeros(max(1, n_chunks), dtype=torch.int64, device=device)
    bad = torch.zeros(len(weights), dtype=torch.int64, device=device)
    for i, (w, plan) in enumerate(zip(weights, plans, strict=True)):
        n_cols, block, warps, tpr, n_tiles, tpp, grid, start = plan
        if grid:
            nrm = norms[i] if norms else None
            _global_count_kernel[(grid,)](
                w, nrm if nrm is not None else w, thr, counts[start:], bad[i:], n_cols, tpr, n_tiles, tpp,
                HAS_NORM=nrm is not None, BLOCK=block, num_warps=warps,
            )
    raise_nonfinite(bad, [f"weights[{i}]" for i in range(len(weights))])
    base = torch.cumsum(counts, 0) - counts  # exclusive prefix: equal keys before each chunk
    for i, (w, m, plan) in enumerate(zip(weights, masks, plans, strict=True)):
        n_cols, block, warps, tpr, n_tiles, tpp, grid, start = plan
        if grid:
            nrm = norms[i] if norms else None
            _global_mask_kernel[(grid,)](
                w, nrm if nrm is not None else w, m.view(torch.uint8), thr, tk, base[start:], n_cols, tpr,
                n_tiles, tpp, HAS_NORM=nrm is not None, PRUNE=prune, BLOCK=block, num_warps=warps,
            )


def _prep_norms(weights, norms) -> list[torch.Tensor]:
    if norms and len(norms) != len(weights):
        raise ValueError(f"norms must be empty or hold one norm per weight ({len(weights)}), got {len(norms)}")
    return [as_norm(n, w, f"norms[{i}]") for i, (w, n) in enumerate(zip(weights, norms, strict=True))] if norms else []


@impl("global_mask", "triton")
def global_mask(weights, norms, threshold: torch.Tensor, take: torch.Tensor) -> list[torch.Tensor]:
    ws = [w.contiguous() for w in weights]
    masks = [torch.empty(w.shape, dtype=torch.bool, device=w.device) for w in ws]
    _global_write(ws, masks, _prep_norms(ws, norms), threshold, take, prune=False)
    return masks


@impl("global_prune_", "triton")
def global_prune_(weights, masks, norms, threshold: torch.Tensor, take: torch.Tensor) -> None:
    if len(masks) != len(weights):
        raise ValueError(f"masks must hold one bool tensor per weight ({len(weights)}), got {len(masks)}")
    for i, (w, m) in enumerate(zip(weights, masks, strict=True)):
        if m.dtype != torch.bool or m.shape != w.shape:
            raise ValueError(f"masks[{i}] must be a bool tensor of weights[{i}]'s shape {tuple(w.shape)}")
    ws = [w if w.is_contiguous() else w.contiguous() for w in weights]
    outs = [m if m.is_contiguous() else torch.empty(m.shape, dtype=torch.bool, device=m.device) for m in masks]
    _global_write(ws, outs, _prep_norms(ws, norms), threshold, take, prune=True)
    for w, wc, m, mc in zip(weights, ws, masks, outs, strict=True):
        if wc is not w:
            w.copy_(wc)
        if mc is not m:
            m.copy_(mc)


# ---- host side: threshold -----------------------------------------------------------------------------


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
    check_k(k, total, "the group's total number of elements")
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
