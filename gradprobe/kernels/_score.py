"""Wanda score and its order-preserving uint32 key, as Triton device functions.

``score = fp32(|w|) * |norm|`` (one fp32 multiply; magnitude ``fp32(|w|)`` without a norm) and
``key = f(score)`` with ``a < b  <=>  f(a) < f(b)`` as unsigned integers for every non-NaN fp32,
``f(-0.0) == f(+0.0)``. Every selection kernel (``row_select.py``, ``global_select.py``) forms the key in
registers with :func:`score_key`; nothing materialises a score matrix. ``_score_kernel`` and
:func:`score_and_key` expose the transform for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# uint32 keys are handled as their int32 bit pattern on the host (torch has no uint32 arithmetic)
SIGN_BIT = -(2**31)


@triton.jit
def float_to_key(s):
    """fp32 -> uint32 order-preserving key: x >= 0: bits | 0x80000000; x < 0: ~bits; -0.0 -> key(+0.0)."""
    s = tl.where(s == 0.0, 0.0, s)  # canonical zero: equal scores must have equal keys
    bits = s.to(tl.int32, bitcast=True)
    # arithmetic shift: 0 for x >= 0, -1 (all ones) for x < 0; xor with (that | sign bit)
    flip = (bits >> 31) | (-2147483647 - 1)
    return (bits ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def key_to_float(key):
    """Inverse of :func:`float_to_key` (uint32 -> fp32); +0.0 for the key of either zero."""
    k = key.to(tl.int32, bitcast=True)
    # key with top bit set came from x >= 0: clear it; otherwise it was ~bits
    flip = tl.where(k < 0, -2147483647 - 1, -1)
    return (k ^ flip).to(tl.float32, bitcast=True)


@triton.jit
def score_key(w_ptr, norm_ptr, offs, cols, valid, HAS_NORM: tl.constexpr):
    """Load W[offs] (fp32/bf16/fp16) and norm[cols]; return (uint32 key of the score, W non-finite)."""
    w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    s = tl.abs(w)
    if HAS_NORM:
        s = s * tl.abs(tl.load(norm_ptr + cols, mask=valid, other=0.0))
    # W is inf/NaN iff its exponent field is all ones (the fp32 upcast keeps inf/NaN)
    nonfinite = (w.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
    return float_to_key(s), nonfinite & valid


@triton.jit
def _score_kernel(w_ptr, norm_ptr, score_ptr, key_ptr, numel, n_cols, HAS_NORM: tl.constexpr,
                        RAW: tl.constexpr, BLOCK: tl.constexpr):
    """score[i] = fp32(|w[i]|) * |norm[i % n_cols]| (or fp32(|w[i]|)); key[i] = float_to_key(score[i]).

    RAW: key[i] = float_to_key(fp32(w[i])) of the signed value instead (to test the transform).
    w (numel,) fp32/bf16/fp16 row-major (rows, n_cols); score fp32, key int32 holding the uint32 bits.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    if RAW:
        key = float_to_key(tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32))
    else:
        key, _ = score_key(w_ptr, norm_ptr, offs, offs % n_cols, valid, HAS_NORM)
    tl.store(score_ptr + offs, key_to_float(key), mask=valid)
    tl.store(key_ptr + offs, key.to(tl.int32, bitcast=True), mask=valid)


def score_and_key(
    weight: torch.Tensor, norm: torch.Tensor | None = None, raw: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score fp32, key int32 bit pattern of the uint32 key), both of ``weight``'s shape.

    weight (..., n) fp32/bf16/fp16, norm (n,) fp32 or None. The score is recovered from the key
    (``key_to_float``), so it also checks that the transform round-trips. ``raw``: key of the
    signed value fp32(weight) itself (no abs, no norm).
    """
    w = weight.contiguous()
    n_cols = w.shape[-1] if w.dim() else 1
    score = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    key = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    if w.numel():
        block = 1024
        _score_kernel[(triton.cdiv(w.numel(), block),)](
            w, norm if norm is not None else w, score, key, w.numel(), n_cols,
            HAS_NORM=norm is not None, RAW=raw, BLOCK=block,
        )
    return score, key
