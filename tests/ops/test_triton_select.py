"""Kernel-level tests of the Triton selection backend (``gradprobe/kernels``).

On a CPU-only machine these run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``) on tiny
shapes; on a GPU machine the same tests run on CUDA, plus the ``gpu``-marked real Llama shapes.
Oracle: ``gradprobe.ops.reference`` (stable sort, first k; ties to the lower flat index).
"""

from __future__ import annotations

import math

import pytest
import torch

from gradprobe.ops import reference as ref
from tests.helpers import (
    DTYPES,
    assert_masks_equal,
    backend_params,
    dtype_id,
    make_norm,
    make_weight,
    requires_cuda,
    with_backend,
)

TRITON = backend_params(("triton",))
SIGN = -(2**31)


@pytest.fixture
def kernels(backend, device):
    """The gradprobe.kernels package (its import registers the triton backend)."""
    import gradprobe.kernels as k

    return k


def torch_key(s: torch.Tensor) -> torch.Tensor:
    """Reference order-preserving key of fp32 ``s`` as int64 in [0, 2^32): x>=0: bits|2^31, x<0: ~bits."""
    s = torch.where(s == 0, torch.zeros_like(s), s)
    bits = s.contiguous().view(torch.int32)
    return (bits ^ ((bits >> 31) | SIGN)).to(torch.int64) & 0xFFFFFFFF


def as_u32(key_i32: torch.Tensor) -> torch.Tensor:
    return key_i32.to(torch.int64) & 0xFFFFFFFF


# ---- key transform ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", TRITON)
def test_key_transform_orders_every_float_class(kernels, backend, device):
    special = torch.tensor(
        [float("-inf"), -3e38, -1.5, -1.0, -1e-38, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 0.5, 1.0, 2.0, 3e38, float("inf")]
    )
    vals = torch.cat([special, torch.randn(500) * 10.0 ** torch.randint(-30, 30, (500,))])
    _, key = kernels.wanda_score.score_and_key(vals.to(device), raw=True)
    key = as_u32(key.cpu())
    assert torch.equal(key, torch_key(vals)), "kernel key differs from the reference transform"
    order = torch.argsort(vals, stable=True)
    k_sorted = key[order]
    assert (k_sorted[1:] >= k_sorted[:-1]).all(), "key is not monotone in the value"
    v_sorted = vals[order]
    strict = v_sorted[1:] > v_sorted[:-1]
    assert (k_sorted[1:][strict] > k_sorted[:-1][strict]).all(), "distinct values share a key"
    # -0.0 and +0.0 are one key; infinities are the extreme finite-score keys
    assert key[6] == key[7] == 0x80000000
    assert key[0] == 0x007FFFFF and key[-1 - 500] == 0xFF800000


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,device", TRITON)
def test_score_matches_reference_bitwise(kernels, backend, device, dtype):
    w = make_weight((9, 130), dtype, kind="signed_zero")
    w[::2] = make_weight((5, 130), dtype)
    norm = make_norm(130)
    norm[3] = -0.0
    norm[5] = -2.5  # |norm| per the contract
    for n in (None, norm):
        score, key = kernels.wanda_score.score_and_key(w.to(device), None if n is None else n.to(device))
        expected = ref.score(w, n)
        assert torch.equal(score.cpu().view(torch.int32), expected.view(torch.int32)), "score is not bit-exact"
        assert torch.equal(as_u32(key.cpu()), torch_key(expected))


# ---- histogram pass -----------------------------------------------------------------------------


def run_histogram(kernels, w, norm, prefix: int, shift: int, bits: int):
    rs = kernels.radix_select
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=w.device)
    state = torch.tensor([prefix, 1], dtype=torch.int64, device=w.device)
    bad = torch.zeros(1, dtype=torch.int64, device=w.device)
    n_cols, block, warps, tpr, n_tiles = kernels.mask.tiling(w)
    grid = min(n_tiles, kernels._configs.max_programs(w.device))
    rs._global_histogram_kernel[(grid,)](
        w, norm if norm is not None else w, hist, state, bad, n_cols, tpr, n_tiles,
        HAS_NORM=norm is not None, SHIFT=shift, BITS=bits, BLOCK=block, num_warps=warps,
    )
    return hist.cpu(), int(bad)


@pytest.mark.parametrize("backend,device", TRITON)
def test_histogram_pass_matches_bincount(kernels, backend, device):
    w = make_weight((23, 301), torch.bfloat16, kind="ties")  # few distinct scores: crowded bins
    norm = make_norm(301, kind="ties")
    key = torch_key(ref.score(w, norm)).reshape(-1)
    hist, bad = run_histogram(kernels, w.to(device), norm.to(device), 0, 21, 11)
    assert torch.equal(hist, torch.bincount(key >> 21, minlength=2048))
    assert bad == 0 and int(hist.sum()) == w.numel()
    # refining digit: only keys whose top 11 bits equal the prefix's are counted
    top = int(torch.mode(key >> 21).values)
    hist2, _ = run_histogram(kernels, w.to(device), norm.to(device), top << 21, 10, 11)
    sel = key[(key >> 21) == top]
    assert torch.equal(hist2, torch.bincount((sel >> 10) & 0x7FF, minlength=2048))
    assert int(hist2.sum()) == sel.numel() > 0


@pytest.mark.parametrize("backend,device", TRITON)
def test_histogram_pass_matches_histc_and_counts_nonfinite(kernels, backend, device):
    w = make_weight((7, 1000), torch.float32)
    w[2, 5], w[6, 999] = float("nan"), float("-inf")
    hist, bad = run_histogram(kernels, w.to(device), None, 0, 21, 11)
    key = torch_key(ref.score(w)).reshape(-1)  # NaN/Inf scores key above every finite one
    expected = torch.histc((key >> 21).double(), bins=2048, min=0, max=2048).to(torch.int64)
    assert torch.equal(hist, expected) and bad == 2
    assert int(hist[: 0xFF800000 >> 21].sum()) == w.numel() - 2


# ---- row selection ------------------------------------------------------------------------------


def check_rows(device, w, norm, k):
    scores = ref.score(w, norm)
    expected = ref.stable_rank_mask(scores, k)
    thr_e, take_e, eq_e = ref.threshold_triple(scores, k)
    wd, nd = w.to(device), None if norm is None else norm.to(device)
    work = wd.clone()
    with with_backend("triton"):
        thr, take, eq = torch.ops.gradprobe.row_threshold(wd, nd, k)
        mask = torch.ops.gradprobe.row_mask(wd, nd, k)
        mask2 = torch.ops.gradprobe.row_prune_(work, nd, k)
    assert torch.equal(thr.cpu(), thr_e) and torch.equal(take.cpu(), take_e) and torch.equal(eq.cpu(), eq_e)
    assert_masks_equal(mask, expected)
    assert_masks_equal(mask2, expected, "row_prune_ mask")
    assert torch.equal(work.cpu(), w.masked_fill(expected, 0)), "in-place zeroing differs from the mask"
    assert (mask.sum(1).cpu() == k).all()


@pytest.mark.parametrize(
    "shape,dtype,kind",
    [
        ((37, 300), torch.float32, "randn"),
        ((37, 300), torch.float16, "ties"),
        ((64, 1000), torch.bfloat16, "randn"),
        ((1, 7), torch.float16, "randn"),
        ((3, 2500), torch.float32, "ties"),  # several BLOCK steps per row: carries across blocks
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else (dtype_id(v) if isinstance(v, torch.dtype) else v),
)
@pytest.mark.parametrize("backend,device", TRITON)
def test_row_select_vs_reference(backend, device, shape, dtype, kind):
    w = make_weight(shape, dtype, kind=kind)
    norm = make_norm(shape[1], kind="ties" if kind == "ties" else "rand")
    for k in sorted({1, shape[1] // 2, shape[1]}):
        check_rows(device, w, norm, k)
    check_rows(device, w, None, math.ceil(shape[1] * 0.7))


@pytest.mark.parametrize("backend,device", TRITON)
def test_row_heavy_ties_all_equal(backend, device):
    w = make_weight((5, 1500), torch.bfloat16, kind="const")
    for k in (0, 1, 700, 1499, 1500):
        check_rows(device, w, None, k)


# ---- global selection ---------------------------------------------------------------------------


def check_global(device, ws, ns, k):
    flat = torch.cat([ref.score(w, ns[i] if ns else None).reshape(-1) for i, w in enumerate(ws)])[None]
    thr_e, take_e, eq_e = ref.threshold_triple(flat, k)
    expected = ref.global_masks_sorted(ws, ns, k)
    wd, nd = [w.to(device) for w in ws], [n.to(device) for n in ns]
    work = [w.clone() for w in wd]
    outs = [torch.zeros(w.shape, dtype=torch.bool, device=device) for w in wd]
    with with_backend("triton"):
        thr, take, eq = torch.ops.gradprobe.global_threshold(wd, nd, k)
        masks = torch.ops.gradprobe.global_mask(wd, nd, thr, take)
        torch.ops.gradprobe.global_prune_(work, outs, nd, thr, take)
    assert torch.equal(thr.cpu(), thr_e[0]) and take.item() == take_e[0].item() and eq.item() == eq_e[0].item()
    for i, e in enumerate(expected):
        assert_masks_equal(masks[i], e, f"global_mask[{i}]")
        assert_masks_equal(outs[i], e, f"global_prune_ masks[{i}]")
        assert torch.equal(work[i].cpu(), ws[i].masked_fill(e, 0))
    assert sum(int(m.sum()) for m in masks) == k


@pytest.mark.parametrize("backend,device", TRITON)
def test_global_group_of_three(backend, device):
    shapes, dtypes = [(37, 300), (1, 7), (20, 513)], [torch.float32, torch.float16, torch.bfloat16]
    ws = [make_weight(s, d, kind="ties") for s, d in zip(shapes, dtypes, strict=True)]
    ns = [make_norm(s[1], kind="ties") for s in shapes]
    total = sum(w.numel() for w in ws)
    for k in (1, total // 3, total - 1, total):
        check_global(device, ws, ns, k)
    check_global(device, [make_weight(s, torch.float32) for s in shapes], [], total // 2)


@pytest.mark.parametrize("backend,device", TRITON)
def test_global_tie_cut_spans_chunks(backend, device):
    """All scores equal: the pruned ties are a prefix of group order, cut inside a later chunk."""
    ws = [make_weight((40, 700), torch.float32, kind="const"), make_weight((3, 50), torch.float32, kind="const")]
    for k in (1, 13_337, 28_000 + 17):
        check_global(device, ws, [], k)


# ---- NaN / Inf ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend,device", TRITON)
def test_nonfinite_raises_and_writes_nothing(backend, device, bad):
    w = make_weight((6, 100), torch.bfloat16).to(device)
    w[4, 17] = bad
    before = w.clone()
    other = make_weight((3, 40), torch.float32).to(device)
    other_before = other.clone()
    outs = [torch.zeros(t.shape, dtype=torch.bool, device=device) for t in (other, w)]
    thr, take = torch.tensor(0.5, device=device), torch.tensor(3, device=device)
    with with_backend("triton"):
        for call in (
            lambda: torch.ops.gradprobe.row_threshold(w, None, 50),
            lambda: torch.ops.gradprobe.row_mask(w, None, 0),
            lambda: torch.ops.gradprobe.row_prune_(w, None, 50),
            lambda: torch.ops.gradprobe.global_threshold([other, w], [], 70),
            lambda: torch.ops.gradprobe.global_prune_([other, w], outs, [], thr, take),
        ):
            with pytest.raises(ValueError, match="NaN or Inf"):
                call()
    assert torch.equal(w.cpu().view(torch.int16), before.cpu().view(torch.int16)), "W was modified"
    assert torch.equal(other, other_before) and not any(o.any() for o in outs), "a write happened before the raise"


@pytest.mark.parametrize("backend,device", TRITON)
def test_bad_arguments_raise(backend, device):
    w = make_weight((4, 10), torch.float32).to(device)
    with with_backend("triton"):
        with pytest.raises(ValueError, match="k = 11"):
            torch.ops.gradprobe.row_mask(w, None, 11)
        with pytest.raises(ValueError, match="norm must have 10 entries"):
            torch.ops.gradprobe.row_mask(w, torch.ones(9, device=device), 3)
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            torch.ops.gradprobe.row_mask(w.double(), None, 3)


# ---- real Llama shapes (CUDA only) --------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "shape,dtype",
    [((4096, 11008), torch.bfloat16), ((11008, 4096), torch.float16), ((4096, 4096), torch.float32),
     ((1024, 28672), torch.bfloat16)],
    ids=["up_proj^T-bf16", "up_proj-fp16", "q_proj-fp32", "70b-down_proj-rows-bf16"],
)
def test_cuda_row_llama_shapes(shape, dtype):
    w = make_weight(shape, dtype, device="cuda")
    norm = make_norm(shape[1], device="cuda")
    k = shape[1] // 2
    expected = ref.stable_rank_mask(ref.score(w, norm), k)  # torch.sort on the GPU
    thr_e, take_e, eq_e = ref.threshold_triple(ref.score(w, norm), k)
    work = w.clone()
    with with_backend("triton"):
        thr, take, eq = torch.ops.gradprobe.row_threshold(w, norm, k)
        mask = torch.ops.gradprobe.row_prune_(work, norm, k)
    assert torch.equal(thr, thr_e) and torch.equal(take, take_e) and torch.equal(eq, eq_e)
    assert_masks_equal(mask, expected)
    assert torch.equal(work, w.masked_fill(expected, 0))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_cuda_global_llama_layer(kind):
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    ws = [make_weight(s, torch.bfloat16, kind=kind, device="cuda") for s in shapes]
    ns = [make_norm(s[1], kind="ties" if kind == "ties" else "rand", device="cuda") for s in shapes]
    total = sum(w.numel() for w in ws)
    k = total // 2
    expected = ref.global_masks_sorted(ws, ns, k)
    with with_backend("triton"):
        thr, take, eq = torch.ops.gradprobe.global_threshold(ws, ns, k)
        masks = torch.ops.gradprobe.global_mask(ws, ns, thr, take)
    for i in range(len(ws)):
        assert_masks_equal(masks[i], expected[i], f"masks[{i}]")
    assert sum(int(m.sum()) for m in masks) == k
