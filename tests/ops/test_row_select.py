"""Per-row exact selection (row_threshold / row_mask / row_prune_) on every backend vs the sort oracle.

Masks must equal ``reference.stable_rank_mask`` bit for bit, triples must equal
``reference.threshold_triple`` exactly, every row prunes exactly k, and the in-place variant zeroes
exactly the masked weights and nothing else.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradprobe
from gradprobe import _extension
from gradprobe.ops import reference as ref
from tests.helpers import (
    DTYPES,
    assert_masks_equal,
    backend_params,
    dtype_id,
    is_interpreted,
    make_norm,
    make_weight,
    order_key,
    require_ops_fixture,
    requires_cpp,
    requires_cuda,
    with_backend,
)

BACKENDS = backend_params()
ROW_OPS = ("row_threshold", "row_mask", "row_prune_")
SHAPES = [(1, 1), (1, 7), (7, 1), (37, 300), (64, 1000), (3, 4097)]
INTERPRETER_MAX = 64 * 1000  # the Triton CPU interpreter only gets shapes up to this many elements


def shape_id(s) -> str:
    return f"shape={s[0]}x{s[1]}"


def skip_if_too_big(backend: str, device: str, numel: int) -> None:
    if is_interpreted(backend, device) and numel > INTERPRETER_MAX:
        pytest.skip("Triton interpreter: small shapes only")


_require_row_ops = require_ops_fixture(ROW_OPS)


def check_row_ops(
    backend: str, device: str, w: torch.Tensor, norm: torch.Tensor | None, k: int
) -> torch.Tensor:
    """Run all three row ops on ``backend`` and compare with the sort oracle; returns the mask."""
    w = w.to(device)
    norm = None if norm is None else norm.to(device)
    scores = ref.score(w.cpu(), None if norm is None else norm.cpu())
    expected = ref.stable_rank_mask(scores, k)
    thr_e, take_e, eq_e = ref.threshold_triple(scores, k)
    w_inplace = w.clone()
    with with_backend(backend):
        thr, take, eq = torch.ops.gradprobe.row_threshold(w, norm, k)
        mask = torch.ops.gradprobe.row_mask(w, norm, k)
        mask_inplace = torch.ops.gradprobe.row_prune_(w_inplace, norm, k)
    assert thr.dtype == torch.float32 and take.dtype == torch.int64 and eq.dtype == torch.int64
    assert torch.equal(thr.cpu(), thr_e), f"threshold differs: {thr.cpu()[:5]} vs {thr_e[:5]}"
    assert torch.equal(take.cpu(), take_e), "take differs from the sort oracle"
    assert torch.equal(eq.cpu(), eq_e), "equal differs from the sort oracle"
    assert_masks_equal(mask, expected)
    assert_masks_equal(mask_inplace, expected, "row_prune_ mask")
    assert (mask.sum(dim=1).cpu() == k).all(), "a row does not prune exactly k"
    # zeroed exactly where the mask is (bit-exact elsewhere, including -0.0 and NaN-free bit patterns)
    assert torch.equal(w_inplace.cpu(), w.cpu().masked_fill(expected, 0))
    return mask


@pytest.mark.parametrize("use_norm", [False, True], ids=["magnitude", "wanda"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_ops_match_sort_oracle(backend, device, dtype, shape, use_norm):
    skip_if_too_big(backend, device, shape[0] * shape[1])
    w = make_weight(shape, dtype)
    norm = make_norm(shape[1]) if use_norm else None
    check_row_ops(backend, device, w, norm, shape[1] // 2)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.999, "1-1/n"])
@pytest.mark.parametrize("shape", [(1, 7), (37, 300), (64, 1000), (3, 4097)], ids=shape_id)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_sparsity_extremes(backend, device, shape, sparsity):
    skip_if_too_big(backend, device, shape[0] * shape[1])
    n = shape[1]
    s = 1 - 1 / n if sparsity == "1-1/n" else sparsity
    w = make_weight(shape, torch.float32)
    norm = make_norm(n)
    with with_backend(backend):
        mask = gradprobe.prune_mask(w.to(device), s, norm=norm.to(device))
    k = math.floor(s * n)
    assert (mask.sum(dim=1).cpu() == k).all()
    assert_masks_equal(mask, ref.stable_rank_mask(ref.score(w, norm), k))
    # the k == n edge and k == n - 1 go through the ops directly (the API caps sparsity below 1)
    check_row_ops(backend, device, w, norm, n if sparsity == "1-1/n" else k)


@pytest.mark.parametrize("norm_kind", [None, "ties", "rand"])
@pytest.mark.parametrize("kind", ["ties", "const", "zeros", "signed_zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_heavy_ties(backend, device, dtype, kind, norm_kind):
    shape = (37, 300)
    w = make_weight(shape, dtype, kind=kind)
    norm = None if norm_kind is None else make_norm(shape[1], kind=norm_kind)
    for k in (1, 113, 150, 299):
        check_row_ops(backend, device, w, norm, k)


@pytest.mark.parametrize("period", [8, 16, 7])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_periodic_pattern(backend, device, period):
    """Every `period`-th weight tiny: defeats any strided sampling of the row, must stay exact."""
    w = make_weight((3, 8000), torch.float32).abs() + 1
    w[:, ::period] = 1e-3
    w[1, 1::period] = 1e-3
    skip_if_too_big(backend, device, w.numel())
    for k in (10, 999, 1000, 1001, 2290, 4000):
        check_row_ops(backend, device, w, None, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_already_pruned(backend, device, dtype):
    """Re-pruning a 50%-pruned matrix: half of every row is an exact tie at 0."""
    w = make_weight((16, 4097), dtype)
    w[ref.stable_rank_mask(ref.score(w), 2048)] = 0
    skip_if_too_big(backend, device, w.numel())
    for k in (1, 2047, 2048, 2049, 3000):
        check_row_ops(backend, device, w, make_norm(4097), k)
        check_row_ops(backend, device, w, None, k)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)], ids=shape_id)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_empty(backend, device, shape):
    check_row_ops(backend, device, make_weight(shape), None, 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_public_api(backend, device):
    """prune_mask / prune_ / kth_threshold (scope="row") are thin wrappers over the row ops."""
    w = make_weight((64, 1000), torch.bfloat16, kind="ties").to(device)
    norm = make_norm(1000, kind="ties").to(device)
    k = math.floor(0.6 * 1000)
    expected = ref.stable_rank_mask(ref.score(w.cpu(), norm.cpu()), k)
    with with_backend(backend):
        mask = gradprobe.prune_mask(w, 0.6, norm=norm)
        thr = gradprobe.kth_threshold(w, 0.6, norm=norm)
        w2 = w.clone()
        mask2 = gradprobe.prune_(w2, 0.6, norm=norm)
        # non-contiguous weight: prune_ must write back through the view
        wt = w.t().contiguous().t()
        mask3 = gradprobe.prune_(wt, 0.6, norm=norm)
    assert_masks_equal(mask, expected)
    assert_masks_equal(mask2, expected)
    assert_masks_equal(mask3, expected)
    assert torch.equal(w2.cpu(), w.cpu().masked_fill(expected, 0))
    assert torch.equal(wt.cpu(), w2.cpu())
    thr_e, take_e, eq_e = ref.threshold_triple(ref.score(w.cpu(), norm.cpu()), k)
    assert torch.equal(thr.value.cpu(), thr_e) and torch.equal(thr.take.cpu(), take_e)
    assert torch.equal(thr.equal.cpu(), eq_e)


@pytest.mark.parametrize(
    "shape,dtype",
    [
        pytest.param((4096, 4096), torch.bfloat16, id="llama-q_proj-bf16"),
        pytest.param((11008, 4096), torch.float32, id="llama-up_proj-fp32", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "reference"])
def test_row_real_llama_shapes(backend, device, shape, dtype):
    skip_if_too_big(backend, device, shape[0] * shape[1])
    w = make_weight(shape, dtype)
    norm = make_norm(shape[1])
    k = shape[1] // 2
    with with_backend(backend):
        mask = torch.ops.gradprobe.row_mask(w.to(device), norm.to(device), k)
    assert_masks_equal(mask, ref.stable_rank_mask(ref.score(w, norm), k))


@st.composite
def tie_heavy_rows(draw):
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 40))
    levels = draw(st.integers(1, 5))
    vals = draw(st.lists(st.integers(-levels, levels), min_size=rows * cols, max_size=rows * cols))
    w = torch.tensor(vals, dtype=torch.float32).reshape(rows, cols) * 0.25
    k = draw(st.integers(0, cols))
    use_norm = draw(st.booleans())
    norm = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=cols, max_size=cols)))
    return w, (norm if use_norm else None), k


@pytest.mark.parametrize("backend,device", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=tie_heavy_rows())
def test_row_property_count_and_tie_rule(backend, device, case):
    w, norm, k = case
    with with_backend(backend):
        mask = torch.ops.gradprobe.row_mask(w.to(device), None if norm is None else norm.to(device), k).cpu()
    s = ref.score(w, norm)
    assert (mask.sum(dim=1) == k).all()
    for i in range(w.shape[0]):
        pruned, kept = s[i][mask[i]], s[i][~mask[i]]
        if pruned.numel() and kept.numel():
            assert pruned.max() <= kept.min(), "a kept score is smaller than a pruned one"
            t = pruned.max()
            ties = (s[i] == t).nonzero().flatten()
            # among the scores equal to the threshold, the pruned ones come first in index order
            assert torch.equal(
                mask[i][ties], torch.sort(mask[i][ties].int(), descending=True, stable=True).values.bool()
            )


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", ["row_threshold", "row_mask", "row_prune_"])
def test_row_opcheck(backend, device, op):
    w = make_weight((5, 33), torch.float32, kind="ties").to(device)
    norm = make_norm(33).to(device)
    with with_backend(backend):
        for args in ((w.clone(), norm, 11), (w.clone(), None, 0)):
            torch.library.opcheck(getattr(torch.ops.gradprobe, op).default, args)




@requires_cpp
def test_cpp_baseline_isa_path_is_exact(monkeypatch):
    """The C++ ops pick AVX2 code at run time; the baseline (non-AVX2) path must be exact too
    (GRADPROBE_CPP_DISABLE_AVX2 is read on every op call)."""
    monkeypatch.setenv("GRADPROBE_CPP_DISABLE_AVX2", "1")
    _extension.load()
    cpp = torch.ops.gradprobe_cpp
    torch.manual_seed(0)
    cases = [(torch.randn(37, 300), torch.rand(300)), (torch.randn(5, 4097).bfloat16(), torch.rand(4097)),
             (torch.randint(-3, 4, (6, 3000)).half(), None), (torch.full((4, 2500), 0.5), None)]
    w = torch.randn(3, 8000).abs() + 1
    w[:, ::8] = 1e-3
    cases.append((w, None))
    for w, n in cases:
        s = ref.score(w, n)
        for k in (0, 1, w.shape[1] // 3, w.shape[1] - 1, w.shape[1]):
            assert torch.equal(cpp.row_mask(w, n, k), ref.stable_rank_mask(s, k)), (w.shape, k)
            got, exp = cpp.row_threshold(w, n, k), ref.threshold_triple(s, k)
            assert all(torch.equal(a, b) for a, b in zip(got, exp, strict=True)), (w.shape, k)



@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_production_score_equals_the_oracle_bitwise(dtype):
    """gradprobe.select.score (used by production code instead of the reference) is the contract's score."""
    from gradprobe.select import score

    w = make_weight((9, 130), dtype, kind="signed_zero")
    norm = make_norm(130)
    norm[3], norm[5] = -0.0, -2.5
    for n in (None, norm):
        got, expected = score(w, n), ref.score(w, n)
        assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), expected.view(torch.int32))

# ---- Triton kernels: the score key (kernels/_score.py) and the per-row radix select ----------------
# On a CPU-only machine these run under TRITON_INTERPRET=1 (tests/conftest.py) on tiny shapes; on a GPU
# machine on CUDA, plus the gpu-marked real Llama shapes.

TRITON = backend_params(("triton",))


@pytest.fixture
def kernels(backend, device):
    """The gradprobe.kernels package (its import registers the triton backend)."""
    import gradprobe.kernels as k

    return k


def as_u32(key_i32: torch.Tensor) -> torch.Tensor:
    return key_i32.to(torch.int64) & 0xFFFFFFFF


@pytest.mark.parametrize("backend,device", TRITON)
def test_key_transform_orders_every_float_class(kernels, backend, device):
    special = torch.tensor(
        [float("-inf"), -3e38, -1.5, -1.0, -1e-38, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 0.5, 1.0, 2.0, 3e38, float("inf")]
    )
    vals = torch.cat([special, torch.randn(500) * 10.0 ** torch.randint(-30, 30, (500,))])
    _, key = kernels._score.score_and_key(vals.to(device), raw=True)
    key = as_u32(key.cpu())
    assert torch.equal(key, order_key(vals)), "kernel key differs from the reference transform"
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
        score, key = kernels._score.score_and_key(w.to(device), None if n is None else n.to(device))
        expected = ref.score(w, n)
        assert torch.equal(score.cpu().view(torch.int32), expected.view(torch.int32)), "score is not bit-exact"
        assert torch.equal(as_u32(key.cpu()), order_key(expected))


def check_triton_rows(device, w, norm, k):
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
def test_triton_row_select_vs_reference(backend, device, shape, dtype, kind):
    w = make_weight(shape, dtype, kind=kind)
    norm = make_norm(shape[1], kind="ties" if kind == "ties" else "rand")
    for k in sorted({1, shape[1] // 2, shape[1]}):
        check_triton_rows(device, w, norm, k)
    check_triton_rows(device, w, None, math.ceil(shape[1] * 0.7))


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_row_heavy_ties_all_equal(backend, device):
    w = make_weight((5, 1500), torch.bfloat16, kind="const")
    for k in (0, 1, 700, 1499, 1500):
        check_triton_rows(device, w, None, k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_row_nonfinite_raises_and_writes_nothing(backend, device, bad):
    w = make_weight((6, 100), torch.bfloat16).to(device)
    w[4, 17] = bad
    before = w.clone()
    with with_backend("triton"):
        for call in (
            lambda: torch.ops.gradprobe.row_threshold(w, None, 50),
            lambda: torch.ops.gradprobe.row_mask(w, None, 0),
            lambda: torch.ops.gradprobe.row_prune_(w, None, 50),
        ):
            with pytest.raises(ValueError, match="NaN or Inf"):
                call()
    assert torch.equal(w.cpu().view(torch.int16), before.cpu().view(torch.int16)), "W was modified"


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_row_bad_arguments_raise(backend, device):
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
