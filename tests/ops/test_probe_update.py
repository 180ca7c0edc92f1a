"""Gradient-probe ops (probe_accumulate_ / probe_apply_) on every backend vs plain oracles written here.

Oracles: apply gathers with ``nonzero`` (flat indices) and writes with index_put (no masked_scatter, unlike the
reference); accumulate compares in fp64 and builds the result from raw bits. Everything is compared
bit for bit (weights and accumulators through integer views of the same bytes).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DTYPES, assert_masks_equal, backend_params, dtype_id, is_interpreted, with_backend

BACKENDS = backend_params()
BACKENDS_NO_INTERP = backend_params(("reference", "cpp"))
SHAPES = [(1, 1), (1, 7), (3, 129), (37, 1000)]
ACC_DTYPES = [*DTYPES, torch.float64]
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{what}: {actual.dtype}{tuple(actual.shape)}"
    diff = (bits(actual) != bits(expected)).reshape(actual.shape).nonzero()
    if diff.numel():
        i = tuple(diff[0].tolist())
        raise AssertionError(f"{what}: {diff.shape[0]} entries differ in their bits; first at {i}: "
                             f"{actual[i].item()!r} vs {expected[i].item()!r}")


# ---- oracles -------------------------------------------------------------------------------------


def oracle_apply(weight, candidates, backup, g0, g1, scale):
    """(new weight, mask): candidate i = flatnonzero(candidates)[j] is pruned iff fp32 g1[j] <= fp32 g0[j] * fp32 scale."""
    w = weight.clone()
    mask = torch.zeros(candidates.shape, dtype=torch.bool)
    idx = candidates.reshape(-1).nonzero().reshape(-1)
    prune = g1.float() <= g0.float() * torch.tensor(scale, dtype=torch.float32)
    flat = w.reshape(-1)  # weight is contiguous in these tests: a view
    flat[idx] = torch.where(prune, torch.zeros((), dtype=w.dtype), backup)
    mask.reshape(-1)[idx] = prune
    return w, mask


_SIGN = {torch.float16: 0x7FFF, torch.bfloat16: 0x7FFF, torch.float32: 0x7FFFFFFF, torch.float64: 0x7FFFFFFFFFFFFFFF}


def oracle_accumulate(acc, grad):
    """acc bits <- |grad| bits (sign cleared) where |grad| > acc or |grad| is NaN, compared in fp64."""
    g_abs = bits(grad) & _SIGN[grad.dtype]
    g = g_abs.view(grad.dtype).double()
    a = acc.double()
    upd = (g > a) | torch.isnan(g)
    return torch.where(upd, g_abs, bits(acc)).view(acc.dtype).reshape(acc.shape)


# ---- inputs --------------------------------------------------------------------------------------


def probe_case(shape, dtype, kind, scale, g_dtype, device="cpu", seed=0):
    """weight (candidates scaled by 0.1, as during the probe), candidates, backup, g0, g1.

    g0 = n / 8 (n < 50) and g1 in {g0 * scale (a tie: pruned), +-1/32 around it, +0.0, -0.0}: every
    value and product is exact in fp16, bf16 and fp32 for scale 1 and 1.25, so ties are real ties.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    w[torch.rand(shape, generator=gen) < 0.1] = -0.0  # restoring must keep the sign of zero
    w = w.to(dtype)
    if kind == "half":
        cand = torch.rand(shape, generator=gen) < 0.5
    elif kind == "all":
        cand = torch.ones(shape, dtype=torch.bool)
    else:
        cand = torch.zeros(shape, dtype=torch.bool)
    backup = w[cand]
    k = backup.numel()
    g0 = torch.randint(0, 50, (k,), generator=gen).float() / 8
    tie = g0 * scale
    choices = torch.stack([tie, tie + 1 / 32, tie - 1 / 32, torch.zeros(k), torch.full((k,), -0.0)])
    g1 = choices.gather(0, torch.randint(0, 5, (1, k), generator=gen))[0]
    probed = w.clone()
    probed[cand] = (probed[cand].float() * 0.1).to(dtype)
    return [t.to(device) for t in (probed, cand, backup, g0.to(g_dtype), g1.to(g_dtype))]


def run_apply(backend, w, cand, backup, g0, g1, scale):
    with with_backend(backend):
        return torch.ops.gradprobe.probe_apply_(w, cand, backup, g0, g1, scale)


# ---- probe_apply_ --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_apply_matches_oracle(backend, device, dtype, shape):
    big = shape[0] * shape[1] > 1000
    for kind in ("half", "all", "none"):
        for scale in (1.0, 1.25):
            for g_dtype in {torch.float32, dtype}:
                if big and is_interpreted(backend, device) and (kind != "half" or g_dtype != dtype):
                    continue
                w, cand, backup, g0, g1 = probe_case(shape, dtype, kind, scale, g_dtype, device)
                want_w, want_m = oracle_apply(w.cpu(), cand.cpu(), backup.cpu(), g0.cpu(), g1.cpu(), scale)
                mask = run_apply(backend, w, cand, backup, g0, g1, scale)
                what = f"{kind} scale={scale} g={g_dtype}"
                assert_masks_equal(mask, want_m, f"mask {what}")
                assert_bits_equal(w.cpu(), want_w, f"weight {what}")
                if kind == "half" and backup.numel() > 8:
                    ties = (g1.float() == g0.float() * scale).cpu()
                    pruned = want_m.reshape(-1)[cand.cpu().reshape(-1).nonzero().reshape(-1)]
                    assert bool(ties.any()) and bool(pruned[ties].all()), "exact ties must be pruned"


@pytest.mark.parametrize("backend,device", BACKENDS_NO_INTERP)
def test_apply_llama_shape(backend, device):
    w, cand, backup, g0, g1 = probe_case((64, 4096), torch.bfloat16, "half", 1.25, torch.float32, device)
    want_w, want_m = oracle_apply(w, cand, backup, g0, g1, 1.25)
    assert_masks_equal(run_apply(backend, w, cand, backup, g0, g1, 1.25), want_m, "mask 64x4096")
    assert_bits_equal(w, want_w, "weight 64x4096")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0 (interpreter)
def test_apply_redecide_and_special_values(backend, device):
    """A second decision (threshold tuning) restores from backup, never from the weight; fp64 and NaN
    statistics (NaN never prunes), a scale that overflows fp32 (inf * 0 = NaN: not pruned)."""
    w, cand, backup, g0, g1 = probe_case((5, 33), torch.float16, "half", 1.25, torch.float64, device)
    g1[::7] = float("nan")
    run_apply(backend, w, cand, backup, g0, g1, 3.0)
    want_w, want_m = oracle_apply(w.cpu(), cand.cpu(), backup.cpu(), g0.cpu(), g1.cpu(), 1.25)
    assert_masks_equal(run_apply(backend, w, cand, backup, g0, g1, 1.25), want_m, "second decision")
    assert_bits_equal(w.cpu(), want_w, "weight after the second decision")
    want_w, want_m = oracle_apply(w.cpu(), cand.cpu(), backup.cpu(), g0.cpu(), g1.cpu(), 1e300)
    assert_masks_equal(run_apply(backend, w, cand, backup, g0, g1, 1e300), want_m, "scale 1e300")
    assert_bits_equal(w.cpu(), want_w, "weight, scale 1e300")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_apply_non_contiguous_weight(backend, device):
    base, cand_t, *_ = probe_case((9, 6), torch.float32, "half", 1.0, torch.float32, device)
    w = base.t()  # (6, 9) view; candidate order is row-major in the view's shape
    cand = cand_t.t()
    backup = w[cand]
    g0 = torch.ones(backup.numel(), device=device)
    g1 = torch.where(torch.arange(backup.numel(), device=device) % 2 == 0, 1.0, 2.0)
    want_w, want_m = oracle_apply(w.contiguous().cpu(), cand.cpu(), backup.cpu(), g0.cpu(), g1.cpu(), 1.0)
    w[cand] = 7.0
    mask = run_apply(backend, w, cand, backup, g0, g1, 1.0)
    assert_masks_equal(mask, want_m, "mask of a transposed weight")
    assert_bits_equal(base.t().cpu(), want_w, "transposed weight (written through the view)")


def _bad_apply_cases():
    def mod(**kw):
        return kw

    return [
        pytest.param(mod(weight=lambda a: a["weight"].double()), TypeError, "weight must be float32", id="weight-fp64"),
        pytest.param(mod(candidates=lambda a: a["candidates"].to(torch.uint8)), TypeError, "candidates must be a bool",
                     id="cand-uint8"),
        pytest.param(mod(candidates=lambda a: a["candidates"][:, :-1]), ValueError, "candidates must have weight's shape",
                     id="cand-shape"),
        pytest.param(mod(backup=lambda a: a["backup"].float()), TypeError, "backup must have weight's dtype",
                     id="backup-dtype"),
        pytest.param(mod(backup=lambda a: a["backup"][None]), ValueError, "backup must be 1-D", id="backup-2d"),
        pytest.param(mod(g0=lambda a: a["g0"][:-1]), ValueError, "g0 must have backup's shape", id="g0-short"),
        pytest.param(mod(g1=lambda a: a["g1"].to(torch.int32)), TypeError, "g1 must be float32", id="g1-int"),
        pytest.param(mod(scale=lambda a: float("nan")), ValueError, "scale must be finite", id="scale-nan"),
        pytest.param(mod(scale=lambda a: float("inf")), ValueError, "scale must be finite", id="scale-inf"),
        pytest.param(mod(candidates=lambda a: a["candidates"].clone().fill_(True)), ValueError,
                     r"candidates holds \d+ True entries but backup, g0 and g1 hold k", id="k-too-small"),
        pytest.param(mod(candidates=lambda a: a["candidates"].clone().fill_(False)), ValueError,
                     r"candidates holds 0 True entries", id="k-too-large"),
    ]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("change,exc,match", _bad_apply_cases())
def test_apply_bad_inputs_raise_and_leave_weight(backend, device, change, exc, match):
    w, cand, backup, g0, g1 = probe_case((4, 10), torch.bfloat16, "half", 1.0, torch.float32, device)
    args = {"weight": w, "candidates": cand, "backup": backup, "g0": g0, "g1": g1, "scale": 1.0}
    for name, fn in change.items():
        args[name] = fn(args)
    before = args["weight"].clone()
    with pytest.raises(exc, match=match):
        run_apply(backend, *args.values())
    assert_bits_equal(args["weight"], before, "weight after a rejected call")


# ---- probe_accumulate_ ---------------------------------------------------------------------------


def grad_like(shape, dtype, device, seed):
    """Signed gradients with -0.0, +-inf, NaN and exact ties with |earlier gradients|."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(-6, 7, shape, generator=gen).float() / 4  # few values: many ties across batches
    r = torch.rand(shape, generator=gen)
    g[r < 0.1] = -0.0
    g[(r > 0.95) & (r < 0.96)] = float("-inf")
    g[(r > 0.97) & (r < 0.975)] = float("nan")
    return g.to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", ACC_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_accumulate_matches_oracle(backend, device, dtype, shape):
    acc = grad_like(shape, dtype, device, seed=1)
    acc.reshape(-1)[::5] = -0.0  # a -0.0 accumulator stays -0.0 under zero gradients
    want = acc.cpu()
    for seed in (2, 3):
        grad = grad_like(shape, dtype, device, seed)
        want = oracle_accumulate(want, grad.cpu())
        with with_backend(backend):
            torch.ops.gradprobe.probe_accumulate_(acc, grad)
        assert_bits_equal(acc.cpu(), want, f"acc after grad {seed}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_accumulate_non_contiguous(backend, device):
    base = grad_like((6, 10), torch.float32, device, 1).abs()
    grad = grad_like((10, 6), torch.float32, device, 2)
    want = oracle_accumulate(base.t().contiguous().cpu(), grad.cpu())
    with with_backend(backend):
        torch.ops.gradprobe.probe_accumulate_(base.t(), grad)
    assert_bits_equal(base.t().contiguous().cpu(), want, "acc written through a transposed view")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "acc_dtype,grad_dtype,grad_shape,exc,match",
    [
        (torch.float32, torch.bfloat16, (3, 5), TypeError, "grad must have acc's dtype"),
        (torch.bfloat16, torch.float32, (3, 5), TypeError, "grad must have acc's dtype"),
        (torch.int32, torch.int32, (3, 5), TypeError, "acc must be float32"),
        (torch.float32, torch.float32, (5, 3), ValueError, "grad must have acc's shape"),
    ],
)
def test_accumulate_bad_inputs(backend, device, acc_dtype, grad_dtype, grad_shape, exc, match):
    acc = torch.arange(15, device=device).reshape(3, 5).to(acc_dtype)
    before = acc.clone()
    grad = torch.full(grad_shape, 100, device=device).to(grad_dtype)
    with with_backend(backend), pytest.raises(exc, match=match):
        torch.ops.gradprobe.probe_accumulate_(acc, grad)
    assert torch.equal(acc, before)


# ---- opcheck -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_probe_opcheck(backend, device):
    w, cand, backup, g0, g1 = probe_case((5, 16), torch.bfloat16, "half", 1.25, torch.float32, device)
    acc = grad_like((5, 16), torch.float32, device, 1).abs().nan_to_num()
    grad = grad_like((5, 16), torch.float32, device, 2).nan_to_num()
    with with_backend(backend):
        torch.library.opcheck(torch.ops.gradprobe.probe_apply_.default, (w, cand, backup, g0, g1, 1.25))
        torch.library.opcheck(torch.ops.gradprobe.probe_accumulate_.default, (acc, grad))
