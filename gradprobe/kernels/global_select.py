"""Masks from a threshold triple: ``triton`` backend of ``gradprobe::global_mask`` / ``global_prune_``.

Element ``e`` of a group (order: tensor position, row-major flat index) with key ``x`` is pruned iff
``x < t`` or (``x == t`` and ``rank(e) <= take``), ``t`` = key of the threshold and ``rank(e)`` =
1-based position of ``e`` among the group's elements with key ``t``. The rank is exact and in group
order: each program owns a contiguous chunk of tiles (a tile = BLOCK consecutive columns of a row,
so the tiles of a chunk are in flat order) and scans it block by block with ``tl.cumsum`` plus a
running carry that starts at the chunk's base, the exclusive prefix sum over all earlier chunks of
the per-chunk equal counts (``_global_count_kernel``, summed on device with ``torch.cumsum``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gradprobe._backend import impl
from gradprobe.kernels import _configs
from gradprobe.kernels.wanda_score import float_to_key, score_key


@triton.jit
def write_block(w_ptr, mask_ptr, offs, key, valid, tkey, take, carry, PRUNE: tl.constexpr):
    """Write mask[offs] = key < t | (key == t & carry + inclusive rank <= take); PRUNE: w[offs] = 0 there.

    Returns the new carry (carry + number of keys equal to t in this block).
    """
    eq = (key == tkey) & valid
    rank = carry + tl.cumsum(eq.to(tl.int64), 0)
    pruned = ((key < tkey) | (eq & (rank <= take))) & valid
    tl.store(mask_ptr + offs, pruned.to(tl.uint8), mask=valid)
    if PRUNE:
        tl.store(w_ptr + offs, tl.zeros_like(key).to(w_ptr.dtype.element_ty), mask=pruned)
    return carry + tl.sum(eq.to(tl.int64), 0)


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


# ---- host side -------------------------------------------------------------------------------------


def check_input(w: torch.Tensor, name: str) -> None:
    """TypeError/ValueError for weights the kernels cannot read (dtype, device)."""
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {w.dtype}")
    if w.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} is on {w.device}; the Triton backend needs CUDA tensors")


def as_norm(norm: torch.Tensor | None, w: torch.Tensor, name: str) -> torch.Tensor | None:
    """norm as a contiguous fp32 (n_cols,) tensor, checked against ``w``'s last dimension."""
    if norm is None:
        return None
    n_cols = w.shape[-1] if w.dim() else 1
    if norm.numel() != n_cols:
        raise ValueError(f"{name} must have {n_cols} entries (weight's in_features), got shape {tuple(norm.shape)}")
    if norm.device != w.device:
        raise ValueError(f"{name} is on {norm.device} but the weight on {w.device}; move both to one device")
    return norm.reshape(-1).to(torch.float32).contiguous()


def tiling(w: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(n_cols, BLOCK, num_warps, tiles_per_row, n_tiles) of ``w`` viewed as (numel / n_cols, n_cols)."""
    n_cols = max(1, w.shape[-1] if w.dim() else 1)
    block, warps = _configs.stream_config(n_cols)
    tiles_per_row = triton.cdiv(n_cols, block)
    return n_cols, block, warps, tiles_per_row, (w.numel() // n_cols) * tiles_per_row


def raise_nonfinite(bad: torch.Tensor, names: Sequence[str]) -> None:
    """bad: (len(names),) int64 non-finite counts on device; one host sync, ValueError naming the first."""
    counts = bad.tolist()
    for name, c in zip(names, counts, strict=True):
        if c:
            raise ValueError(
                f"{name} contains {c} NaN or Inf value(s); pruning needs finite weights: "
                "fix the overflow upstream or replace them with torch.nan_to_num"
            )


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
