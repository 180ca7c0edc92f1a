"""The Wanda variant's per-row cumulative cut (gradprobe::row_cumsum_cut) on every backend vs an oracle
written from the definition: stable sort, exact fixed point, int64 cumsum, first k in stable order.

The bisection over alpha that uses the cut is tested in tests/test_variant.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradprobe  # noqa: F401  (registers the ops)
from gradprobe.variant import variant_prune_mask
from tests.helpers import backend_params, with_backend

CUT_BACKENDS = backend_params(("reference", "cpp"))


def sort_cut(weight, norm, alpha):
    """Oracle, written from the definition: sort, fixed point, cumsum, count, first k in stable order."""
    s = weight.abs().float()
    if norm is not None:
        s = s * norm.abs().float()
    rows, n = s.shape
    b = 62 - n.bit_length()
    masks, pruned, totals = [], [], []
    for i in range(rows):
        row = s[i]
        e = math.frexp(float(row.max()))[1]
        # floor(s * 2^(b - e)) in exact Python arithmetic (fp32 -> float is exact)
        q = [math.floor(math.ldexp(float(v), b - e)) for v in row.tolist()]
        total = sum(q)
        tau = math.floor(float(alpha) * float(total))
        order = torch.sort(row, stable=True).indices.tolist()
        c, k = 0, 0
        for j in order:
            if c + q[j] > tau:
                break
            c += q[j]
            k += 1
        m = torch.zeros(n, dtype=torch.bool)
        m[order[:k]] = True
        masks.append(m)
        pruned.append(k)
        totals.append(total)
    return torch.stack(masks), torch.tensor(pruned), torch.tensor(totals)


def cut_inputs(rows, cols, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if ties:
        w = torch.round(w * 2) / 2  # few distinct values: heavy ties
    norm = torch.rand(cols, generator=g) * 3
    return w.to(dtype), norm


@pytest.mark.parametrize(("backend", "device"), CUT_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 123), (5, 600), (2, 4096)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("alpha", [0.0, 0.013, 0.25, 0.5, 0.9, 1.0])
def test_cut_equals_sort_cumsum(backend, device, shape, dtype, alpha):
    w, norm = cut_inputs(*shape, dtype, seed=shape[1])
    with with_backend(backend):
        thr, take, pruned, total = torch.ops.gradprobe.row_cumsum_cut(w, norm, alpha)
    ref_mask, ref_pruned, ref_total = sort_cut(w, norm, alpha)
    assert torch.equal(total, ref_total)
    assert torch.equal(pruned, ref_pruned)
    s = w.abs().float() * norm
    mask = (s < thr[:, None]) | ((s == thr[:, None]) & (torch.cumsum(s == thr[:, None], 1) <= take[:, None]))
    assert torch.equal(mask, ref_mask)
    assert torch.equal(mask.sum(1), pruned)


@pytest.mark.parametrize(("backend", "device"), CUT_BACKENDS)
@pytest.mark.parametrize("alpha", [0.1, 0.37, 0.6])
def test_cut_ties_zeros_and_magnitude(backend, device, alpha):
    w, _ = cut_inputs(8, 300, torch.float32, seed=3, ties=True)
    w[2] = 0  # an all-zero row: every alpha prunes it whole
    w[5, ::3] = 0
    w[6] = 1e-30  # subnormal-range scores
    w[6, 0] = 1e30
    w[7, 1::2] = -0.0
    with with_backend(backend):
        _, _, pruned, total = torch.ops.gradprobe.row_cumsum_cut(w, None, alpha)
        mask, _ = variant_prune_mask(w, 0.99, tol=0.01)  # runs the mask path on the same data
    ref_mask, ref_pruned, ref_total = sort_cut(w, None, alpha)
    assert torch.equal(pruned, ref_pruned) and torch.equal(total, ref_total)
    assert pruned[2] == 300
    assert mask.shape == w.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cut_backends_agree_on_llama_rows(dtype):
    """The C++ cut equals the reference bit for bit on real-width rows (11008 = Llama-7B's MLP)."""
    w, norm = cut_inputs(24, 11008, dtype, seed=5)
    for alpha in (0.02, 0.3, 0.77):
        with with_backend("reference"):
            expected = torch.ops.gradprobe.row_cumsum_cut(w, norm, alpha)
        with with_backend("cpp"):
            got = torch.ops.gradprobe.row_cumsum_cut(w, norm, alpha)
        for name, a, b in zip(("threshold", "take", "pruned", "total"), got, expected, strict=True):
            assert torch.equal(a, b), f"alpha={alpha}: {name} differs"


@pytest.mark.parametrize(("backend", "device"), CUT_BACKENDS)
def test_cut_bad_inputs_raise(backend, device):
    w, norm = cut_inputs(3, 16, torch.float32, seed=1)
    w[1, 4] = float("nan")
    with with_backend(backend), pytest.raises(ValueError, match="NaN or Inf"):
        torch.ops.gradprobe.row_cumsum_cut(w, norm, 0.5)
    w[1, 4] = 0.0
    bad_norm = norm.clone()
    bad_norm[2] = float("inf")
    with with_backend(backend), pytest.raises(ValueError, match="norm"):
        torch.ops.gradprobe.row_cumsum_cut(w, bad_norm, 0.5)
    for alpha in (-0.1, 1.5):
        with with_backend(backend), pytest.raises(ValueError, match="alpha must be in"):
            torch.ops.gradprobe.row_cumsum_cut(w, norm, alpha)


@pytest.mark.parametrize(("backend", "device"), CUT_BACKENDS)
def test_cut_opcheck(backend, device):
    w, norm = cut_inputs(4, 40, torch.float32, seed=0)
    with with_backend(backend):
        torch.library.opcheck(torch.ops.gradprobe.row_cumsum_cut.default, (w, norm, 0.3))
