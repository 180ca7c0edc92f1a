"""Property test of the *public* API (``gradprobe.prune_mask`` ... ``unpack_24``) on random shapes,
dtypes, tie-heavy values, norms and sparsities, against the stable-sort reference.

The per-op property tests (tests/ops/test_*_select.py) check each backend's torch op on fp32; this one
checks what users call: argument handling, dtype casts, scopes, N:M, in-place variants and the 2:4
packer, all at a small size with the default backend, in CI.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradprobe
from gradprobe.ops import reference as ref
from gradprobe.select import num_pruned
from tests.helpers import assert_masks_equal

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


ROWS, COLS = st.integers(1, 9), st.integers(1, 40)


@st.composite
def weights(draw, rows=ROWS, cols=COLS):
    r, c = draw(rows), draw(cols)
    levels = draw(st.integers(1, 6))  # few distinct values: many ties
    vals = draw(st.lists(st.integers(-levels, levels), min_size=r * c, max_size=r * c))
    w = torch.tensor(vals, dtype=torch.float32).reshape(r, c) * 0.25
    if draw(st.booleans()):  # signed zeros score like zeros
        w = torch.where(w == 0, torch.tensor(-0.0), w)
    return w.to(draw(st.sampled_from(DTYPES)))


@st.composite
def norms_for(draw, cols: int):
    if not draw(st.booleans()):
        return None
    return torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]), min_size=cols, max_size=cols)))


SPARSITY = st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.5, 0.6, 0.75, 0.99])


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_row_and_layer_scope_equal_the_stable_sort(data):
    w = data.draw(weights())
    norm = data.draw(norms_for(w.shape[1]))
    s = data.draw(SPARSITY)
    scores = ref.score(w, norm)
    for scope in ("row", "layer"):
        flat = scores if scope == "row" else scores.reshape(1, -1)
        k = num_pruned(flat.shape[1], s)
        expected = ref.stable_rank_mask(flat, k).reshape(w.shape)
        assert_masks_equal(gradprobe.prune_mask(w, s, norm=norm, scope=scope), expected, f"prune_mask {scope}")
        w2 = w.clone()
        assert_masks_equal(gradprobe.prune_(w2, s, norm=norm, scope=scope), expected, f"prune_ {scope}")
        assert torch.equal(w2, w.masked_fill(expected, 0)), f"prune_ {scope} zeroed other weights"
        value, take, equal = gradprobe.kth_threshold(w, s, norm=norm, scope=scope)
        t, tk, eq = ref.threshold_triple(flat, k)
        if scope == "layer":
            t, tk, eq = t[0], tk[0], eq[0]
        assert torch.equal(value, t) and torch.equal(take, tk) and torch.equal(equal, eq)


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_global_group_equals_the_stable_sort(data):
    n = data.draw(st.integers(1, 4))
    ws = [data.draw(weights(rows=st.integers(1, 5), cols=st.integers(1, 16))) for _ in range(n)]
    use_norm = data.draw(st.booleans())
    ns = [data.draw(norms_for(w.shape[1]).filter(lambda x: x is not None)) for w in ws] if use_norm else None
    s = data.draw(SPARSITY)
    k = num_pruned(sum(w.numel() for w in ws), s)
    expected = ref.global_masks_sorted(ws, ns or [], k)
    for got, want in zip(gradprobe.global_prune_masks(ws, s, norms=ns), expected, strict=True):
        assert_masks_equal(got, want, "global_prune_masks")
    copies = [w.clone() for w in ws]
    for c, w, got, want in zip(copies, ws, gradprobe.global_prune_(copies, s, norms=ns), expected, strict=True):
        assert_masks_equal(got, want, "global_prune_")
        assert torch.equal(c, w.masked_fill(want, 0))
    value, take, _ = gradprobe.kth_threshold(ws, s, norm=ns, scope="global")
    flat = torch.cat([ref.score(w, None if ns is None else n_).reshape(-1) for w, n_ in zip(ws, ns or [None] * n,
                                                                                            strict=True)])
    t, tk, _ = ref.threshold_triple(flat.reshape(1, -1), k)
    assert torch.equal(value.reshape(()), t[0]) and torch.equal(take.reshape(()), tk[0])


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_nm_structure_equals_the_stable_sort(data):
    n, m = data.draw(st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 4)]))
    w = data.draw(weights(cols=st.integers(1, 5).map(lambda g: g * 8)))
    norm = data.draw(norms_for(w.shape[1]))
    expected = ref.nm_rank_mask(ref.score(w, norm), n, m)
    assert_masks_equal(gradprobe.prune_mask(w, None, norm=norm, structure=f"{n}:{m}"), expected, "nm mask")
    w2 = w.clone()
    gradprobe.prune_(w2, n / m, norm=norm, structure=f"{n}:{m}")
    assert torch.equal(w2, w.masked_fill(expected, 0))


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_pack_24_round_trips_and_its_scores_path_prunes_like_the_reference(data):
    fmt = data.draw(st.sampled_from(["bitmask", "cutlass"]))
    if fmt == "cutlass":
        w = data.draw(weights(rows=st.just(32), cols=st.sampled_from([32, 64])).filter(lambda t: t.dtype != torch.float32))
    else:
        w = data.draw(weights(cols=st.integers(1, 6).map(lambda g: g * 4)))
    scores = ref.score(w, data.draw(norms_for(w.shape[1])))
    pruned = w.masked_fill(ref.nm_rank_mask(scores, 2, 4), 0)
    packed = gradprobe.pack_24(pruned, fmt)
    assert torch.equal(gradprobe.unpack_24(packed), pruned.masked_fill(pruned == 0, 0))  # -0.0 may come back 0.0
    with_scores = gradprobe.pack_24(w, fmt, scores=scores)
    for a, b in zip(with_scores, packed, strict=True):
        assert (a == b) if isinstance(a, list) else torch.equal(a, b)
