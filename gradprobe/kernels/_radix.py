"""Radix-select building blocks shared by the row and global selection kernels (``row_select.py``,
``global_select.py``): the bucket search over a digit histogram, the mask write with the tie rule,
and the host-side argument checks and tiling.

Tie rule (every selection op): element ``e`` with key ``x`` is pruned iff ``x < t`` or (``x == t`` and
its 1-based rank among the keys equal to ``t``, in group order, is ``<= take``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gradprobe.kernels import _configs


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


# ---- host side -------------------------------------------------------------------------------------


def check_k(k: int, n: int, what: str) -> None:
    """ValueError unless 0 <= k <= n (``what`` names n)."""
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} must lie in [0, {n}] ({what}); compute it with gradprobe.select.num_pruned")


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
