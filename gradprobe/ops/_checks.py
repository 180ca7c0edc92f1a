"""Argument checks of the ``gradprobe::`` ops, shared by the reference and the Triton backend.

Production code (``gradprobe/kernels``) imports them from here, never from ``reference`` (the test
oracle). The C++ backend (``csrc/``) repeats them with the same messages: its ops are dispatched to
directly, with no Python wrapper. Every check raises before anything is written.
"""

from __future__ import annotations

import torch

PROBE_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROBE_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ValueError if ``weight`` holds NaN or Inf (nothing has been written yet)."""
    if weight.numel() and not bool(torch.isfinite(weight).all()):
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise ValueError(
            f"{name} contains NaN or Inf (first at index {tuple(bad)}); "
            "pruning needs finite weights: fix the overflow upstream or replace them with torch.nan_to_num"
        )


def check_nm(weight: torch.Tensor, n: int, m: int) -> None:
    """Raise ValueError unless 0 < n < m <= 32 and weight (out, in) has in % m == 0."""
    if not (0 < n < m <= 32):
        raise ValueError(f"N:M = {n}:{m} needs 0 < N < M <= 32 (N pruned of every M consecutive inputs)")
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(
            f"N:M = {n}:{m} needs a 2-D weight with in_features divisible by {m}, got shape {tuple(weight.shape)}"
        )


def check_probe_accumulate(acc: torch.Tensor, grad: torch.Tensor) -> None:
    """TypeError/ValueError unless acc and grad are float tensors of one dtype, shape and device."""
    if acc.dtype not in PROBE_FLOAT_DTYPES:
        raise TypeError(f"acc must be float32, bfloat16, float16 or float64, got {acc.dtype}")
    if grad.dtype != acc.dtype:
        raise TypeError(f"grad must have acc's dtype {acc.dtype} (the max is kept in acc's dtype), got {grad.dtype}; "
                        f"pass grad.to({acc.dtype})")
    if grad.shape != acc.shape:
        raise ValueError(f"grad must have acc's shape {tuple(acc.shape)}, got {tuple(grad.shape)}")
    if grad.device != acc.device:
        raise ValueError(f"grad is on {grad.device} but acc on {acc.device}; move both to one device")


def check_probe_apply(weight: torch.Tensor, candidates: torch.Tensor, backup: torch.Tensor, g0: torch.Tensor,
                      g1: torch.Tensor, scale: float) -> None:
    """Every check of probe_apply_ but k == popcount(candidates) (each backend counts on its own)."""
    if weight.dtype not in PROBE_WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if candidates.dtype != torch.bool:
        raise TypeError(f"candidates must be a bool tensor (True = candidate), got {candidates.dtype}; pass it as .bool()")
    if candidates.shape != weight.shape:
        raise ValueError(f"candidates must have weight's shape {tuple(weight.shape)}, got {tuple(candidates.shape)}")
    if backup.dtype != weight.dtype:
        raise TypeError(f"backup must have weight's dtype {weight.dtype} (the original candidate values, restored bit "
                        f"for bit), got {backup.dtype}")
    if backup.dim() != 1:
        raise ValueError(f"backup must be 1-D (k,) in row-major candidate order, got shape {tuple(backup.shape)}")
    for name, g in (("g0", g0), ("g1", g1)):
        if g.dtype not in PROBE_FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {g.dtype}")
        if g.shape != backup.shape:
            raise ValueError(f"{name} must have backup's shape ({backup.numel()},) = (k,), got {tuple(g.shape)}")
    for name, t in (("candidates", candidates), ("backup", backup), ("g0", g0), ("g1", g1)):
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight on {weight.device}; move all to one device")
    if not abs(scale) < float("inf"):  # NaN fails too
        raise ValueError(f"scale must be finite (prune iff g1 <= g0 * scale, scale = 1 + tau), got {scale}")


def raise_probe_count(count: int, k: int) -> None:
    """ValueError when candidates holds ``count`` True entries but backup/g0/g1 hold ``k``."""
    if count != k:
        raise ValueError(
            f"candidates holds {count} True entries but backup, g0 and g1 hold k = {k}; they must be the (k,) "
            "values of exactly these candidates, in row-major order"
        )
