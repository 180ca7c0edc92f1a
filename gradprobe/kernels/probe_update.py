"""Gradient-probe updates: ``triton`` backend of ``gradprobe::probe_accumulate_`` and ``probe_apply_``.

* ``probe_accumulate_``: one elementwise pass, acc (n,) <- |grad| where |grad| > acc or |grad| is NaN.
* ``probe_apply_``: the rank of a candidate (its index into backup / g0 / g1) is the exclusive prefix
  count of ``candidates`` in row-major order. Pass 1 counts the candidates of every chunk of
  ``CHUNK`` elements; ``torch.cumsum`` over those (n / CHUNK) counts gives each chunk's base; pass 2
  walks its chunk in blocks, ranking candidates with ``tl.cumsum`` plus a running carry, gathers
  backup / g0 / g1 at the rank and writes weight and mask. No host sync between the passes: pass 2
  itself writes nothing unless the total count equals k, and the host checks that count afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradprobe._backend import impl
from gradprobe.kernels import _configs
from gradprobe.ops._checks import check_probe_accumulate, check_probe_apply, raise_probe_count

CHUNK = 4096  # elements per pass-1 count; pass-2 blocks (BLOCK) divide it

# both kernels: elementwise over BLOCK elements (apply: BLOCK divides CHUNK)
CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]

_BITS = {2: torch.int16, 4: torch.int32}  # weight bits are copied, never converted


# Both kernels are idempotent (outputs are functions of inputs not written), so autotune may re-run them.
@_configs.autotune(CONFIGS, key=["n_bucket"])
@triton.jit
def _accumulate_kernel(acc_ptr, grad_ptr, n, n_bucket, F64: tl.constexpr, BLOCK: tl.constexpr):
    """acc[i] = |grad[i]| where |grad[i]| > acc[i] or |grad[i]| is NaN (acc, grad: (n,), one float dtype).

    The compare runs in fp32 (fp64 when F64): exact widening of fp16/bf16 (the interpreter would
    otherwise compare bf16 by its bits).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    cmp_ty = tl.float64 if F64 else tl.float32
    a = tl.load(acc_ptr + offs, mask=valid, other=0.0).to(cmp_ty)
    g = tl.abs(tl.load(grad_ptr + offs, mask=valid, other=0.0))
    gc = g.to(cmp_ty)
    tl.store(acc_ptr + offs, g, mask=valid & ((gc > a) | (gc != gc)))


@triton.jit
def _count_kernel(cand_ptr, counts_ptr, n, CHUNK: tl.constexpr):
    """counts[p] = #{i in [p * CHUNK, (p + 1) * CHUNK) : candidates[i]} (candidates: (n,) uint8)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * CHUNK + tl.arange(0, CHUNK).to(tl.int64)
    c = tl.load(cand_ptr + offs, mask=offs < n, other=0) != 0
    tl.store(counts_ptr + pid, tl.sum(c.to(tl.int64), 0))


@_configs.autotune(CONFIGS, key=["n_bucket"])
@triton.jit
def _apply_kernel(w_ptr, cand_ptr, backup_ptr, g0_ptr, g1_ptr, mask_ptr, counts_ptr, incl_ptr, n, k, n_chunks,
                  scale, n_bucket, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """For candidate i of rank j (= #candidates before i in row-major order, base[p] + in-chunk rank):
    prune = g1[j] <= g0[j] * scale (fp32); w[i] = 0 if prune else backup[j]; mask[i] = prune.
    Non-candidates: mask[i] = 0, w[i] untouched. Nothing is written unless sum(counts) == k.

    w, backup: raw bits (int16 / int32) of the weight dtype; g0, g1: (k,) fp32; cand, mask: (n,) uint8;
    counts: (n_chunks,) int64 candidates per chunk, incl = cumsum(counts); scale: fp32.
    """
    pid = tl.program_id(0).to(tl.int64)
    carry = tl.load(incl_ptr + pid) - tl.load(counts_ptr + pid)
    ok = tl.load(incl_ptr + n_chunks - 1) == k
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for s in range(0, CHUNK, BLOCK):
        offs = pid * CHUNK + s + lanes
        valid = (offs < n) & ok
        c = tl.load(cand_ptr + offs, mask=valid, other=0) != 0
        ci = c.to(tl.int64)
        rank = carry + tl.cumsum(ci, 0) - ci
        b = tl.load(backup_ptr + rank, mask=c, other=0)
        g0 = tl.load(g0_ptr + rank, mask=c, other=0.0)
        g1 = tl.load(g1_ptr + rank, mask=c, other=0.0)
        prune = c & (g1 <= g0 * scale)
        tl.store(mask_ptr + offs, prune.to(tl.uint8), mask=valid)
        tl.store(w_ptr + offs, tl.where(prune, tl.zeros_like(b), b), mask=c)
        carry += tl.sum(ci, 0)


@impl("probe_accumulate_", "triton")
def probe_accumulate_(acc: torch.Tensor, grad: torch.Tensor) -> None:
    check_probe_accumulate(acc, grad)
    n = acc.numel()
    if n == 0:
        return
    a = acc if acc.is_contiguous() else acc.contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _accumulate_kernel[grid](a, grad.contiguous(), n, _configs.log2_bucket(n), F64=acc.dtype == torch.float64)
    if a is not acc:
        acc.copy_(a)


@impl("probe_apply_", "triton")
def probe_apply_(weight: torch.Tensor, candidates: torch.Tensor, backup: torch.Tensor, g0: torch.Tensor,
                 g1: torch.Tensor, scale: float) -> torch.Tensor:
    check_probe_apply(weight, candidates, backup, g0, g1, scale)
    n, k = weight.numel(), backup.numel()
    mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    if n == 0:
        raise_probe_count(0, k)
        return mask
    w = weight if weight.is_contiguous() else weight.contiguous()
    cand = candidates.contiguous().view(torch.uint8).reshape(-1)
    n_chunks = triton.cdiv(n, CHUNK)
    counts = torch.empty(n_chunks, dtype=torch.int64, device=weight.device)
    _count_kernel[(n_chunks,)](cand, counts, n, CHUNK=CHUNK, num_warps=4)
    incl = torch.cumsum(counts, 0)
    bits = _BITS[weight.element_size()]
    if k == 0:  # nothing is gathered; give the kernel valid (1-element) buffers
        backup, g0, g1 = w.reshape(-1)[:1], g0.new_zeros(1), g1.new_zeros(1)
    # scale rounded to fp32 on the host (round to nearest even, as torch): the kernel's fp32 argument is then exact
    scale32 = torch.tensor(scale, dtype=torch.float32).item()
    _apply_kernel[(n_chunks,)](
        w.view(bits), cand, backup.contiguous().view(bits), g0.to(torch.float32).contiguous(),
        g1.to(torch.float32).contiguous(), mask.view(torch.uint8), counts, incl, n, k, n_chunks, scale32,
        _configs.log2_bucket(n), CHUNK=CHUNK,
    )
    raise_probe_count(int(incl[-1]), k)  # pass 2 wrote nothing if this raises
    if w is not weight:
        weight.copy_(w)
    return mask
