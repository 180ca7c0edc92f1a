"""Global exact selection (global_threshold / global_mask / global_prune_) on every backend.

One group spans several differently-shaped tensors; its order is (tensor position, flat index).
Masks must equal ``reference.global_masks_sorted`` (concatenate + stable sort) bit for bit, the
triple must equal ``reference.threshold_triple`` of the concatenated scores, exactly k are pruned.
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
GLOBAL_OPS = ("global_threshold", "global_mask", "global_prune_")
GROUP = [(37, 300), (1, 7), (16, 1000), (7, 1)]
INTERPRETER_MAX = 64 * 1000 * 2


_require_global_ops = require_ops_fixture(GLOBAL_OPS)


def group_scores(ws, ns) -> torch.Tensor:
    """(1, total) fp32 concatenated scores in group order."""
    return torch.cat(
        [ref.score(w.cpu(), None if not ns else ns[i].cpu()).reshape(-1) for i, w in enumerate(ws)]
    )[None]


def check_global_ops(backend, device, ws, ns, k) -> list[torch.Tensor]:
    """All three global ops on ``backend`` vs the concatenate-and-sort oracle; returns the masks."""
    ws = [w.to(device) for w in ws]
    ns = [n.to(device) for n in ns]
    if is_interpreted(backend, device) and sum(w.numel() for w in ws) > INTERPRETER_MAX:
        pytest.skip("Triton interpreter: small groups only")
    expected = ref.global_masks_sorted([w.cpu() for w in ws], [n.cpu() for n in ns], k)
    thr_e, take_e, eq_e = ref.threshold_triple(group_scores(ws, ns), k)
    work = [w.clone() for w in ws]
    out = [torch.empty(w.shape, dtype=torch.bool, device=device) for w in ws]
    with with_backend(backend):
        thr, take, eq = torch.ops.gradprobe.global_threshold(ws, ns, k)
        masks = torch.ops.gradprobe.global_mask(ws, ns, thr, take)
        torch.ops.gradprobe.global_prune_(work, out, ns, thr, take)
    assert thr.shape == () and take.shape == () and eq.shape == ()
    assert thr.dtype == torch.float32 and take.dtype == torch.int64 and eq.dtype == torch.int64
    assert torch.equal(thr.cpu(), thr_e[0]), f"threshold {thr.item()} != {thr_e[0].item()}"
    assert take.item() == take_e[0].item() and eq.item() == eq_e[0].item()
    assert len(masks) == len(ws)
    for i, (m, o, e) in enumerate(zip(masks, out, expected, strict=True)):
        assert_masks_equal(m, e, f"global_mask[{i}]")
        assert_masks_equal(o, e, f"global_prune_ masks[{i}]")
        assert torch.equal(work[i].cpu(), ws[i].cpu().masked_fill(e, 0)), (
            f"weights[{i}] not zeroed exactly at its mask"
        )
    assert sum(int(m.sum()) for m in masks) == k
    return masks


def make_group(shapes, dtype, kind="randn"):
    return [make_weight(s, dtype, kind=kind) for s in shapes]


@pytest.mark.parametrize("use_norm", [False, True], ids=["magnitude", "wanda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_global_group_matches_sort_oracle(backend, device, dtype, use_norm):
    ws = make_group(GROUP, dtype)
    ns = [make_norm(s[1]) for s in GROUP] if use_norm else []
    total = sum(w.numel() for w in ws)
    for k in (0, total // 2, total - 1, total) if dtype == torch.float32 else (1, total // 2):
        check_global_ops(backend, device, ws, ns, k)


@pytest.mark.parametrize("norm_kind", [None, "ties"])
@pytest.mark.parametrize("kind", ["ties", "const", "zeros", "signed_zero"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_global_heavy_ties_follow_group_order(backend, device, kind, norm_kind):
    ws = make_group(GROUP, torch.bfloat16, kind=kind)
    ns = [] if norm_kind is None else [make_norm(s[1], kind=norm_kind) for s in GROUP]
    total = sum(w.numel() for w in ws)
    for k in (5000, total - 3):
        check_global_ops(backend, device, ws, ns, k)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_global_tie_cut_inside_a_large_tensor(backend, device):
    """All scores equal across > 2^16-element tensors: the cut lands mid-tensor, far from its start."""
    ws = [
        make_weight((300, 1000), torch.float32, kind="const"),
        make_weight((17, 4097), torch.float32, kind="const"),
    ]
    for k in (100_001, 300_000 + 40_000):
        check_global_ops(backend, device, ws, [], k)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_global_already_pruned(backend, device):
    """Half of the group is an exact tie at 0 (a re-pruned model), spread over several chunks."""
    ws = [make_weight((300, 1000), torch.bfloat16), make_weight((40, 777), torch.bfloat16)]
    for w in ws:
        w[:, ::2] = 0
    zeros = sum(int((w == 0).sum()) for w in ws)
    for k in (zeros - 1, zeros, zeros + 1):
        check_global_ops(backend, device, ws, [], k)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_global_mixed_dtypes(backend, device):
    shapes = [(37, 300), (64, 1000), (3, 4097)]
    ws = [make_weight(s, d, kind="ties") for s, d in zip(shapes, DTYPES, strict=True)]
    ns = [make_norm(s[1], kind="ties") for s in shapes]
    total = sum(w.numel() for w in ws)
    check_global_ops(backend, device, ws, ns, math.floor(0.7 * total))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_global_group_with_empty_tensors(backend, device):
    ws = [
        make_weight((0, 5)),
        make_weight((3, 4), kind="ties"),
        make_weight((5, 0)),
        make_weight((2, 9), kind="ties"),
    ]
    for k in (0, 6, 30):
        check_global_ops(backend, device, ws, [], k)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.999, "1-1/n"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_global_public_api(backend, device, sparsity):
    ws = [w.to(device) for w in make_group(GROUP, torch.float32)]
    ns = [make_norm(s[1]).to(device) for s in GROUP]
    total = sum(w.numel() for w in ws)
    s = 1 - 1 / total if sparsity == "1-1/n" else sparsity
    k = math.floor(s * total)
    expected = ref.global_masks_sorted([w.cpu() for w in ws], [n.cpu() for n in ns], k)
    work = [w.clone() for w in ws]
    with with_backend(backend):
        masks = gradprobe.global_prune_masks(ws, s, norms=ns)
        masks2 = gradprobe.global_prune_(work, s, norms=ns)
        thr = gradprobe.kth_threshold(ws, s, norm=ns, scope="global")
    assert sum(int(m.sum()) for m in masks) == k
    for i in range(len(ws)):
        assert_masks_equal(masks[i], expected[i], f"masks[{i}]")
        assert_masks_equal(masks2[i], expected[i], f"global_prune_ masks[{i}]")
        assert torch.equal(work[i].cpu(), ws[i].cpu().masked_fill(expected[i], 0))
    thr_e, take_e, eq_e = ref.threshold_triple(group_scores(ws, ns), k)
    assert torch.equal(thr.value.cpu(), thr_e[0]) and thr.take.item() == take_e[0].item()
    assert thr.equal.item() == eq_e[0].item()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_layer_scope_is_a_one_tensor_group(backend, device):
    w = make_weight((64, 1000), torch.bfloat16, kind="ties").to(device)
    norm = make_norm(1000, kind="ties").to(device)
    k = math.floor(0.5 * w.numel())
    expected = ref.global_masks_sorted([w.cpu()], [norm.cpu()], k)[0]
    w2 = w.clone()
    with with_backend(backend):
        mask = gradprobe.prune_mask(w, 0.5, norm=norm, scope="layer")
        mask2 = gradprobe.prune_(w2, 0.5, norm=norm, scope="layer")
        thr = gradprobe.kth_threshold(w, 0.5, norm=norm, scope="layer")
    assert_masks_equal(mask, expected)
    assert_masks_equal(mask2, expected)
    assert torch.equal(w2.cpu(), w.cpu().masked_fill(expected, 0))
    assert thr.value.shape == () and int(mask.sum()) == k


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "reference"])
def test_global_real_llama_layer_group(backend, device):
    """One Llama-7B decoder layer's MLP + attention output as a bf16 group with norms."""
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    if is_interpreted(backend, device):
        pytest.skip("Triton interpreter: small groups only")
    ws = make_group(shapes, torch.bfloat16)
    ns = [make_norm(s[1]) for s in shapes]
    total = sum(w.numel() for w in ws)
    k = math.floor(0.5 * total)
    with with_backend(backend):
        thr, take, _ = torch.ops.gradprobe.global_threshold(
            [w.to(device) for w in ws], [n.to(device) for n in ns], k
        )
        masks = torch.ops.gradprobe.global_mask(
            [w.to(device) for w in ws], [n.to(device) for n in ns], thr, take
        )
    expected = ref.global_masks_sorted(ws, ns, k)
    for i in range(len(ws)):
        assert_masks_equal(masks[i], expected[i], f"masks[{i}]")


@st.composite
def tie_heavy_groups(draw):
    ntensors = draw(st.integers(1, 3))
    ws, ns = [], []
    for _ in range(ntensors):
        r, c = draw(st.integers(1, 4)), draw(st.integers(1, 12))
        vals = draw(st.lists(st.integers(-3, 3), min_size=r * c, max_size=r * c))
        ws.append(torch.tensor(vals, dtype=torch.float32).reshape(r, c) * 0.5)
        ns.append(torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=c, max_size=c))))
    total = sum(w.numel() for w in ws)
    k = draw(st.integers(0, total))
    return ws, (ns if draw(st.booleans()) else []), k


@pytest.mark.parametrize("backend,device", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=tie_heavy_groups())
def test_global_property_count_and_tie_rule(backend, device, case):
    ws, ns, k = case
    with with_backend(backend):
        thr, take, _ = torch.ops.gradprobe.global_threshold(
            [w.to(device) for w in ws], [n.to(device) for n in ns], k
        )
        masks = torch.ops.gradprobe.global_mask(
            [w.to(device) for w in ws], [n.to(device) for n in ns], thr, take
        )
    flat_mask = torch.cat([m.cpu().reshape(-1) for m in masks])
    s = group_scores(ws, ns)[0]
    assert int(flat_mask.sum()) == k
    pruned, kept = s[flat_mask], s[~flat_mask]
    if pruned.numel() and kept.numel():
        assert pruned.max() <= kept.min(), "a kept score is smaller than a pruned one"
        ties = flat_mask[s == pruned.max()]
        # in group order, the pruned ties come before the kept ones
        assert torch.equal(ties, torch.sort(ties.int(), descending=True, stable=True).values.bool())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_global_opcheck(backend, device):
    ws = [
        make_weight((5, 33), torch.float32, kind="ties").to(device),
        make_weight((3, 8), torch.bfloat16).to(device),
    ]
    ns = [make_norm(33).to(device), make_norm(8).to(device)]
    with with_backend(backend):
        for norms, k in ((ns, 70), ([], 0)):
            thr, take, _ = torch.ops.gradprobe.global_threshold(ws, norms, k)
            torch.library.opcheck(
                torch.ops.gradprobe.global_threshold.default, ([w.clone() for w in ws], norms, k)
            )
            torch.library.opcheck(torch.ops.gradprobe.global_mask.default, (ws, norms, thr, take))
            masks = [torch.empty(w.shape, dtype=torch.bool, device=device) for w in ws]
            torch.library.opcheck(
                torch.ops.gradprobe.global_prune_.default, ([w.clone() for w in ws], masks, norms, thr, take)
            )




@requires_cpp
def test_cpp_baseline_isa_path_is_exact(monkeypatch):
    """The C++ ops pick AVX2 code at run time; the baseline (non-AVX2) path must be exact too
    (GRADPROBE_CPP_DISABLE_AVX2 is read on every op call)."""
    monkeypatch.setenv("GRADPROBE_CPP_DISABLE_AVX2", "1")
    _extension.load()
    cpp = torch.ops.gradprobe_cpp
    torch.manual_seed(0)
    groups = [([torch.randn(37, 300), torch.randn(70, 1000).bfloat16()], [torch.rand(300), torch.rand(1000)]),
              ([torch.full((300, 1000), 0.25), torch.randint(-2, 3, (9, 4097)).half()], [])]
    for ws, ns in groups:
        total = sum(w.numel() for w in ws)
        for k in (0, 1, min(100_001, total - 7), total // 2, total):
            thr, take, eq = cpp.global_threshold(ws, ns, k)
            exp = ref.global_threshold(ws, ns, k)
            assert torch.equal(thr, exp[0]) and take == exp[1] and eq == exp[2], k
            for m, e in zip(cpp.global_mask(ws, ns, thr, take), ref.global_masks_sorted(ws, ns, k), strict=True):
                assert torch.equal(m, e), k


# ---- the C++ sampled-bracket path (one read of the weights) and its fallbacks --------------------
# gradprobe_cpp.global_select_path_counts() counts, process-wide, how often each path decided:
# [bracket, buffer overflow -> histograms, bracket missed -> histograms, histogram passes].
BRACKET, OVERFLOW, MISS, HISTOGRAMS = range(4)
BRACKET_GROUP = [(120, 1000), (64, 777), (5, 4099), (1, 3)]


def _paths_delta(fn):
    cpp = torch.ops.gradprobe_cpp
    before = list(cpp.global_select_path_counts())
    out = fn()
    return out, [a - b for a, b in zip(cpp.global_select_path_counts(), before, strict=True)]


def check_cpp_paths(ws, ns, k, expect_path):
    """global_threshold and the fused global_masks on the C++ backend vs the sort oracle; each call
    must have been decided by ``expect_path`` (checked through the path counters)."""
    cpp = torch.ops.gradprobe_cpp
    expected = ref.global_masks_sorted(ws, ns, k)
    thr_e, take_e, eq_e = ref.threshold_triple(group_scores(ws, ns), k)
    (thr, take, eq), d1 = _paths_delta(lambda: cpp.global_threshold(ws, ns, k))
    masks, d2 = _paths_delta(lambda: cpp.global_masks(ws, ns, k))
    assert torch.equal(thr, thr_e[0]) and take.item() == take_e[0].item() and eq.item() == eq_e[0].item(), k
    for i, (m, e) in enumerate(zip(masks, expected, strict=True)):
        assert_masks_equal(m, e, f"global_masks[{i}] (k={k})")
    assert sum(int(m.sum()) for m in masks) == k
    for d in (d1, d2):
        assert d[expect_path] == 1, f"k={k}: expected path {expect_path}, counters moved by {d}"
        if expect_path in (OVERFLOW, MISS):
            assert d[HISTOGRAMS] == 1, d
    return masks


# every dtype x score with the AVX2 loops; the portable loops (GRADPROBE_CPP_DISABLE_AVX2=1) on two
BRACKET_CASES = [(d, n, True) for d in DTYPES for n in (False, True)] + [
    (torch.float32, True, False),
    (torch.bfloat16, False, False),
]


@requires_cpp
@pytest.mark.parametrize(
    "dtype,use_norm,avx2",
    BRACKET_CASES,
    ids=[f"{dtype_id(d)}-{'wanda' if n else 'magnitude'}-{'avx2' if a else 'portable'}" for d, n, a in BRACKET_CASES],
)
def test_cpp_bracket_path_is_exact(monkeypatch, dtype, use_norm, avx2):
    """Random groups: the sample brackets the k-th score, one pass decides; masks equal the oracle."""
    if not avx2:
        monkeypatch.setenv("GRADPROBE_CPP_DISABLE_AVX2", "1")
    _extension.load()
    torch.manual_seed(1)
    ws = make_group(BRACKET_GROUP, dtype)
    ns = [make_norm(s[1]) for s in BRACKET_GROUP] if use_norm else []
    total = sum(w.numel() for w in ws)
    for k in (1, total // 2, total - 1000):
        # bf16 / fp16 magnitudes tie in classes of ~0.2 % of the group: the tie cut lands in a class
        check_cpp_paths(ws, ns, k, BRACKET)


@requires_cpp
def test_cpp_bracket_tie_cut_inside_the_buffer():
    """A tie class of ~100 equal scores straddles rank k: take < equal, resolved in group order
    from the candidate buffer (tensor position, then flat index)."""
    torch.manual_seed(2)
    ws = [(torch.randn(s) * 1000).round() / 1000 for s in BRACKET_GROUP]
    total = sum(w.numel() for w in ws)
    scores = group_scores(ws, [])[0]
    for k in (total // 3, total // 2 + 7):
        _, take, eq = ref.threshold_triple(scores[None], k)
        assert 0 < take.item() < eq.item()  # the cut is inside a tie class
        check_cpp_paths(ws, [], k, BRACKET)


@requires_cpp
@pytest.mark.parametrize("cap", ["0", "1", "5000"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cpp_bracket_overflow_falls_back(monkeypatch, dtype, cap):
    """A candidate buffer too small (cap 0 skips the bracket; 1 and 5000 overflow mid-pass, after some
    masks were written) falls back to the histogram passes; the masks are rewritten exactly."""
    monkeypatch.setenv("GRADPROBE_CPP_GLOBAL_MAX_CANDIDATES", cap)
    torch.manual_seed(3)
    ws = make_group(BRACKET_GROUP, dtype)
    ns = [make_norm(s[1]) for s in BRACKET_GROUP]
    total = sum(w.numel() for w in ws)
    for k in (total // 4, total // 2):
        check_cpp_paths(ws, ns, k, HISTOGRAMS if cap == "0" else OVERFLOW)


@requires_cpp
def test_cpp_heavy_ties_overflow_the_buffer():
    """Half the group is an exact tie at 0 (an already-pruned model) and k cuts it: every zero is a
    candidate, more than the default cap, so the histogram passes decide."""
    ws = [torch.randn(300, 1000), torch.randn(40, 777)]
    for w in ws:
        w[:, ::2] = 0
    zeros = sum(int((w == 0).sum()) for w in ws)
    check_cpp_paths(ws, [], zeros - 100, OVERFLOW)


@requires_cpp
@pytest.mark.parametrize("high", [True, False], ids=["sample-too-high", "sample-too-low"])
def test_cpp_bracket_miss_falls_back(high):
    """Adversarial layout: the sampled positions (the first 64 of every 251 * 64 elements of a tensor)
    hold outliers, so the bracket drawn from the sample misses rank k and the histogram passes decide."""
    torch.manual_seed(4)
    w = torch.rand(1, 251 * 64 * 20) + 1.0
    sampled = torch.arange(w.numel()) % (251 * 64) < 64
    w[0, sampled] = torch.rand(64 * 20) * (100.0 if high else 0.01)
    k = w.numel() // 2
    check_cpp_paths([w], [], k, MISS)


@requires_cpp
@pytest.mark.parametrize("cap", [None, "1"], ids=["bracket", "overflow"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_cpp_bracket_rejects_nonfinite_before_writing(monkeypatch, bad, cap):
    """NaN / Inf anywhere raise ValueError from the fused op and the public API; in-place pruning
    leaves the weights untouched."""
    if cap is not None:
        monkeypatch.setenv("GRADPROBE_CPP_GLOBAL_MAX_CANDIDATES", cap)
    ws = make_group(BRACKET_GROUP, torch.float32)
    ws[0][100, 999] = bad
    before = [w.clone() for w in ws]
    with pytest.raises(ValueError, match=r"weights\[0\] contains NaN or Inf"):
        torch.ops.gradprobe_cpp.global_masks(ws, [], 1000)
    with pytest.raises(ValueError, match=r"weights\[0\] contains NaN or Inf"):
        torch.ops.gradprobe_cpp.global_threshold(ws, [], 1000)
    with with_backend("cpp"), pytest.raises(ValueError, match="NaN or Inf"):
        gradprobe.global_prune_masks(ws, 0.5)
    with with_backend("cpp"), pytest.raises(ValueError, match="NaN or Inf"):
        gradprobe.global_prune_(ws, 0.5)
    for w, b in zip(ws, before, strict=True):
        assert torch.equal(w.view(torch.int32), b.view(torch.int32))  # bit for bit (NaN != NaN)


@requires_cpp
def test_cpp_global_masks_opcheck_and_public_api_uses_it():
    ws = [make_weight((5, 33), torch.float32, kind="ties"), make_weight((300, 1000), torch.bfloat16)]
    ns = [make_norm(33), make_norm(1000)]
    with with_backend("cpp"):
        for norms, k in ((ns, 70), ([], 0), ([], 150_000)):
            torch.library.opcheck(torch.ops.gradprobe.global_masks.default, (ws, norms, k))
        masks, d = _paths_delta(lambda: gradprobe.global_prune_masks(ws, 0.5, norms=ns))
    assert d[BRACKET] == 1  # one fused call (global_threshold would count a second)
    k = math.floor(0.5 * sum(w.numel() for w in ws))
    for m, e in zip(masks, ref.global_masks_sorted(ws, ns, k), strict=True):
        assert_masks_equal(m, e)


# ---- Triton kernels: the streaming histogram pass and the global radix select ----------------------
# On a CPU-only machine these run under TRITON_INTERPRET=1 (tests/conftest.py) on tiny shapes; on a GPU
# machine on CUDA, plus the gpu-marked real Llama layer.

TRITON = backend_params(("triton",))


@pytest.fixture
def kernels(backend, device):
    """The gradprobe.kernels package (its import registers the triton backend)."""
    import gradprobe.kernels as k

    return k


def run_histogram(kernels, w, norm, prefix: int, shift: int, bits: int):
    gs = kernels.global_select
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=w.device)
    state = torch.tensor([prefix, 1], dtype=torch.int64, device=w.device)
    bad = torch.zeros(1, dtype=torch.int64, device=w.device)
    n_cols, block, warps, tpr, n_tiles = kernels._radix.tiling(w)
    grid = min(n_tiles, kernels._configs.max_programs(w.device))
    gs._global_histogram_kernel[(grid,)](
        w, norm if norm is not None else w, hist, state, bad, n_cols, tpr, n_tiles,
        HAS_NORM=norm is not None, SHIFT=shift, BITS=bits, BLOCK=block, num_warps=warps,
    )
    return hist.cpu(), int(bad)


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_histogram_pass_matches_bincount(kernels, backend, device):
    w = make_weight((23, 301), torch.bfloat16, kind="ties")  # few distinct scores: crowded bins
    norm = make_norm(301, kind="ties")
    key = order_key(ref.score(w, norm)).reshape(-1)
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
def test_triton_histogram_pass_matches_histc_and_counts_nonfinite(kernels, backend, device):
    w = make_weight((7, 1000), torch.float32)
    w[2, 5], w[6, 999] = float("nan"), float("-inf")
    hist, bad = run_histogram(kernels, w.to(device), None, 0, 21, 11)
    key = order_key(ref.score(w)).reshape(-1)  # NaN/Inf scores key above every finite one
    expected = torch.histc((key >> 21).double(), bins=2048, min=0, max=2048).to(torch.int64)
    assert torch.equal(hist, expected) and bad == 2
    assert int(hist[: 0xFF800000 >> 21].sum()) == w.numel() - 2


def check_triton_global(device, ws, ns, k):
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
def test_triton_global_group_of_three(backend, device):
    shapes, dtypes = [(37, 300), (1, 7), (20, 513)], [torch.float32, torch.float16, torch.bfloat16]
    ws = [make_weight(s, d, kind="ties") for s, d in zip(shapes, dtypes, strict=True)]
    ns = [make_norm(s[1], kind="ties") for s in shapes]
    total = sum(w.numel() for w in ws)
    for k in (1, total // 3, total - 1, total):
        check_triton_global(device, ws, ns, k)
    check_triton_global(device, [make_weight(s, torch.float32) for s in shapes], [], total // 2)


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_global_tie_cut_spans_chunks(backend, device):
    """All scores equal: the pruned ties are a prefix of group order, cut inside a later chunk."""
    ws = [make_weight((40, 700), torch.float32, kind="const"), make_weight((3, 50), torch.float32, kind="const")]
    for k in (1, 13_337, 28_000 + 17):
        check_triton_global(device, ws, [], k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_global_nonfinite_raises_and_writes_nothing(backend, device, bad):
    w = make_weight((6, 100), torch.bfloat16).to(device)
    w[4, 17] = bad
    before = w.clone()
    other = make_weight((3, 40), torch.float32).to(device)
    other_before = other.clone()
    outs = [torch.zeros(t.shape, dtype=torch.bool, device=device) for t in (other, w)]
    thr, take = torch.tensor(0.5, device=device), torch.tensor(3, device=device)
    with with_backend("triton"):
        for call in (
            lambda: torch.ops.gradprobe.global_threshold([other, w], [], 70),
            lambda: torch.ops.gradprobe.global_prune_([other, w], outs, [], thr, take),
        ):
            with pytest.raises(ValueError, match="NaN or Inf"):
                call()
    assert torch.equal(w.cpu().view(torch.int16), before.cpu().view(torch.int16)), "W was modified"
    assert torch.equal(other, other_before) and not any(o.any() for o in outs), "a write happened before the raise"


# ---- real Llama shapes (CUDA only) --------------------------------------------------------------


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
