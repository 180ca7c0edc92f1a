"""Every benchmark baseline (bench/baselines.py) agrees with the semantic reference (gradprobe.ops.reference).

Masks must be equal where the baseline has a defined tie rule (stable sorts) or where scores are
distinct; otherwise its threshold must equal the reference's k-th value and its count/containment
must match what its documented tie rule promises.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import pytest
import torch

from gradprobe.ops import reference as ref
from tests.helpers import DTYPES, assert_masks_equal, dtype_id, make_norm, make_weight

_spec = importlib.util.spec_from_file_location(
    "bench_baselines", pathlib.Path(__file__).resolve().parents[1] / "bench" / "baselines.py"
)
bl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bl)

SHAPE = (6, 256)


def distinct_weight(shape, dtype=torch.float32) -> torch.Tensor:
    """Weights whose |W| are all distinct (a random permutation of 1..n, random signs)."""
    n = shape[0] * shape[1]
    vals = (torch.randperm(n) + 1).float() / n * 2.0
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    w = (vals * sign).reshape(shape).to(dtype)
    assert torch.unique(w.abs().float()).numel() == n, "test data must have distinct magnitudes"
    return w


def ref_layer_mask(w, norm, k):
    return ref.global_masks_sorted([w], [] if norm is None else [norm], k)[0]


@pytest.mark.parametrize("k", [0, 1, 77, 128, 255, 256])
def test_all_masks_equal_reference_on_distinct_scores(k):
    w = distinct_weight(SHAPE)
    expected = ref.row_mask(w, None, k)
    assert int(expected.sum()) == k * SHAPE[0]
    assert_masks_equal(bl.row_sort_mask(w, None, k), expected, "row_sort_mask")
    assert_masks_equal(bl.row_topk_mask(w, None, k), expected, "row_topk_mask")
    assert_masks_equal(bl.row_kthvalue_mask(w, None, k), expected, "row_kthvalue_mask")
    kl = k * SHAPE[0] // 2
    assert_masks_equal(bl.flat_kthvalue_mask(w, None, kl), ref_layer_mask(w, None, kl), "flat_kthvalue_mask")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("with_norm", [False, True], ids=["magnitude", "wanda"])
def test_row_baselines_vs_reference(dtype, kind, with_norm):
    w = make_weight(SHAPE, dtype, kind)
    norm = make_norm(SHAPE[1], "ties" if kind == "ties" else "rand") if with_norm else None
    k = 128
    s = ref.score(w, norm)
    expected = ref.row_mask(w, norm, k)
    thr, take, equal = ref.row_threshold(w, norm, k)

    # stable sort + scatter: same tie rule, masks equal bit for bit
    assert_masks_equal(bl.row_sort_mask(w, norm, k), expected, "row_sort_mask")

    # topk: exact count, contains every score below the threshold, threshold equal
    topk = bl.row_topk_mask(w, norm, k)
    assert torch.equal(topk.sum(1), torch.full((SHAPE[0],), k))
    assert bool((topk | ~(s < thr[:, None])).all()), "topk misses a score below the k-th value"
    assert bool((~topk | (s <= thr[:, None])).all()), "topk prunes a score above the k-th value"
    assert torch.equal(bl.row_topk_threshold(w, norm, k), thr)

    # kthvalue: threshold equal; mask = every score <= threshold (over-prunes exactly the untaken ties)
    assert torch.equal(bl.row_kthvalue_threshold(w, norm, k), thr)
    kv = bl.row_kthvalue_mask(w, norm, k)
    assert torch.equal(kv.sum(1), k - take + equal)
    assert bool((kv | ~expected).all()), "kthvalue mask must contain the reference mask"


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=lambda nm: f"nm={nm[0]}:{nm[1]}")
def test_nm_baselines_equal_reference(nm):
    w = make_weight((16, 64), torch.float32)  # distinct scores: topk's tie order does not matter
    norm = make_norm(64)
    expected = ref.nm_rank_mask(ref.score(w, norm), *nm)
    assert_masks_equal(bl.nm_wanda_loop_mask(w, norm, *nm), expected, "reference vs Wanda loop")
    assert_masks_equal(bl.nm_topk_mask(w, norm, *nm), expected, "reference vs vectorised topk")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_block_sort_equals_reference_on_blocks(dtype, kind):
    w = make_weight((5, 3 * bl.BLOCK), dtype, kind)
    norm = make_norm(w.shape[1])
    k_block = 64
    got = bl.row_block_sort_mask(w, norm, k_block)
    # the same op as the reference row op with every BLOCK consecutive columns of a row as one row
    expected = ref.stable_rank_mask(ref.score(w, norm).reshape(-1, bl.BLOCK), k_block)
    assert_masks_equal(got, expected.reshape(w.shape), "row_block_sort_mask")
    assert torch.equal(got.reshape(-1, bl.BLOCK).sum(1), torch.full((w.numel() // bl.BLOCK,), k_block))


def test_block_sort_rejects_ragged_width():
    with pytest.raises(ValueError, match="multiple of block"):
        bl.row_block_sort_mask(torch.ones(2, 100), None, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_flat_and_global_kthvalue_thresholds_equal_reference(dtype, kind):
    shapes = [(7, 33), (16, 64), (3, 128)]
    ws = [make_weight(s, dtype, kind) for s in shapes]
    ns = [make_norm(s[1], "ties" if kind == "ties" else "rand") for s in shapes]
    total = sum(w.numel() for w in ws)
    for k in (1, total // 2, total):
        thr, take, equal = ref.global_threshold(ws, ns, k)
        assert torch.equal(bl.global_concat_kthvalue_threshold(ws, ns, k), thr)
        masks = bl.global_concat_kthvalue_masks(ws, ns, k)
        expected = ref.global_masks_sorted(ws, ns, k)
        assert sum(int(m.sum()) for m in masks) == k - int(take) + int(equal)
        for m, e in zip(masks, expected, strict=True):
            assert bool((m | ~e).all()), "threshold mask must contain the reference mask"
        t1, _, _ = ref.global_threshold(ws[1:2], ns[1:2], min(k, ws[1].numel()))
        assert torch.equal(bl.flat_kthvalue_threshold(ws[1], ns[1], min(k, ws[1].numel())), t1)


def test_global_masks_equal_reference_on_distinct_scores():
    w2 = distinct_weight((9, 20))
    ws = [distinct_weight((4, 50)), torch.sign(w2) * (w2.abs() + 3.0)]  # magnitudes disjoint from the first
    scores = torch.cat([w.abs().reshape(-1) for w in ws])
    assert torch.unique(scores).numel() == scores.numel()
    k = 230  # spans both tensors (the first holds 200 scores, all smaller)
    for got, e in zip(
        bl.global_concat_kthvalue_masks(ws, None, k), ref.global_masks_sorted(ws, [], k), strict=True
    ):
        assert_masks_equal(got, e, "global_concat_kthvalue_masks")
    assert all(not m.any() for m in bl.global_concat_kthvalue_masks(ws, None, 0))


def test_sum_pass_reads_the_weight():
    w = make_weight((4, 9))
    assert torch.equal(bl.sum_pass(w), w.sum())


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(
        name, pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    )
    if name in sys.modules:  # the bench scripts import their helpers by plain name
        return sys.modules[name]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_bench_global_verifier_accepts_reference_and_rejects_wrong_masks(kind):
    """The streaming check the global benchmark runs before timing must accept exactly the reference masks."""
    verify = _load_bench("bench_global_select").verify_global_masks
    ws = [make_weight(s, torch.bfloat16, kind) for s in [(5, 40), (8, 16), (3, 64)]]
    ns = [make_norm(w.shape[1], "ties") for w in ws]
    k = sum(w.numel() for w in ws) // 2
    thr, take, equal = ref.global_threshold(ws, ns, k)
    good = ref.global_masks_sorted(ws, ns, k)
    verify(ws, ns, good, k, thr, take)

    flat = torch.cat([m.reshape(-1) for m in good])
    scores = torch.cat([ref.score(w, n).reshape(-1) for w, n in zip(ws, ns, strict=True)])
    kept = (~flat).nonzero().flatten()
    pruned = flat.nonzero().flatten()
    bad_variants = []
    extra = flat.clone()
    extra[kept[0]] = True  # one too many
    bad_variants.append(extra)
    swap = flat.clone()  # prune the largest kept score instead of a pruned one: count right, set wrong
    swap[kept[scores[kept].argmax()]] = True
    swap[pruned[0]] = False
    bad_variants.append(swap)
    if int(equal) > int(take):  # ties: prune a later tie instead of the first -> tie order violated
        tie_idx = (scores == thr).nonzero().flatten()
        order = flat.clone()
        order[tie_idx[0]] = False
        order[tie_idx[int(take)]] = True
        bad_variants.append(order)
    elif kind == "ties":
        pytest.fail("tie-heavy data should leave untaken ties at the threshold")
    sizes = [w.numel() for w in ws]
    for bad in bad_variants:
        masks = [m.reshape(w.shape) for m, w in zip(torch.split(bad, sizes), ws, strict=True)]
        with pytest.raises(AssertionError):
            verify(ws, ns, masks, k, thr, take)


def test_bench_harness_checks_time_and_csv(tmp_path):
    """The shared harness must catch a one-bit mask difference before timing and write complete CSV rows."""
    H = _load_bench("_harness")
    m = torch.zeros(3, 5, dtype=torch.bool)
    H.check_masks_equal([m], [m.clone()])
    flipped = m.clone()
    flipped[2, 4] = True
    with pytest.raises(AssertionError, match=r"1 of 15 entries differ, first at \[\[2, 4\]\]"):
        H.check_masks_equal(flipped, m)
    with pytest.raises(AssertionError, match="differs"):
        H.check_equal(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))

    calls = []
    t = H.time_fn(lambda: calls.append(1), "cpu", warmup=2, budget_s=0.01, min_reps=4)
    assert t.reps >= 4 and len(calls) == t.reps + 2 and 0 <= t.p20_ms <= t.median_ms <= t.p80_ms
    slow = H.time_fn(lambda: time.sleep(0.03), "cpu", warmup=0, budget_s=0.01, min_reps=5)
    assert slow.reps == 1 and slow.median_ms >= 30  # one call past twice the budget ends the loop

    b = H.Bench("unit", "cpu", copy_bytes=2**20)
    assert b.copy_bw > 0
    with pytest.raises(AssertionError):  # a failing check aborts before any timing row is recorded
        b.run(
            "bad",
            lambda: None,
            problem="p",
            dtype=torch.float32,
            nbytes=1,
            check=lambda: H.check_masks_equal(flipped, m),
        )
    assert b.rows == []
    b.run("a", lambda: None, problem="p", dtype=torch.float32, nbytes=10, budget_s=0.01)
    b.run("b", lambda: None, problem="p", dtype=torch.bfloat16, nbytes=10, budget_s=0.01)
    assert "speedup vs a" in b.table(vs="a")
    path = b.save_csv(tmp_path / "unit.csv")
    import csv

    rows = list(csv.DictReader(path.open()))
    assert [r["kernel_provider"] for r in rows] == ["a", "b"] and rows[1]["dtype"] == "bf16"
    assert set(rows[0]) == set(H.CSV_FIELDS) and all(
        rows[0][f] != "" for f in ("machine", "torch_version", "timestamp")
    )
