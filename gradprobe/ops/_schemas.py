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
    # --- exact k-smallest selection (issue 2) ---------------------------------------------------
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
    # --- N:M structured selection (issue 4) -----------------------------------------------------
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


@torch.library.register_fake("gradprobe::global_prune_")
def _(weights, masks, norms, threshold, take):
    return None


@torch.library.register_fake("gradprobe::nm_mask")
def _(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int):
    return _mask_like(weight)


@torch.library.register_fake("gradprobe::nm_prune_")
def _(weight: torch.Tensor, norm: torch.Tensor | None, n: int, m: int):
    return _mask_like(weight)


# --- 2:4 packing (issue 4) — schemas and fakes are appended below by that work -------------------
