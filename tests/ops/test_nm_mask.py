"""N:M structured selection (nm_mask / nm_prune_) on every backend vs the stable-sort reference.

Masks equal ``reference.nm_rank_mask`` bit for bit (ties to the lower index), every group of m
prunes exactly n, the in-place variant zeroes exactly the masked weights, and the reference itself
agrees with the per-group loop of the Wanda code on distinct scores.
"""

from __future__ import annotations

import pytest
import torch

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
    with_backend,
)

BACKENDS = backend_params()
NM = [(2, 4), (4, 8), (1, 4), (3, 4), (5, 12), (16, 32)]
SHAPES = [(1, 32), (7, 96), (37, 480)]
LLAMA_IN = [4096, 11008]  # in_features of Llama-2-7B q/k/v/o/gate/up and down projections


def nm_id(nm) -> str:
    return f"nm={nm[0]}:{nm[1]}"


def check_counts(mask: torch.Tensor, n: int, m: int) -> None:
    counts = mask.reshape(-1, m).sum(-1)
    assert bool((counts == n).all()), f"groups prune {counts.unique().tolist()} instead of exactly {n}"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("nm", NM, ids=nm_id)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_nm_mask_matches_reference(backend, device, dtype, nm, kind):
    n, m = nm
    shapes = SHAPES[:2] if is_interpreted(backend, device) else SHAPES
    for rows, cols in shapes:
        cols = cols // m * m or m
        w = make_weight((rows, cols), dtype, kind=kind, device=device)
        for norm in (None, make_norm(cols, kind="ties" if kind == "ties" else "rand", device=device)):
            expected = ref.nm_rank_mask(ref.score(w, norm), n, m)
            with with_backend(backend):
                got = torch.ops.gradprobe.nm_mask(w, norm, n, m)
                w2 = w.clone()
                got_inplace = torch.ops.gradprobe.nm_prune_(w2, norm, n, m)
            assert_masks_equal(got, expected, f"nm_mask {rows}x{cols}")
            assert_masks_equal(got_inplace, expected, f"nm_prune_ {rows}x{cols}")
            check_counts(got, n, m)
            assert torch.equal(w2, w.masked_fill(expected, 0)), "nm_prune_ zeroed other weights than its mask"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nm_tie_rule_lower_index_first(backend, device):
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 2.0, 1.0]], device=device)
    with with_backend(backend):
        got = torch.ops.gradprobe.nm_mask(w, None, 2, 4)
    expected = torch.tensor([[True, True, False, False, False, True, False, True]], device=device)
    assert_masks_equal(got, expected, "2:4 ties")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("cols", LLAMA_IN)
def test_nm_llama_in_features(backend, device, cols):
    rows = 2 if is_interpreted(backend, device) else 64
    w = make_weight((rows, cols), torch.bfloat16, device=device)
    norm = make_norm(cols, device=device)
    with with_backend(backend):
        got = gradprobe.prune_mask(w, 0.5, norm=norm, structure="2:4")
    assert_masks_equal(got, ref.nm_rank_mask(ref.score(w, norm), 2, 4), f"2:4 {rows}x{cols}")
    check_counts(got, 2, 4)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_public_api_structure(backend, device):
    w = make_weight((8, 64), torch.float16, kind="ties", device=device)
    with with_backend(backend):
        mask = gradprobe.prune_mask(w, None, structure="4:8")
        w2 = w.t().contiguous().t()  # non-contiguous: prune_ writes back through the view
        mask2 = gradprobe.prune_(w2, 0.5, structure="4:8")
    expected = ref.nm_rank_mask(ref.score(w), 4, 8)
    assert_masks_equal(mask, expected)
    assert_masks_equal(mask2, expected)
    assert torch.equal(w2, w.masked_fill(expected, 0))


@pytest.mark.parametrize(
    "structure,shape,sparsity,match",
    [
        ("2:4", (4, 10), None, "divisible by 4"),
        ("4:4", (4, 8), None, "0 < N < M <= 32"),
        ("2:64", (4, 64), None, "M <= 32"),
        ("0:4", (4, 8), None, "0 < N"),
        ("2:4", (4, 8), 0.3, "conflicts"),
        ("2-4", (4, 8), None, "N:M"),
    ],
)
def test_public_api_bad_structure(structure, shape, sparsity, match):
    w = torch.randn(shape)
    before = w.clone()
    with pytest.raises(ValueError, match=match):
        gradprobe.prune_(w, sparsity, structure=structure)
    assert torch.equal(w, before)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_op_bad_args(backend, device):
    w = torch.randn(4, 8, device=device)
    with with_backend(backend):
        with pytest.raises(ValueError, match="divisible by 3"):
            torch.ops.gradprobe.nm_mask(w, None, 1, 3)
        with pytest.raises(ValueError, match="M <= 32"):
            torch.ops.gradprobe.nm_mask(torch.randn(2, 64, device=device), None, 2, 64)
        with pytest.raises(ValueError, match="0 < N < M"):
            torch.ops.gradprobe.nm_mask(w, None, 4, 4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_raises_and_leaves_weight(backend, device, bad):
    w = torch.randn(4, 16, device=device)
    w[2, 5] = bad
    before = w.clone()
    with with_backend(backend), pytest.raises(ValueError, match=r"NaN or Inf.*\(2, 5\)"):
        torch.ops.gradprobe.nm_prune_(w, None, 2, 4)
    assert torch.equal(w.nan_to_num(), before.nan_to_num()), "weight changed although the op raised"
    assert bool(torch.isnan(w[2, 5]) == torch.isnan(before[2, 5]))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", ["nm_mask", "nm_prune_"])
def test_nm_opcheck(backend, device, op):
    w = make_weight((5, 16), torch.float32, kind="ties", device=device)
    norm = make_norm(16, device=device)
    with with_backend(backend):
        for args in ((w.clone(), norm, 2, 4), (w.clone(), None, 3, 8)):
            torch.library.opcheck(getattr(torch.ops.gradprobe, op).default, args)


@pytest.mark.parametrize("isa", ["dispatch", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpp_m4_isa_paths(monkeypatch, isa, dtype):
    """M = 4 on the C++ backend: the AVX2 loops (picked at run time) and the portable ones
    (GRADPROBE_CPP_DISABLE_AVX2=1, read on every call), with vector tails (cols % 32 != 0), rows longer
    than one 2048-key chunk, and scores that overflow to inf (ties among them)."""
    if not _extension.available():
        pytest.skip(f"gradprobe._C not built: {_extension.diagnosis()}")
    _extension.load()
    if isa == "portable":
        monkeypatch.setenv("GRADPROBE_CPP_DISABLE_AVX2", "1")
    for cols in (4, 36, 2084):
        for kind in ("randn", "ties"):
            w = make_weight((3, cols), dtype, kind=kind)
            w[0, 1:4] = torch.finfo(dtype).max
            for norm in (None, make_norm(cols, kind="ties" if kind == "ties" else "rand")):
                s = ref.score(w, norm)
                for n in (1, 2, 3):
                    got = torch.ops.gradprobe_cpp.nm_mask(w, norm, n, 4)
                    assert_masks_equal(got, ref.nm_rank_mask(s, n, 4), f"{n}:4 {kind} cols={cols}")
