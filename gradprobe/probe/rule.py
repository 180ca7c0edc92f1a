"""Which weights the probe touches: the candidate selection (``_candidates``: the method's scores at the
candidate sparsity, with the exact rule's per-tensor plan) and the exact rule (``target="exact"``:
:func:`exact_key` ranks candidates by whether their gradient grew, :func:`select_by_key` takes exactly
the count, ties by score then lower flat index, through the exact ``gradprobe::`` selection ops).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradprobe.select import global_prune_masks, num_pruned, prune_mask

if TYPE_CHECKING:
    from gradprobe.probe.targets import _Target


# Keys of the exact rule (fp32): non-candidates get KEY_MAX (never selected, the ops reject inf);
# candidate keys are clamped to RATIO_MAX < KEY_MAX.
KEY_MAX = torch.finfo(torch.float32).max
RATIO_MAX = 1e38


def exact_key(backup: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """fp32 (k,) ranking key of the exact rule: 0 for a candidate whose gradient did not grow
    (G1 <= G0 * (1 + tau) in fp32, as ``probe_apply_`` decides) or that is already zero (``backup == 0``,
    e.g. pruned by an earlier step: pruning it changes nothing), 1 for one whose gradient grew.
    """
    grew = g1.to(torch.float32) > g0.to(torch.float32) * torch.tensor(1.0 + tau, dtype=torch.float32)
    return (grew & (backup != 0)).to(torch.float32)


def select_by_key(candidates: torch.Tensor, key: torch.Tensor, score: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """Exactly ``k`` candidates with the smallest ``key``; ties by smaller ``score``, then lower flat index.

    Args:
        candidates: bool (out, in); at least ``k`` True per row (per_row) or in total.
        key, score: fp32 (c,), >= 0 and finite, in row-major candidate order (c = candidates.sum()).
        k: count per row (``per_row``) or for the whole tensor.

    Returns:
        bool (out, in) mask. Two passes of the exact selection ops: the k-th smallest key (value and
        how many of its ties to take); then one key that puts the keys below it first (0) and the
        tied ones by score (``nextafter(score)`` > 0, order preserved), so the same op picks the
        tied ones by score then index.
    """
    full = torch.full(candidates.shape, KEY_MAX, dtype=torch.float32, device=candidates.device)
    full[candidates] = key
    if per_row:
        thr = torch.ops.gradprobe.row_threshold(full, None, k)[0].reshape(-1, 1)
    else:
        thr = torch.ops.gradprobe.global_threshold([full], [], k)[0]
    tied = torch.full_like(full, KEY_MAX)
    tied[candidates] = torch.nextafter(score.to(torch.float32).clamp(max=RATIO_MAX), torch.tensor(KEY_MAX))
    second = torch.where(full < thr, torch.zeros_like(full), torch.where(full == thr, tied, KEY_MAX))
    if per_row:
        return torch.ops.gradprobe.row_mask(second, None, k)
    t, take, _ = torch.ops.gradprobe.global_threshold([second], [], k)
    return torch.ops.gradprobe.global_mask([second], [], t, take)[0]


@dataclass(frozen=True)
class _Exact:
    """The exact rule's plan for one tensor: prune ``count`` (per row, or for the tensor) of its
    candidates; ``score`` (c,) fp32 = the candidates' method scores (the tie-break)."""

    count: int
    per_row: bool
    score: torch.Tensor


def _candidates(targets: Sequence[_Target], sparsity: float, method: str, scope: str,
                norms: Mapping[str, torch.Tensor] | None,
                exact: float | None = None) -> list[tuple[torch.Tensor, _Exact | None]]:
    """Candidate masks at ``sparsity`` (for target="exact": the candidate sparsity s') and, when
    ``exact`` (the requested sparsity s) is given, each tensor's :class:`_Exact` plan: count
    floor(s * in) per row, floor(s * numel) per tensor, or for "global" the number the global
    score selection at s puts in the tensor (the counts sum to floor(s * total))."""
    ns = None
    if method == "wanda":
        if norms is None or any(t.name not in norms for t in targets):
            missing = [t.name for t in targets if norms is None or t.name not in norms]
            raise ValueError(f"Wanda norms missing for {missing[:3]}...; pass norms for every probed tensor or none")
        ns = [norms[t.name].to(device=t.param.device, dtype=torch.float32).contiguous() for t in targets]
    ws = [t.param.data for t in targets]
    with torch.no_grad():
        if scope == "global":
            masks = global_prune_masks(ws, sparsity, norms=ns)
        else:
            masks = [prune_mask(w, sparsity, norm=None if ns is None else ns[i], scope=scope) for i, w in enumerate(ws)]
        if exact is None:
            return [(m, None) for m in masks]
        if scope == "global":
            counts = [int(m.sum()) for m in global_prune_masks(ws, exact, norms=ns)]
        else:
            counts = [num_pruned(w.shape[1] if scope == "row" else w.numel(), exact) for w in ws]
        plans = []
        for i, (w, m) in enumerate(zip(ws, masks, strict=True)):
            score = w.abs().to(torch.float32)
            if ns is not None:
                score = score * ns[i].abs()  # as the selection ops score: |W| * |norm|
            plans.append(_Exact(counts[i], scope == "row", score[m]))
    return list(zip(masks, plans, strict=True))
