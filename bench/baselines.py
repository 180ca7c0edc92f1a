"""What others do to find the k smallest pruning scores: the baselines every benchmark compares to.

Defined once here, independently of ``gradprobe.ops.reference`` (the semantic oracle);
``tests/test_baselines.py`` checks each against that oracle. Conventions:

* ``weight``: (out, in) float32 / bfloat16 / float16; ``norm``: (in,) float32 or None.
* Score = ``fp32(|W|) * norm`` (Wanda: ``torch.abs(W) * torch.sqrt(scaler_row)``), or ``fp32(|W|)``.
* ``k``: how many scores each group prunes (a row; the whole tensor; the whole list for global).
* Masks are torch.bool of weight's shape, True = pruned.

Tie rules. Only the stable sorts have one (among equal scores the lower index is pruned first,
exactly as the reference). ``topk`` picks an unspecified subset of the tied scores (count exact);
the ``kthvalue`` baselines prune every score ``<= threshold`` (the usual "threshold mask"), so they
may prune more than ``k`` when the k-th score is tied. Their *thresholds* always equal the
reference's k-th value, which is what the tests compare for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BLOCK = 128  # column block of the block-sort baseline (SparseGPT's default blocksize)


def score(weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 Wanda score |W| * norm[None, :] (magnitude |W| when norm is None), shape of weight."""
    s = weight.abs().float()
    return s if norm is None else s * norm.abs()


# ---- per row ------------------------------------------------------------------------------------


def row_sort_mask(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    """Wanda's reference way: stable ``torch.sort`` of each row, first k indices scattered into a mask."""
    s = score(weight, norm)
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if k:
        idx = torch.sort(s, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def row_topk_mask(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    """``torch.topk(k, largest=False)`` per row, indices scattered; exact count, unspecified ties."""
    s = score(weight, norm)
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if k:
        mask.scatter_(1, torch.topk(s, k, dim=-1, largest=False, sorted=False)[1], True)
    return mask


def row_topk_threshold(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    """(out,) fp32 k-th smallest score per row via ``topk`` (the largest of the k smallest); k >= 1."""
    return torch.topk(score(weight, norm), k, dim=-1, largest=False, sorted=False)[0].amax(dim=-1)


def row_kthvalue_threshold(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    """(out,) fp32 k-th smallest score per row via ``torch.kthvalue``; k >= 1."""
    return torch.kthvalue(score(weight, norm), k, dim=-1)[0]


def row_kthvalue_mask(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    """Per-row ``kthvalue`` then ``score <= threshold`` (prunes every tie of the k-th score)."""
    s = score(weight, norm)
    if not k:
        return torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    return s <= torch.kthvalue(s, k, dim=-1)[0][:, None]


def row_block_sort_mask(
    weight: torch.Tensor, norm: torch.Tensor | None, k_block: int, block: int = BLOCK
) -> torch.Tensor:
    """Per-row, per-``block``-column sort: each (row, block) prunes its ``k_block`` smallest, ties to the lower index.

    A different grouping (groups of ``block`` scores, as SparseGPT-style blockwise masking sorts
    short segments) with the same tie rule; ``in`` must be a multiple of ``block``.
    """
    out, n = weight.shape
    if n % block:
        raise ValueError(f"weight.shape[1]={n} must be a multiple of block={block}")
    s = score(weight, norm).reshape(out * (n // block), block)
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if k_block:
        mask.scatter_(1, torch.sort(s, dim=-1, stable=True)[1][:, :k_block], True)
    return mask.reshape(out, n)


# ---- one tensor / many tensors ------------------------------------------------------------------


def flat_kthvalue_threshold(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    """0-dim fp32 k-th smallest score of the whole tensor ("layer" scope) via flat ``kthvalue``; k >= 1."""
    return torch.kthvalue(score(weight, norm).reshape(-1), k)[0]


def flat_kthvalue_mask(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    """Layer-scope mask: ``score <= flat kthvalue`` (prunes every tie of the k-th score)."""
    s = score(weight, norm)
    if not k:
        return torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    return s <= torch.kthvalue(s.reshape(-1), k)[0]


def global_concat_kthvalue_threshold(
    weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor] | None, k: int
) -> torch.Tensor:
    """0-dim fp32 k-th smallest score over all tensors: concatenate every flat score, one ``kthvalue``; k >= 1.

    Memory: the fp32 concatenation (4 bytes per score) plus kthvalue's own working copy.
    """
    flat = torch.cat(
        [score(w, None if norms is None else norms[i]).reshape(-1) for i, w in enumerate(weights)]
    )
    return torch.kthvalue(flat, k)[0]


def global_concat_kthvalue_masks(
    weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor] | None, k: int
) -> list[torch.Tensor]:
    """Global masks ``score <= threshold`` from :func:`global_concat_kthvalue_threshold`."""
    if not k:
        return [torch.zeros(w.shape, dtype=torch.bool, device=w.device) for w in weights]
    thr = global_concat_kthvalue_threshold(weights, norms, k)
    return [score(w, None if norms is None else norms[i]) <= thr for i, w in enumerate(weights)]


# ---- N:M (prune the n smallest of every m consecutive scores of a row) --------------------------


def nm_wanda_loop_mask(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """Wanda's ``prune_wanda`` N:M branch: a Python loop over columns, ``topk`` of every m-column block."""
    s = score(weight, norm)
    mask = torch.zeros_like(s, dtype=torch.bool)
    for ii in range(s.shape[1]):
        if ii % m == 0:
            tmp = s[:, ii : ii + m].float()
            mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    return mask


def nm_topk_mask(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """Vectorised: one ``topk`` over the (-1, m) view of the scores."""
    s = score(weight, norm).reshape(-1, m)
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask.scatter_(1, torch.topk(s, n, dim=1, largest=False).indices, True)
    return mask.reshape(weight.shape)


# ---- the floor ----------------------------------------------------------------------------------


def sum_pass(weight: torch.Tensor, norm: torch.Tensor | None = None, k: int = 0) -> torch.Tensor:
    """One ``torch.sum`` over the weight: a single streaming read, the floor any selection is compared to."""
    return weight.sum()
