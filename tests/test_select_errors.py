"""Bad input to the selection API raises ValueError / TypeError naming the argument, and changes nothing.

Validation in ``gradprobe.select`` runs before any op; non-finite weights are detected by the
backend's op, so those cases run on every backend and also check the weights are left unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradprobe
from gradprobe import _backend, _extension
from tests.helpers import backend_params, make_norm, make_weight, with_backend

BACKENDS = backend_params()
SHAPE = (6, 40)


def w_and_norm():
    return make_weight(SHAPE), make_norm(SHAPE[1])


def require_op(backend: str, device: str, op: str) -> None:
    with with_backend(backend):
        try:
            _backend.resolve(op, device)
        except _backend.BackendUnavailableError as exc:
            if "has no" not in str(exc):
                raise
            pytest.skip(str(exc))


# ---- sparsity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_sparsity_out_of_range_raises_value_error(sparsity):
    w, norm = w_and_norm()
    for call in (
        lambda: gradprobe.prune_mask(w, sparsity, norm=norm),
        lambda: gradprobe.prune_(w, sparsity),
        lambda: gradprobe.kth_threshold(w, sparsity),
        lambda: gradprobe.global_prune_masks([w], sparsity),
        lambda: gradprobe.global_prune_([w], sparsity),
    ):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            call()


@pytest.mark.parametrize(
    "sparsity", [True, "0.5", None, torch.tensor(0.5)], ids=["bool", "str", "None", "tensor"]
)
def test_sparsity_wrong_type_raises_type_error(sparsity):
    w, _ = w_and_norm()
    with pytest.raises(TypeError, match="sparsity must be a float"):
        gradprobe.prune_mask(w, sparsity)
    with pytest.raises(TypeError, match="sparsity must be a float"):
        gradprobe.global_prune_masks([w], sparsity)


# ---- non-finite weights: every backend, nothing written ------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nonfinite_weight_raises_and_leaves_weight_unchanged(backend, device, dtype, bad):
    require_op(backend, device, "row_prune_")
    w = make_weight(SHAPE, dtype).to(device)
    w[3, 17] = bad
    norm = make_norm(SHAPE[1]).to(device)
    before = w.clone()
    with with_backend(backend):
        for scope in ("row", "layer"):
            with pytest.raises(ValueError, match="NaN or Inf"):
                gradprobe.prune_mask(w, 0.5, norm=norm, scope=scope)
            with pytest.raises(ValueError, match="NaN or Inf"):
                gradprobe.kth_threshold(w, 0.5, norm=norm, scope=scope)
            with pytest.raises(ValueError, match="NaN or Inf"):
                gradprobe.prune_(w, 0.5, norm=norm, scope=scope)
            assert torch.equal(
                w.view(torch.int16 if dtype != torch.float32 else torch.int32),
                before.view(torch.int16 if dtype != torch.float32 else torch.int32),
            )
        # k == 0 still validates
        with pytest.raises(ValueError, match="NaN or Inf"):
            gradprobe.prune_(w, 0.0)
    assert torch.equal(w.cpu().isnan(), before.cpu().isnan())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nonfinite_in_group_names_the_tensor_and_changes_nothing(backend, device):
    require_op(backend, device, "global_prune_")
    ws = [make_weight((5, 30)).to(device), make_weight((4, 9)).to(device), make_weight((3, 3)).to(device)]
    ws[1][2, 4] = math.nan
    before = [w.clone() for w in ws]
    with with_backend(backend):
        with pytest.raises(ValueError, match=r"weights\[1\].*NaN or Inf"):
            gradprobe.global_prune_masks(ws, 0.5)
        with pytest.raises(ValueError, match=r"weights\[1\].*NaN or Inf"):
            gradprobe.global_prune_(ws, 0.5)
        with pytest.raises(ValueError, match=r"weights\[1\].*NaN or Inf"):
            gradprobe.kth_threshold(ws, 0.3, scope="global")
    for w, b in zip(ws, before, strict=True):
        assert torch.equal(w.nan_to_num(7.0), b.nan_to_num(7.0)), "a weight changed although the call failed"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_op_level_prune_rejects_nonfinite_before_writing(backend, device):
    """The in-place ops themselves (not only the API) leave the weights intact on NaN."""
    require_op(backend, device, "global_prune_")
    w = make_weight((8, 50)).to(device)
    w[7, 49] = math.inf
    before = w.clone()
    ok = make_weight((2, 3)).to(device)
    with with_backend(backend):
        with pytest.raises(ValueError, match="NaN or Inf"):
            torch.ops.gradprobe.row_prune_(w, None, 25)
        masks = [
            torch.zeros(ok.shape, dtype=torch.bool, device=device),
            torch.zeros(w.shape, dtype=torch.bool, device=device),
        ]
        thr, take = torch.tensor(0.5, device=device), torch.tensor(1, device=device)
        with pytest.raises(ValueError, match="NaN or Inf"):
            torch.ops.gradprobe.global_prune_([ok.clone(), w], masks, [], thr, take)
    assert torch.equal(w, before)


# ---- norms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norm,exc,match",
    [
        (torch.full((40,), math.nan), ValueError, "norm contains NaN or Inf"),
        (torch.full((40,), math.inf), ValueError, "norm contains NaN or Inf"),
        (-torch.ones(40), ValueError, "norm has negative entries"),
        (torch.ones(41), ValueError, r"norm must have shape \(40,\)"),
        (torch.ones(6, 40), ValueError, r"norm must have shape \(40,\)"),
        (torch.ones(40, dtype=torch.float64), TypeError, "norm must be float32"),
        (torch.ones(40, dtype=torch.bfloat16), TypeError, "norm must be float32"),
        ([1.0] * 40, TypeError, "norm must be a torch.Tensor"),
        (torch.ones(40, device="meta"), ValueError, "norm is on meta"),
    ],
    ids=["nan", "inf", "negative", "short", "2d", "fp64", "bf16", "list", "device"],
)
def test_bad_norm(norm, exc, match):
    w, _ = w_and_norm()
    before = w.clone()
    with pytest.raises(exc, match=match):
        gradprobe.prune_mask(w, 0.5, norm=norm)
    with pytest.raises(exc, match=match.replace("norm", r"norms\[0\]", 1)):
        gradprobe.global_prune_([w], 0.5, norms=[norm])
    with pytest.raises(exc, match=match):
        gradprobe.prune_(w, 0.5, norm=norm)
    assert torch.equal(w, before)


# ---- weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weight,exc,match",
    [
        (torch.randn(40), ValueError, "weight must be 2-D"),
        (torch.randn(2, 3, 4), ValueError, "weight must be 2-D"),
        (torch.randn(6, 40, dtype=torch.float64), TypeError, "weight must be float32, bfloat16 or float16"),
        (torch.ones(6, 40, dtype=torch.int32), TypeError, "weight must be float32, bfloat16 or float16"),
        ([[1.0, 2.0]], TypeError, "weight must be a torch.Tensor"),
    ],
    ids=["1d", "3d", "fp64", "int32", "list"],
)
def test_bad_weight(weight, exc, match):
    with pytest.raises(exc, match=match):
        gradprobe.prune_mask(weight, 0.5)
    with pytest.raises(exc, match=match):
        gradprobe.prune_(weight, 0.5)
    with pytest.raises(exc, match=match):
        gradprobe.kth_threshold(weight, 0.5)
    if isinstance(weight, torch.Tensor):
        with pytest.raises(exc, match=match.replace("weight", r"weights\[0\]", 1)):
            gradprobe.global_prune_masks([weight], 0.5)


def test_bad_groups():
    w, norm = w_and_norm()
    with pytest.raises(ValueError, match="weights is empty"):
        gradprobe.global_prune_masks([], 0.5)
    with pytest.raises(ValueError, match="weights is empty"):
        gradprobe.global_prune_([], 0.5)
    with pytest.raises(TypeError, match="weights must be a list"):
        gradprobe.global_prune_masks(w, 0.5)
    with pytest.raises(ValueError, match="norms has 1 entries for 2 weights"):
        gradprobe.global_prune_masks([w, w], 0.5, norms=[norm])
    with pytest.raises(ValueError, match="norms must hold a tensor for every weight"):
        gradprobe.global_prune_masks([w, w], 0.5, norms=[norm, None])
    with pytest.raises(ValueError, match=r"weights\[1\] is on meta"):
        gradprobe.global_prune_masks([w, torch.empty(SHAPE, device="meta")], 0.5)
    with pytest.raises(ValueError, match=r"weights\[1\] must be 2-D"):
        gradprobe.global_prune_([w, torch.randn(5)], 0.5)


@pytest.mark.parametrize("scope", ["global", "column", "", None])
def test_bad_scope(scope):
    w, _ = w_and_norm()
    with pytest.raises(ValueError, match="scope must be one of"):
        gradprobe.prune_mask(w, 0.5, scope=scope)
    with pytest.raises(ValueError, match="scope must be one of"):
        gradprobe.prune_(w, 0.5, scope=scope)


@pytest.mark.parametrize("structure", ["2-4", "4:2", "0:4", "2:4:8", "a:b", "2:64"])
def test_bad_structure(structure):
    w, _ = w_and_norm()
    with pytest.raises(ValueError, match="structure"):
        gradprobe.prune_mask(w, None, structure=structure)


def test_structure_conflicts():
    w, _ = w_and_norm()
    with pytest.raises(ValueError, match="conflicts with structure"):
        gradprobe.prune_mask(w, 0.3, structure="2:4")
    with pytest.raises(ValueError, match="divisible by 16"):
        gradprobe.prune_mask(make_weight((4, 40)), None, structure="8:16")


# ---- the C++ ops validate their own arguments too --------------------------------------------------


@pytest.mark.skipif(not _extension.available(), reason="gradprobe._C not built")
def test_cpp_ops_validate_arguments():
    cpp = torch.ops.gradprobe_cpp
    w, norm = w_and_norm()
    with pytest.raises(ValueError, match=r"k must be in \[0, in_features=40\]"):
        cpp.row_mask(w, norm, 41)
    with pytest.raises(ValueError, match="k must be in"):
        cpp.row_threshold(w, None, -1)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        cpp.row_mask(w.t(), None, 1)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        cpp.row_prune_(torch.randn(3), None, 1)
    with pytest.raises(TypeError, match="weight must be float32, bfloat16 or float16"):
        cpp.row_mask(w.double(), None, 1)
    with pytest.raises(TypeError, match="norm must be float32"):
        cpp.row_mask(w, norm.double(), 1)
    with pytest.raises(ValueError, match=r"norm must have shape \(40,\)"):
        cpp.row_mask(w, norm[:5], 1)
    with pytest.raises(ValueError, match="norm contains NaN or Inf"):
        cpp.row_mask(w, torch.full((40,), math.nan), 1)
    # (an empty list never reaches the C++ op: the dispatcher needs a tensor; the API rejects it)
    with pytest.raises(ValueError, match="norms has 1 entries for 2 weights"):
        cpp.global_threshold([w, w], [norm], 0)
    with pytest.raises(ValueError, match=r"k must be in \[0, total elements=240\]"):
        cpp.global_threshold([w], [], 241)
    with pytest.raises(ValueError, match=r"norms\[1\] must have shape"):
        cpp.global_mask([w, w], [norm, norm[:3]], torch.tensor(0.5), torch.tensor(1))
    with pytest.raises(ValueError, match="threshold must be a 0-dim float32"):
        cpp.global_mask([w], [], torch.tensor([0.5, 1.0]), torch.tensor(1))
    with pytest.raises(ValueError, match="take must be a 0-dim int64"):
        cpp.global_mask([w], [], torch.tensor(0.5), torch.tensor(1.0))
    with pytest.raises(ValueError, match="threshold is NaN"):
        cpp.global_mask([w], [], torch.tensor(math.nan), torch.tensor(1))
    with pytest.raises(ValueError, match="masks has 0 entries for 1 weights"):
        cpp.global_prune_([w], [], [], torch.tensor(0.5), torch.tensor(1))
    with pytest.raises(TypeError, match=r"masks\[0\] must be torch.bool"):
        cpp.global_prune_([w], [torch.zeros(SHAPE)], [], torch.tensor(0.5), torch.tensor(1))
    with pytest.raises(ValueError, match=r"masks\[0\] must be a contiguous CPU bool tensor of shape"):
        cpp.global_prune_([w], [torch.zeros(3, dtype=torch.bool)], [], torch.tensor(0.5), torch.tensor(1))
