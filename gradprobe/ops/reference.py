"""Plain-PyTorch implementations of every ``gradprobe::`` op: the test oracle and the fallback.

They follow the contract in ``gradprobe/ops/_schemas.py`` literally — a stable ascending sort,
first ``k`` taken — with no attempt at speed. Every faster backend must equal them bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradprobe._backend import impl
from gradprobe.ops._checks import (  # noqa: F401  (re-exported: tests name them through the reference)
    PROBE_FLOAT_DTYPES,
    PROBE_WEIGHT_DTYPES,
    check_finite,
    check_nm,
    check_probe_accumulate,
    check_probe_apply,
    raise_probe_count,
)

NEG_INF = float("-inf")


def score(weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 score ``|W| * |norm|[None, :]`` (or ``|W|``): weight (out, in) any float, norm (in,) fp32."""
    s = weight.abs().to(torch.float32)
    if norm is not None:
        s = s * norm.abs().to(torch.float32)  # |norm| canonicalises -0.0 so equal scores have equal keys
    return s


def stable_rank_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k smallest entries of each row of ``scores`` (out, n); ties -> lower index."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, idx, True)
    return mask


def threshold_triple(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold triple of each row of ``scores`` (rows, n) fp32: (fp32, int64, int64) of shape (rows,)."""
    rows = scores.shape[0]
    if k == 0:
        thr = torch.full((rows,), NEG_INF, dtype=torch.float32, device=scores.device)
        zero = torch.zeros(rows, dtype=torch.int64, device=scores.device)
        return thr, zero, zero.clone()
    thr = torch.sort(scores, dim=-1, stable=True).values[:, k - 1]
    less = (scores < thr[:, None]).sum(-1)
    equal = (scores == thr[:, None]).sum(-1)
    # clone: a fresh tensor (a view into the sort output would carry its storage offset)
    return thr.clone(memory_format=torch.contiguous_format), (k - less).to(torch.int64), equal.to(torch.int64)


def mask_from_triple(scores: torch.Tensor, threshold: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Mask of each row of ``scores`` (rows, n) given its triple: s < t, or the first ``take`` of s == t."""
    t = threshold.reshape(-1, 1)
    eq = scores == t
    rank = torch.cumsum(eq, dim=-1)  # 1-based position among the row's equal scores, in index order
    return (scores < t) | (eq & (rank <= take.reshape(-1, 1)))


# ---- per-row ops ---------------------------------------------------------------------------------


@impl("row_threshold", "reference")
def row_threshold(weight: torch.Tensor, norm: torch.Tensor | None, k: int):
    check_finite(weight)
    return threshold_triple(score(weight, norm), k)


@impl("row_mask", "reference")
def row_mask(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    check_finite(weight)
    return stable_rank_mask(score(weight, norm), k)


@impl("row_prune_", "reference")
def row_prune_(weight: torch.Tensor, norm: torch.Tensor | None, k: int) -> torch.Tensor:
    mask = row_mask(weight, norm, k)
    weight.masked_fill_(mask, 0)
    return mask


# ---- global (one group over a list of tensors; one tensor = layer scope) ---------------------------


def _flat_scores(weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor]) -> torch.Tensor:
    for i, w in enumerate(weights):
        check_finite(w, f"weights[{i}]")
    parts = [score(w, norms[i] if norms else None).reshape(-1) for i, w in enumerate(weights)]
    return torch.cat(parts)


def _split_like(flat: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [w.numel() for w in weights]
    # clone: custom-op outputs must not alias each other (views of one flat tensor would)
    return [m.reshape(w.shape).clone() for m, w in zip(torch.split(flat, sizes), weights, strict=True)]


@impl("global_threshold", "reference")
def global_threshold(weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor], k: int):
    thr, take, equal = threshold_triple(_flat_scores(weights, norms)[None, :], k)
    return thr[0], take[0], equal[0]


@impl("global_mask", "reference")
def global_mask(weights, norms, threshold: torch.Tensor, take: torch.Tensor) -> list[torch.Tensor]:
    flat = _flat_scores(weights, norms)[None, :]
    return _split_like(mask_from_triple(flat, threshold, take)[0], weights)


@impl("global_masks", "reference")
def global_masks(weights, norms, k: int) -> list[torch.Tensor]:
    thr, take, _ = global_threshold(weights, norms, k)
    return global_mask(weights, norms, thr, take)


@impl("global_prune_", "reference")
def global_prune_(weights, masks, norms, threshold: torch.Tensor, take: torch.Tensor) -> None:
    for w, out, m in zip(weights, masks, global_mask(weights, norms, threshold, take), strict=True):
        out.copy_(m)
        w.masked_fill_(m, 0)


def global_masks_sorted(weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Oracle for a whole global selection: concatenate, stable sort, first ``k`` (O(total) memory)."""
    flat = _flat_scores(weights, norms)[None, :]
    return _split_like(stable_rank_mask(flat, k)[0], weights)


# ---- N:M structured selection -----------------------------------------------------------------


def nm_rank_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool mask (out, in) of the n smallest of every m consecutive ``scores`` (out, in) of a row.

    Vectorised: one stable sort of the (-1, m) view, first n taken (ties -> lower index).
    """
    groups = scores.reshape(-1, m)
    idx = torch.sort(groups, dim=-1, stable=True).indices[:, :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, idx, True)
    return mask.reshape(scores.shape)


@impl("nm_mask", "reference")
def nm_mask(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    check_nm(weight, n, m)
    check_finite(weight)
    return nm_rank_mask(score(weight, norm), n, m)


@impl("nm_prune_", "reference")
def nm_prune_(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    mask = nm_mask(weight, norm, n, m)
    weight.masked_fill_(mask, 0)
    return mask


# ---- 2:4 packing --------------------------------------------------------------------------------

PACK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUTLASS metadata nibble (idx0 | idx1 << 2) of a group of 4, by its nonzero pattern
# (bit i = element i nonzero), copied from the boolean expressions of torch's
# sparse_semi_structured_from_dense_cutlass; entries with 3-4 nonzeros are never used (we raise).
CUTLASS_NIBBLE = (14, 8, 9, 4, 14, 8, 9, 4, 14, 12, 13, 4, 14, 12, 13, 4)
# nibbles a valid metadata may hold: idx0 < idx1 (fp16/bf16); fp32 pairs: (0, 1) or (2, 3)
_VALID_NIBBLES_16 = (4, 8, 9, 12, 13, 14)
_VALID_NIBBLES_32 = (4, 14)


def cutlass_col_multiple(dtype: torch.dtype) -> int:
    """cols must be a multiple of this for the CUTLASS layout: an even number of int16 metadata columns."""
    return 16 if dtype == torch.float32 else 32


def _check_pack_weight(weight: torch.Tensor, fmt: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"pack_24({fmt}): weight must be 2-D (rows, cols), got shape {tuple(weight.shape)}")
    if weight.dtype not in PACK_DTYPES:
        raise TypeError(f"pack_24({fmt}): weight must be float16, bfloat16 or float32, got {weight.dtype}")
    rows, cols = weight.shape
    col_mult = cutlass_col_multiple(weight.dtype)
    if fmt == "cutlass" and (rows % 32 or cols % col_mult):
        raise ValueError(
            f"pack_24(cutlass): the CUTLASS layout of {weight.dtype} needs rows % 32 == 0 and cols % {col_mult} == 0 "
            f"(metadata is interleaved in pairs of int16 columns), got shape {(rows, cols)}; "
            'pad the weight or use format="bitmask"'
        )
    if fmt == "bitmask" and cols % 4:
        raise ValueError(f"pack_24(bitmask): the sparse-24-bitmask layout needs cols % 4 == 0, got shape {(rows, cols)}")


def _check_scores(scores: torch.Tensor, weight: torch.Tensor) -> None:
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}; pass scores.float()")
    if scores.shape != weight.shape:
        raise ValueError(f"scores must have weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    if scores.device != weight.device:
        raise ValueError(f"scores is on {scores.device} but weight on {weight.device}; move both to one device")
    check_finite(scores, "scores")


def _apply_scores(weight: torch.Tensor, scores: torch.Tensor | None, fmt: str) -> torch.Tensor:
    if scores is None:
        return weight
    if fmt == "cutlass" and weight.dtype == torch.float32:
        raise ValueError(
            "pack_24(cutlass) with scores: the float32 CUTLASS layout is 1:2 (tf32), not 2:4; prune to 1:2 first "
            "and pack without scores, or convert the weight to float16/bfloat16"
        )
    _check_scores(scores, weight)
    return weight.masked_fill(nm_rank_mask(scores, 2, 4), 0)


def _raise_not_sparse(nnz: torch.Tensor, per: int, limit: int, fmt: str, what: str) -> None:
    """nnz: (rows, groups) nonzero counts of groups of ``per`` elements; raise on the first > limit."""
    bad = (nnz > limit).nonzero()
    if bad.numel():
        r, g = bad[0].tolist()
        raise ValueError(
            f"pack_24({fmt}): weight is not {what} sparse: group at row {r}, columns {g * per}..{g * per + per - 1} "
            f"has {int(nnz[r, g])} nonzeros (at most {limit} allowed); prune it first "
            '(gradprobe.prune_(w, None, structure="2:4")) or pass scores= to select the mask while packing'
        )


def cutlass_meta_offsets(rows: int, meta_cols: int, device) -> torch.Tensor:
    """int64 (rows * meta_cols,): flat position in the reordered int16 metadata of meta[r, c] (row-major).

    CUTLASS ColumnMajorInterleaved<2> with 2x2 swizzle, as torch's
    ``_calculate_meta_reordering_scatter_offsets`` for 16-bit metadata.
    """
    r = torch.arange(rows, device=device)[:, None].expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device)[None, :].expand(rows, meta_cols)
    dr = r // 32 * 32 + (r % 8) * 4 + (r % 32) // 8
    swap = ((dr % 2 == 0) & (c % 2 == 1)).long() - ((dr % 2 == 1) & (c % 2 == 0)).long()
    dr = dr + swap
    dc = c - swap
    return ((dc // 2) * rows * 2 + dr * 2 + dc % 2).reshape(-1)


@impl("pack_24_cutlass", "reference")
def pack_24_cutlass(weight: torch.Tensor, scores: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pack_weight(weight, "cutlass")
    w = _apply_scores(weight, scores, "cutlass")
    rows, cols = w.shape
    nz = w != 0  # -0.0 counts as zero, as in torch's converter
    if w.dtype == torch.float32:
        pairs = w.reshape(rows, cols // 2, 2)
        nzp = nz.reshape(rows, cols // 2, 2)
        _raise_not_sparse(nzp.sum(-1), 2, 1, "cutlass", "1:2 (the float32 CUTLASS layout)")
        first = nzp[..., 0]
        packed = torch.where(first, pairs[..., 0], pairs[..., 1])
        nib = torch.where(first, 4, 14)
    else:
        quads = w.reshape(rows, cols // 4, 4)
        nzq = nz.reshape(rows, cols // 4, 4)
        _raise_not_sparse(nzq.sum(-1), 4, 2, "cutlass", "2:4")
        code = (nzq.long() * torch.tensor([1, 2, 4, 8], device=w.device)).sum(-1)
        nib = torch.tensor(CUTLASS_NIBBLE, device=w.device)[code]
        idx = torch.stack((nib & 3, nib >> 2), dim=-1)
        packed = quads.gather(-1, idx)
    packed = packed.reshape(rows, cols // 2)
    nib = nib.reshape(rows, -1, 4).to(torch.int32)
    meta = (nib[..., 0] | nib[..., 1] << 4 | nib[..., 2] << 8 | nib[..., 3] << 12).to(torch.int16)
    flat = torch.empty(meta.numel(), dtype=torch.int16, device=w.device)
    flat.scatter_(0, cutlass_meta_offsets(rows, meta.shape[1], w.device), meta.reshape(-1))
    return packed.contiguous(), flat.reshape(meta.shape)


def _check_cutlass_meta(packed: torch.Tensor, meta: torch.Tensor) -> None:
    if packed.dim() != 2 or meta.dim() != 2:
        raise ValueError(f"unpack_24(cutlass): packed and meta must be 2-D, got {tuple(packed.shape)}, {tuple(meta.shape)}")
    if packed.dtype not in PACK_DTYPES:
        raise TypeError(f"unpack_24(cutlass): packed must be float16, bfloat16 or float32, got {packed.dtype}")
    if meta.dtype != torch.int16:
        raise TypeError(f"unpack_24(cutlass): meta must be int16 (as pack_24 returns it), got {meta.dtype}")
    rows, half = packed.shape
    per = 4 if packed.dtype == torch.float32 else 8  # packed elements described by one int16 of meta
    if rows % 32 or half % (2 * per) or meta.shape != (rows, half // per):
        raise ValueError(
            f"unpack_24(cutlass): packed (rows, cols/2) needs rows % 32 == 0, cols % {4 * per} == 0 and meta of shape (rows, cols/{2 * per}) = "
            f"{(rows, half // per)}; got packed {tuple(packed.shape)}, meta {tuple(meta.shape)}"
        )


def _raise_bad_meta(ok: torch.Tensor, per: int) -> None:
    bad = (~ok).nonzero()
    if bad.numel():
        r, g = bad[0].tolist()
        raise ValueError(
            f"unpack_24(cutlass): meta is not valid CUTLASS 2:4 metadata: group at row {r}, columns "
            f"{g * per}..{g * per + per - 1} encodes an impossible index pair; pass the meta pack_24 returned"
        )


@impl("unpack_24_cutlass", "reference")
def unpack_24_cutlass(packed: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    _check_cutlass_meta(packed, meta)
    rows, half = packed.shape
    meta_rm = meta.reshape(-1).gather(0, cutlass_meta_offsets(rows, meta.shape[1], meta.device)).to(torch.int32)
    meta_rm = meta_rm.reshape(rows, -1, 1)
    nib = ((meta_rm >> torch.tensor([0, 4, 8, 12], device=meta.device)) & 0xF).reshape(rows, -1)
    if packed.dtype == torch.float32:
        _raise_bad_meta((nib == 4) | (nib == 14), 2)
        v = packed.reshape(rows, half, 1)
        zero = torch.zeros_like(v)
        first = (nib == 4)[..., None]
        dense = torch.cat((torch.where(first, v, zero), torch.where(first, zero, v)), dim=-1)
        return dense.reshape(rows, half * 2)
    _raise_bad_meta(torch.isin(nib, torch.tensor(_VALID_NIBBLES_16, device=meta.device)), 4)
    idx = torch.stack((nib & 3, nib >> 2), dim=-1)
    dense = torch.zeros((rows, half // 2, 4), dtype=packed.dtype, device=packed.device)
    dense.scatter_(-1, idx, packed.reshape(rows, half // 2, 2))
    return dense.reshape(rows, half * 2)


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def bitmask_keep(w: torch.Tensor) -> torch.Tensor:
    """bool (rows, cols): the 2 kept positions of every group of 4 of a 2:4-sparse ``w``.

    The nonzeros, padded (in groups with fewer than 2) with the group's lowest-index zeros.
    """
    rows, cols = w.shape
    nz = (w != 0).reshape(rows, cols // 4, 4)
    zrank = torch.cumsum(~nz, dim=-1)  # 1-based rank among the group's zeros
    keep = nz | (~nz & (zrank <= 2 - nz.sum(-1, keepdim=True)))
    return keep.reshape(rows, cols)


@impl("pack_24_bitmask", "reference")
def pack_24_bitmask(weight: torch.Tensor, scores: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pack_weight(weight, "bitmask")
    w = _apply_scores(weight, scores, "bitmask")
    rows, cols = w.shape
    _raise_not_sparse((w != 0).reshape(rows, cols // 4, 4).sum(-1), 4, 2, "bitmask", "2:4")
    keep = bitmask_keep(w)
    values = w[keep].reshape(rows, cols // 2)
    nbytes = (cols + 7) // 8
    bits = torch.zeros((rows, nbytes * 8), dtype=torch.uint8, device=w.device)
    bits[:, :cols] = keep
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=w.device)
    bitmask = (bits.reshape(rows, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)
    return values, bitmask


@impl("unpack_24_bitmask", "reference")
def unpack_24_bitmask(values: torch.Tensor, bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    if values.dim() != 2 or values.dtype not in PACK_DTYPES:
        raise TypeError(f"unpack_24(bitmask): values must be 2-D float16/bfloat16/float32, got {values.dtype} {tuple(values.shape)}")
    rows = values.shape[0]
    if bitmask.dtype != torch.uint8 or cols % 4 or tuple(bitmask.shape) != (rows, (cols + 7) // 8) or values.shape[1] * 2 != cols:
        raise ValueError(
            f"unpack_24(bitmask): for shape ({rows}, {cols}) (cols % 4 == 0) values must be ({rows}, {cols // 2}) and "
            f"bitmask ({rows}, {(cols + 7) // 8}) uint8; got values {tuple(values.shape)}, bitmask "
            f"{tuple(bitmask.shape)} {bitmask.dtype}"
        )
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bitmask.device)
    keep = ((bitmask[..., None] & weights) != 0).reshape(rows, -1)[:, :cols]
    count = keep.reshape(rows, cols // 4, 4).sum(-1)
    bad = (count != 2).nonzero()
    if bad.numel():
        r, g = bad[0].tolist()
        raise ValueError(
            f"unpack_24(bitmask): bitmask group at row {r}, columns {4 * g}..{4 * g + 3} has {int(count[r, g])} bits set; "
            "the sparse-24-bitmask layout keeps exactly 2 of every 4"
        )
    dense = torch.zeros((rows, cols), dtype=values.dtype, device=values.device)
    dense[keep] = values.reshape(-1)
    return dense


# ---- probe ------------------------------------------------------------------------------------
# Argument checks: gradprobe/ops/_checks.py (shared with the Triton backend).


@impl("probe_accumulate_", "reference")
def probe_accumulate_(acc: torch.Tensor, grad: torch.Tensor) -> None:
    check_probe_accumulate(acc, grad)
    g = grad.abs()
    acc.copy_(torch.where((g > acc) | torch.isnan(g), g, acc))


@impl("probe_apply_", "reference")
def probe_apply_(weight: torch.Tensor, candidates: torch.Tensor, backup: torch.Tensor, g0: torch.Tensor,
                 g1: torch.Tensor, scale: float) -> torch.Tensor:
    check_probe_apply(weight, candidates, backup, g0, g1, scale)
    raise_probe_count(int(candidates.sum()), backup.numel())
    prune = g1.to(torch.float32) <= g0.to(torch.float32) * torch.tensor(scale, dtype=torch.float32, device=g0.device)
    values = torch.where(prune, torch.zeros((), dtype=weight.dtype, device=weight.device), backup)
    weight.masked_scatter_(candidates, values)
    mask = torch.zeros(candidates.shape, dtype=torch.bool, device=candidates.device)
    mask.masked_scatter_(candidates, prune)
    return mask


# ---- the Wanda variant's cumulative cut, by histogram (no sort) ---------------------------
# Unlike the ops above this reference does not sort: the radix histogram IS the method (the cut is
# defined without sorting). Its oracle, a stable sort + int64 cumsum, lives in tests/ops/test_cumsum_cut.py (sort_cut).

_CUT_ROWS_ELEMS = 1 << 22  # rows are processed in chunks of about this many scores (bounds memory)


def fixed_point_scores(scores: torch.Tensor) -> torch.Tensor:
    """int64 (rows, n): q = floor(s * 2^(B - e_row)), B = 62 - bit_length(n); exact, see _schemas."""
    rows, n = scores.shape
    b = 62 - n.bit_length()
    e = torch.frexp(scores.amax(dim=1)).exponent.to(torch.int64) if n else torch.zeros(rows, dtype=torch.int64)
    # 2^(b - e) built from its fp64 bit pattern: an exact power of two, no libm pow involved
    factor = ((b - e + 1023) << 52).view(torch.float64)
    return torch.floor(scores.to(torch.float64) * factor[:, None]).to(torch.int64)


def _cumsum_cut_chunk(s: torch.Tensor, alpha: float):
    rows, n = s.shape
    dev = s.device
    q = fixed_point_scores(s)
    total = q.sum(dim=1)
    tau = torch.floor(alpha * total.to(torch.float64)).to(torch.int64)
    everything = total <= tau
    key = s.view(torch.int32).to(torch.int64)  # scores are >= +0.0: the bit pattern is order-preserving
    base = (torch.arange(rows, device=dev) * 256)[:, None]
    active = torch.ones_like(key, dtype=torch.bool)
    s_less = torch.zeros(rows, dtype=torch.int64, device=dev)
    c_less = torch.zeros_like(s_less)
    thr_key = torch.zeros_like(s_less)
    tau_s = torch.where(everything, torch.full_like(tau, -1), tau)
    hs = hc = b = None
    for shift in (24, 16, 8, 0):
        digit = (key >> shift) & 255
        idx = (digit + base).view(-1)
        act = active.view(-1).to(torch.int64)  # inactive elements add 0 (no compaction: faster)
        hs = torch.zeros(rows * 256, dtype=torch.int64, device=dev).scatter_add_(0, idx, q.view(-1) * act).view(rows, 256)
        hc = torch.zeros(rows * 256, dtype=torch.int64, device=dev).scatter_add_(0, idx, act).view(rows, 256)
        cs = hs.cumsum(dim=1) + s_less[:, None]
        # first bucket whose inclusive cumulative sum exceeds tau: the cut lies inside it
        b = torch.searchsorted(cs, tau_s[:, None], right=True).clamp_max(255)
        cc = hc.cumsum(dim=1)
        s_less = cs.gather(1, b)[:, 0] - hs.gather(1, b)[:, 0]
        c_less = c_less + cc.gather(1, b)[:, 0] - hc.gather(1, b)[:, 0]
        thr_key = thr_key | (b[:, 0] << shift)
        active &= digit == b
    eq = hc.gather(1, b)[:, 0]
    q_star = (hs.gather(1, b)[:, 0] // eq.clamp_min(1)).clamp_min(1)  # > 0 whenever the cut is inside
    take = torch.minimum(eq, ((tau - s_less).clamp_min(0)) // q_star)
    thr = thr_key.to(torch.int32).view(torch.float32)
    if n:
        rmax = s.amax(dim=1)
        thr = torch.where(everything, rmax, thr)
        take = torch.where(everything, (s == rmax[:, None]).sum(dim=1), take)
        c_less = torch.where(everything, n - take, c_less)
    pruned = c_less + take
    none = pruned == 0
    thr = torch.where(none, torch.full_like(thr, NEG_INF), thr)
    take = torch.where(none, torch.zeros_like(take), take)
    return thr, take, pruned, total


@impl("row_cumsum_cut", "reference")
def row_cumsum_cut(weight: torch.Tensor, norm: torch.Tensor | None, alpha: float):
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the prunable share of each row's total score), got {alpha}")
    check_finite(weight)
    if norm is not None:
        check_finite(norm, "norm")
    s = score(weight, norm)
    rows, n = s.shape
    if rows == 0 or n == 0:
        z = torch.zeros(rows, dtype=torch.int64, device=s.device)
        return torch.full((rows,), NEG_INF, dtype=torch.float32, device=s.device), z, z.clone(), z.clone()
    step = max(1, _CUT_ROWS_ELEMS // n)
    parts = [_cumsum_cut_chunk(s[r : r + step], float(alpha)) for r in range(0, rows, step)]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))
