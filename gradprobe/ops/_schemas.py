"""Every gradprobe operator, declared once: schema + fake (meta) implementation.

This file reads as the specification of the ``gradprobe::`` namespace. The implementations live
elsewhere and are chosen by tensor device through the dispatcher (see ``gradprobe/_backend.py``):

* ``gradprobe/ops/reference.py`` — plain PyTorch, the test oracle and the fallback;
* ``gradprobe._C`` (``csrc/``) — the fast CPU backend (C++/OpenMP), exposed as ``gradprobe_cpp::``;
* ``gradprobe/kernels/`` — the Triton backend for CUDA tensors.

Contract shared by every selection op
-------------------------------------
* Score of element ``(i, j)`` of a weight ``W`` of shape ``(out, in)`` (fp32/bf16/fp16) with
  per-input-channel ``norm`` of shape ``(in,)`` fp32: ``s = fp32(|W[i, j]|) * |norm[j]|`` computed
  in fp32 (one IEEE multiply, identical on every backend; ``|norm|`` only canonicalises ``-0.0``).
  Without ``norm`` the score is ``fp32(|W[i, j]|)`` (magnitude).
* A *group* is one row (``row_*`` ops) or an ordered list of whole tensors (``global_*`` ops; one
  tensor = "layer" scope). The group's order is (tensor position, row-major flat index).
* Given ``k``, the pruned set is the ``k`` smallest scores of the group; among equal scores the one
  earlier in the group's order goes first — exactly a stable ascending sort, first ``k`` taken.
* The *threshold triple* describes that set without materialising it:
  ``threshold`` (fp32) = the k-th smallest score (``-inf`` when ``k == 0``),
  ``take`` (int64) = how many scores equal to ``threshold`` are pruned (the first ``take`` in group
  order), ``equal`` (int64) = how many scores of the group equal ``threshold``.
  So ``count(s < threshold) + take == k``.
* Non-finite weights raise ``ValueError`` before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LIB = torch.library.Library("gradprobe", "DEF")  # noqa: TOR901  (lifetime = the process)

SCHEMAS: dict[str, str] = {
    # --- exact k-smallest selection ----------------------------------------------------------
    # per-row threshold triple; every row is a group of `in` scores, k is the same for all rows
    "row_threshold": "(Tensor weight, Tensor? norm, int k) -> (Tensor threshold, Tensor take, Tensor equal)",
    # fused select + mask per row: bool (out, in), True = pruned
    "row_mask": "(Tensor weight, Tensor? norm, int k) -> Tensor",
    # fused select + zero in place per row; returns the mask
    "row_prune_": "(Tensor(a!) weight, Tensor? norm, int k) -> Tensor",
    # threshold triple (0-dim tensors) for one group spanning all `weights`; norms empty = magnitude
    "global_threshold": "(Tensor[] weights, Tensor[] norms, int k) -> (Tensor threshold, Tensor take, Tensor equal)",
    # masks of that group from a threshold triple (threshold, take as 0-dim tensors)
    "global_mask": "(Tensor[] weights, Tensor[] norms, Tensor threshold, Tensor take) -> Tensor[]",
    # zero in place from a threshold triple, writing each mask into the preallocated bool `masks`
    # (out-style: torch.library cannot functionalise an op returning a list from mutated lists)
    "global_prune_": "(Tensor(a!)[] weights, Tensor(b!)[] masks, Tensor[] norms, Tensor threshold, Tensor take) -> ()",
    # fused select + masks of one group: global_mask(weights, norms, *global_threshold(weights, norms, k)[:2])
    "global_masks": "(Tensor[] weights, Tensor[] norms, int k) -> Tensor[]",
    # --- N:M structured selection ------------------------------------------------------------
    # prune the n smallest scores of every m consecutive elements of a row (ties: lower index first)
    "nm_mask": "(Tensor weight, Tensor? norm, int n, int m) -> Tensor",
    "nm_prune_": "(Tensor(a!) weight, Tensor? norm, int n, int m) -> Tensor",
}

for _name, _schema in SCHEMAS.items():
    LIB.define(_name + _schema)


def _mask_like(w: torch.Tensor) -> torch.Tensor:
    return torch.empty(w.shape, dtype=torch.bool, device=w.device)


def _triple(rows: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = () if rows is None else (rows,)
    return (
        torch.empty(shape, dtype=torch.float32, device=device),
        torch.empty(shape, dtype=torch.int64, device=device),
        torch.empty(shape, dtype=torch.int64, device=device),
    )


@torch.library.register_fake("gradprobe::row_threshold")
def _(weight: torch.Tensor, norm: torch.Tensor | None, k: int):
    return _triple(weight.shape[0], weight.device)


@torch.library.register_fake("gradprobe::row_mask")
def _(weight: torch.Tensor, norm: torch.Tensor | None, k: int):
    return _mask_like(weight)


@torch.library.register_fake("gradprobe::row_prune_")
def _(weight: torch.Tensor, norm: torch.Tensor | None, k: int):
    return _mask_like(weight)


@torch.library.register_fake("gradprobe::global_threshold")
def _(weights: Sequence[torch.Tensor], norms: Sequence[torch.Tensor], k: int):
    return _triple(None, weights[0].device)


@torch.library.register_fake("gradprobe::global_mask")
def _(weights, norms, threshold, take):
    return [_mask_like(w) for w in weights]


@torch.library.register_fake("gradprobe::global_masks")
def _(weights, norms, k):
    return [_mask_like(w) for w in weights]


@torch.library.register_fake("gradprobe::global_prune_")
def _(weights, masks, norms, threshold, take):
    return None


@torch.library.register_fake("gradprobe::nm_mask")
def _(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int):
    return _mask_like(weight)


@torch.library.register_fake("gradprobe::nm_prune_")
def _(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int):
    return _mask_like(weight)


# --- 2:4 packing: schemas and fakes -------------------
#
# Layouts (rows, cols) = weight.shape; a *group* is 4 consecutive elements of a row.
# * cutlass: torch's SparseSemiStructuredTensorCUTLASS layout, bit-for-bit as
#   torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass:
#   packed (rows, cols/2) in weight's dtype, meta int16 (reordered for CUTLASS):
#   fp16/bf16: 2 of every 4 kept, meta (rows, cols/16), rows % 32 == 0, cols % 32 == 0;
#   fp32 (tf32 kernels): 1 of every 2 kept, meta (rows, cols/8), rows % 32 == 0, cols % 16 == 0.
# * bitmask: compressed-tensors "sparse-24-bitmask": values (rows, cols/2) in weight's dtype (kept
#   values in row-major order), bitmask (rows, ceil(cols/8)) uint8, bit j%8 of byte j//8 = column j
#   kept (least-significant bit first). cols % 4 == 0; exactly 2 bits set per group.
# ``scores`` (rows, cols) fp32 or None: None = pack the nonzeros of a 2:4-sparse weight (a group
# with more nonzeros raises naming it); given = prune the 2 smallest scores of every group first
# (ties: lower index pruned first, as nm_mask) and pack W with those zeroed, in the same pass.
PACK_SCHEMAS: dict[str, str] = {
    "pack_24_cutlass": "(Tensor weight, Tensor? scores) -> (Tensor packed, Tensor meta)",
    "unpack_24_cutlass": "(Tensor packed, Tensor meta) -> Tensor",
    "pack_24_bitmask": "(Tensor weight, Tensor? scores) -> (Tensor values, Tensor bitmask)",
    "unpack_24_bitmask": "(Tensor values, Tensor bitmask, int cols) -> Tensor",
}

for _name, _schema in PACK_SCHEMAS.items():
    LIB.define(_name + _schema)
SCHEMAS.update(PACK_SCHEMAS)


@torch.library.register_fake("gradprobe::pack_24_cutlass")
def _(weight: torch.Tensor, scores: torch.Tensor | None):
    rows, cols = weight.shape
    packed = weight.new_empty((rows, cols // 2))
    per = 8 if weight.dtype == torch.float32 else 16  # dense columns described by one int16 of meta
    return packed, weight.new_empty((rows, cols // per), dtype=torch.int16)


@torch.library.register_fake("gradprobe::unpack_24_cutlass")
def _(packed: torch.Tensor, meta: torch.Tensor):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2))


@torch.library.register_fake("gradprobe::pack_24_bitmask")
def _(weight: torch.Tensor, scores: torch.Tensor | None):
    rows, cols = weight.shape
    return weight.new_empty((rows, cols // 2)), weight.new_empty((rows, (cols + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake("gradprobe::unpack_24_bitmask")
def _(values: torch.Tensor, bitmask: torch.Tensor, cols: int):
    return values.new_empty((values.shape[0], cols))


# --- probe: gradient-probe accumulation and decision ----------------------------------
# Contract:
# * probe_accumulate_: acc <- max(acc, |grad|) elementwise; acc and grad of one shape, device and float
#   dtype (fp32, bf16, fp16, fp64; a mismatch raises TypeError naming grad). Exact in any dtype, and
#   pinned down to the bit: acc[i] <- |grad[i]| where |grad[i]| > acc[i] or |grad[i]| is NaN, else acc[i]
#   is left as it is (so a NaN gradient sticks; -0.0 grads give +0.0; an acc of -0.0 stays -0.0 while
#   grads are zero).
# * probe_apply_: ``candidates`` bool, weight's shape (out, in), holds k True entries; ``backup``, ``g0``,
#   ``g1`` are 1-D (k,) in row-major candidate order (backup in weight's dtype fp32/bf16/fp16 = the
#   original candidate values; g0, g1 fp32, bf16, fp16 or fp64). Candidate j is pruned iff
#   fp32(g1[j]) <= fp32(g0[j]) * fp32(scale) (one fp32 multiply; scale = 1 + tau, finite; a NaN g is never
#   pruned); pruned candidates become +0.0, every other candidate gets backup[j] back bit for bit;
#   non-candidates are not touched. Returns the bool (out, in) mask of pruned candidates. Bad arguments
#   (dtype, shape, device, k != popcount(candidates)) raise before weight is written.
PROBE_SCHEMAS: dict[str, str] = {
    "probe_accumulate_": "(Tensor(a!) acc, Tensor grad) -> ()",
    "probe_apply_": "(Tensor(a!) weight, Tensor candidates, Tensor backup, Tensor g0, Tensor g1, float scale) -> Tensor",
}
for _name, _schema in PROBE_SCHEMAS.items():
    LIB.define(_name + _schema)
SCHEMAS.update(PROBE_SCHEMAS)


@torch.library.register_fake("gradprobe::probe_accumulate_")
def _(acc, grad):
    return None


@torch.library.register_fake("gradprobe::probe_apply_")
def _(weight, candidates, backup, g0, g1, scale):
    return _mask_like(weight)


# --- the Wanda variant's per-row cumulative-score cut ----------------------
# Contract of row_cumsum_cut(weight (out, in), norm (in,)?, alpha in [0, 1]):
# * Scores s (fp32, as every selection op) are quantised per row to exact fixed point:
#   q_ij = floor(s_ij * 2^(B - e_i)) as int64, B = 62 - bit_length(in), e_i = frexp exponent of the row
#   max (row max < 2^e_i, so q < 2^B and any row sum < 2^62: integer sums are exact in any order).
# * total_i = sum_j q_ij; tau_i = int64(floor(fp64(alpha) * fp64(total_i))).
# * C_i(j) = sum of the j smallest q of row i; pruned_i = max{ j : C_i(j) <= tau_i } (C_i(0) = 0).
# * The pruned set is the first pruned_i scores of the row in stable ascending order (ties -> lower
#   index), returned as a threshold triple without `equal`: threshold (fp32), take (int64) such that
#   count(s < threshold) + take == pruned (threshold = the smallest score value not wholly pruned, or
#   the row max when the whole row is); threshold = -inf and take = 0 when pruned == 0.
# Returns (threshold fp32 (out,), take int64 (out,), pruned int64 (out,), total int64 (out,)).
ALLOCATION_SCHEMAS: dict[str, str] = {
    "row_cumsum_cut": "(Tensor weight, Tensor? norm, float alpha) -> (Tensor threshold, Tensor take, Tensor pruned, Tensor total)",
}
for _name, _schema in ALLOCATION_SCHEMAS.items():
    LIB.define(_name + _schema)
SCHEMAS.update(ALLOCATION_SCHEMAS)


@torch.library.register_fake("gradprobe::row_cumsum_cut")
def _(weight: torch.Tensor, norm: torch.Tensor | None, alpha: float):
    thr, take, pruned = _triple(weight.shape[0], weight.device)
    return thr, take, pruned, torch.empty_like(take)
