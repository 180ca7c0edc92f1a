"""Sparsity allocation (gradprobe/allocation.py): exact budgets, OWL vs a sort-based re-implementation."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from tiny_models import prune_argv, random_batches, save_tiny_checkpoint, tiny_llama

import gradprobe
from gradprobe.allocation import (
    TensorSpec,
    explicit_allocation,
    model_layout,
    owl_allocation,
    owl_from_model,
    report_allocation,
    round_counts,
)
from gradprobe.methods import prune_rows_
from gradprobe.pipeline import dense_norms


@pytest.fixture(scope="module")
def model_and_batches():
    return tiny_llama(num_layers=4, hidden=64, intermediate=96, seed=1), random_batches(4, 32, seed=2)


def _fresh(seed=1):
    return tiny_llama(num_layers=4, hidden=64, intermediate=96, seed=seed)


# ---- oracles written from the definitions -------------------------------------------------------
def sort_lod(scores, m):
    vals = torch.sort(torch.cat([s.reshape(-1) for s in scores])).values.tolist()
    thr = Fraction(m) * sum(map(Fraction, vals)) / len(vals)
    # first position (in ascending order) whose value exceeds thr, by bisection on the sorted list
    lo, hi = 0, len(vals)
    while lo < hi:
        mid = (lo + hi) // 2
        if Fraction(vals[mid]) > thr:
            hi = mid
        else:
            lo = mid + 1
    return (len(vals) - lo) / len(vals)


def sort_round(fractions, sizes, total):
    ideal = [s * n for s, n in zip(fractions, sizes, strict=True)]
    k = [math.floor(x) for x in ideal]
    d = total - sum(k)
    order = sorted(range(len(k)), key=lambda i: (-(ideal[i] - k[i]), i) if d > 0 else (ideal[i] - k[i], i))
    for i in order[: abs(d)]:
        k[i] += 1 if d > 0 else -1
    return k


def published_owl_fractions(lod, target, lam):
    """The OWL code's mapping (luuyin/OWL lib/prune_all.py, llm-compressor), re-implemented with numpy."""
    r = np.array(lod, dtype=np.float64)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    density = r - np.mean(r) + (1 - target)
    return (1 - density).tolist()


def owl_oracle(scores_by_layer, sizes, target, m, lam, mapping="rescaled"):
    lod = [sort_lod(s, m) for s in scores_by_layer]
    if mapping == "published":
        fr = published_owl_fractions(lod, target, lam)
        return lod, fr, sort_round(fr, sizes, math.floor(target * sum(sizes)))
    lo, hi = min(lod), max(lod)
    u = [(d - lo) / (hi - lo) for d in lod]
    ubar = sum(x * n for x, n in zip(u, sizes, strict=True)) / sum(sizes)
    beta = lam / max(abs(x - ubar) for x in u)
    fr = [target - beta * (x - ubar) for x in u]
    return lod, fr, sort_round(fr, sizes, math.floor(target * sum(sizes)))


def row_sort_mask(s, k):
    rows = s.shape[0]
    a, r = divmod(k, rows)
    mask = torch.zeros_like(s, dtype=torch.bool)
    for i in range(rows):
        kk = a + (1 if i < r else 0)
        mask[i, torch.sort(s[i], stable=True).indices[:kk]] = True
    return mask


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_round_counts_exact(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 5000, (9,), generator=g).tolist()
    target = 0.3 + 0.4 * float(torch.rand(1, generator=g))
    dev = (torch.rand(9, generator=g) - 0.5) * 0.2
    w = torch.tensor(sizes, dtype=torch.float64)
    dev = dev.double() - (dev.double() * w).sum() / w.sum()  # size-weighted mean 0
    fr = (target + dev).tolist()
    total = math.floor(target * sum(sizes))
    k = round_counts(fr, sizes, total)
    assert sum(k) == total
    assert k == sort_round(fr, sizes, total)
    assert all(abs(ki - f * n) < 1 + 1e-9 for ki, f, n in zip(k, fr, sizes, strict=True))


def test_prune_rows_equals_sort(model_and_batches):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 33, generator=g)
    norm = torch.rand(33, generator=g)
    for k in (0, 1, 6, 7, 100, 230, 231):
        ww = w.clone()
        mask = prune_rows_(ww, k, norm=norm)
        assert int(mask.sum()) == k
        assert torch.equal(mask, row_sort_mask(w.abs() * norm, k))
        assert torch.equal(ww, w.masked_fill(mask, 0))
    with pytest.raises(ValueError, match="k="):
        prune_rows_(w.clone(), 7 * 33 + 1)


def _tiny_scores(model, norms):
    ad = gradprobe.models.get_adapter(model)
    scores_by_layer, sizes = [], []
    for i, layer in enumerate(ad.decoder_layers(model)):
        lins = ad.prunable_linears(layer)
        scores_by_layer.append([lin.weight.abs().float() * norms[(i, n)] for n, lin in lins.items()])
        sizes.append(sum(lin.weight.numel() for lin in lins.values()))
    return scores_by_layer, sizes


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_owl_default_is_the_published_mapping_with_exact_budget(model_and_batches, target):
    model, batches = model_and_batches
    m, lam = 5.0, 0.08
    alloc = owl_from_model(model, batches, target, m=m, lam=lam)
    assert alloc.method == "owl" and alloc.params["mapping"] == "published"
    scores_by_layer, sizes = _tiny_scores(model, dense_norms(model, batches))
    lod, fr, lcounts = owl_oracle(scores_by_layer, sizes, target, m, lam, mapping="published")
    layers = sorted(alloc.layer_counts())
    assert [alloc.layer_values[i] for i in layers] == lod
    assert len(set(lod)) > 1
    real = [alloc.params["real_sparsity"][i] for i in layers]
    assert real == pytest.approx(fr, abs=1e-12)  # the published layer sparsities
    assert [alloc.layer_counts()[i] for i in layers] == lcounts
    assert all(abs(k - f * n) < 1 for k, f, n in zip(lcounts, fr, sizes, strict=True))
    assert alloc.pruned == math.floor(target * sum(sizes))  # exact budget, in weights
    # the published map spans 2 lambda: the layer with most outliers sits 2 lambda below the one with fewest
    assert max(fr) - min(fr) == pytest.approx(2 * lam)
    order = sorted(range(len(lod)), key=lambda i: lod[i])
    assert [fr[i] for i in order] == sorted(fr, reverse=True)
    # differs from the rescaled mapping (the old default)
    old = owl_allocation(
        model_layout(model),
        {(t.layer, t.name): s for t, s in zip(model_layout(model), sum(scores_by_layer, []), strict=True)},
        target,
        m=m,
        lam=lam,
        mapping="rescaled",
    )
    assert old.method == "owl-rescaled" and old.pruned == alloc.pruned and old.counts != alloc.counts


def test_owl_published_unequal_layers_centre_on_weighted_mean():
    layout = [TensorSpec(i, "mlp.up_proj", r, c) for i, (r, c) in enumerate([(8, 8), (16, 8), (8, 4)])]
    g = torch.Generator().manual_seed(3)
    scores = {(t.layer, t.name): torch.rand(t.rows, t.cols, generator=g) ** (3 + t.layer) for t in layout}
    alloc = owl_allocation(layout, scores, 0.5, m=2.0, lam=0.1)
    lod = [alloc.layer_values[i] for i in range(3)]
    sizes = [t.numel for t in layout]
    pub = published_owl_fractions(lod, 0.5, 0.1)
    shift = 0.5 - sum(f * n for f, n in zip(pub, sizes, strict=True)) / sum(sizes)
    real = [alloc.params["real_sparsity"][i] for i in range(3)]
    # one common shift of the published values
    assert real == pytest.approx([f + shift for f in pub], abs=1e-12)
    assert alloc.pruned == math.floor(0.5 * sum(sizes))
    assert [alloc.layer_counts()[i] for i in range(3)] == sort_round(real, sizes, alloc.pruned)


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_owl_rescaled_equals_sort_oracle_and_hits_budget_exactly(model_and_batches, target):
    model, batches = model_and_batches
    m, lam = 5.0, 0.08
    alloc = owl_from_model(model, batches, target, m=m, lam=lam, mapping="rescaled")
    layers = sorted({t.layer for t in model_layout(model)})
    scores_by_layer, sizes = _tiny_scores(model, dense_norms(model, batches))
    lod, fr, lcounts = owl_oracle(scores_by_layer, sizes, target, m, lam)
    assert [alloc.layer_values[i] for i in layers] == lod
    assert len(set(lod)) > 1  # the random model has distinct outlier ratios: a real test of the map
    assert [alloc.layer_counts()[i] for i in layers] == lcounts
    n_total = sum(sizes)
    assert alloc.pruned == math.floor(target * n_total)  # exact budget, in weights
    for i, f in zip(layers, fr, strict=True):
        assert abs(f - target) <= lam + 1e-12
        assert abs(alloc.layer_sparsity[i] - target) <= lam + 1.0 / sizes[i]
    assert max(abs(f - target) for f in fr) == pytest.approx(lam)
    # more outliers -> lower sparsity
    order = sorted(layers, key=lambda i: lod[i])
    assert [fr[i] for i in order] == sorted(fr, reverse=True)
    # the robust fractions round back to the counts
    for f, (i, k) in zip(alloc.layer_fractions(), sorted(alloc.layer_counts().items()), strict=True):
        assert math.floor(f * sizes[i]) == k


def test_owl_driver_run_prunes_the_plan(model_and_batches, tmp_path):
    model, batches = model_and_batches
    alloc = owl_from_model(model, batches, 0.6)
    pruned_model = _fresh()
    rep = gradprobe.prune(pruned_model, batches, alloc.config(nsamples=4, seqlen=32, progress=False))
    alloc.check(rep)
    assert rep.total_pruned == math.floor(0.6 * rep.total_params)
    for (i, n), k in alloc.counts.items():
        w = pruned_model.model.layers[i].get_submodule(n).weight
        assert int((w == 0).sum()) >= k
    png = alloc.save_plot(tmp_path / "owl.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = alloc.table()
    assert "LOD" in table and table.count("\n| ") == 4 + 1
    g = report_allocation(rep, "owl-run", 0.6)
    assert g.counts == alloc.counts


@pytest.mark.parametrize(
    "target,m,lam,match",
    [
        (0.5, 5.0, 0.5, "lam"),
        (0.5, 5.0, 0.6, "lam"),
        (0.05, 5.0, 0.08, "lam"),
        (0.95, 5.0, 0.08, "lam"),
        (0.5, -1.0, 0.08, "m must be > 0"),
        (0.5, 0.0, 0.08, "m must be > 0"),
        (1.0, 5.0, 0.08, "target"),
        (0.5, float("nan"), 0.08, "m must be"),
        (0.3, 5.0, 0.2, "2 lam"),
    ],
)
def test_owl_bad_inputs_raise(target, m, lam, match):
    layout = [TensorSpec(0, "mlp.up_proj", 4, 4)]
    with pytest.raises(ValueError, match=match):
        owl_allocation(layout, {(0, "mlp.up_proj"): torch.rand(4, 4)}, target, m=m, lam=lam)
    with pytest.raises(ValueError, match="mapping"):
        owl_allocation(layout, {(0, "mlp.up_proj"): torch.rand(4, 4)}, 0.5, mapping="owl")
    # the rescaled mapping moves a layer by at most lam: 0.3 +- 0.2 is allowed there
    owl_allocation(layout, {(0, "mlp.up_proj"): torch.rand(4, 4)}, 0.3, lam=0.2, mapping="rescaled")


LAYOUT = [
    TensorSpec(i, n, r, c)
    for i in range(3)
    for n, r, c in (
        ("self_attn.q_proj", 8, 8),
        ("self_attn.o_proj", 8, 8),
        ("mlp.up_proj", 16, 8),
        ("mlp.down_proj", 8, 16),
    )
]


def test_explicit_kinds_lists_and_mappings():
    a = explicit_allocation(LAYOUT, {"attn": 0.25, "mlp": 0.75, "down_proj": 0.5})
    for t in LAYOUT:
        s = 0.5 if t.name.endswith("down_proj") else (0.25 if t.name.startswith("self_attn") else 0.75)
        assert a.counts[(t.layer, t.name)] == math.floor(s * t.numel)
    b = explicit_allocation(LAYOUT, [0.3, 0.5, 0.7], target=0.5)
    assert b.pruned == math.floor(0.5 * b.numel)
    assert [round(v, 2) for v in b.layer_sparsity.values()] == [0.3, 0.5, 0.7]
    c = explicit_allocation(LAYOUT, {1: 0.9})
    assert c.layer_counts() == {0: 0, 1: math.floor(0.9 * 64) * 2 + math.floor(0.9 * 128) * 2, 2: 0}
    d = explicit_allocation(LAYOUT, 0.37, target=0.37)
    assert d.pruned == math.floor(0.37 * d.numel)


@pytest.mark.parametrize(
    "spec,target,match",
    [
        ([0.3, 0.5], None, "entries"),
        ([0.3, 0.5, 1.0], None, r"\[0, 1\)"),
        ([0.3, -0.1, 0.5], None, r"\[0, 1\)"),
        ({"attn": 0.5}, None, "no value for tensor"),
        ({7: 0.5}, None, "layer indices"),
        ({}, None, "empty"),
        ([0.3, 0.5, 0.7], 0.6, "budget"),
        ({"attn": 0.4, "mlp": 0.6}, 0.5, "budget"),
    ],
)
def test_explicit_that_does_not_fit_raises(spec, target, match):
    with pytest.raises(ValueError, match=match):
        explicit_allocation(LAYOUT, spec, target=target)


def test_global_and_uniform_reports(model_and_batches, tmp_path):
    model, batches = model_and_batches
    for scope in ("row", "global"):
        rep = gradprobe.prune(
            _fresh(),
            batches,
            gradprobe.PruneConfig(sparsity=0.5, scope=scope, nsamples=4, seqlen=32, progress=False),
        )
        alloc = report_allocation(rep, scope, 0.5)
        assert alloc.pruned == rep.total_pruned == math.floor(0.5 * alloc.numel)
        assert alloc.save_plot(tmp_path / f"{scope}.png").stat().st_size > 1000


# ---- CLI: gradprobe prune --allocation ... --------------------------------------------------------
@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("alloc_cli"), num_layers=3)


def _cli(model_dir, text, out, *extra):
    return prune_argv(model_dir, text, out, "--no-eval", *extra)


@pytest.mark.parametrize(
    "extra,budget",
    [
        (["--allocation", "owl", "--sparsity", "0.6", "--owl-lambda", "0.1"], 0.6),
        (["--allocation", "owl-rescaled", "--sparsity", "0.6", "--owl-lambda", "0.1"], 0.6),
        (["--allocation", "variant", "--sparsity", "0.6"], None),
        (["--allocation", "explicit", "--layer-sparsity", "attn=0.3,mlp=0.7"], None),
        (["--allocation", "explicit", "--layer-sparsity", "0.4,0.5,0.6", "--sparsity", "0.5"], 0.5),
    ],
)
def test_cli_allocations(cli_workspace, tmp_path, capsys, extra, budget):
    from gradprobe import cli

    model_dir, text = cli_workspace
    out = tmp_path / "out"
    assert cli.main(_cli(model_dir, text, out, *extra)) == 0
    table = (out / "allocation.md").read_text()
    assert (out / "allocation.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "prune_report.json").read_text())
    total, pruned = report["totals"]["params"], report["totals"]["pruned"]
    if budget is not None:
        assert pruned == math.floor(budget * total)
    assert f"{pruned}/{total}" in table


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--allocation", "owl", "--owl-lambda", "0.5"], "lam"),
        (["--allocation", "owl", "--owl-m", "-1"], "m must be > 0"),
        (["--allocation", "owl", "--method", "magnitude"], "wanda"),
        (["--allocation", "variant", "--variant-tol", "2"], "tol"),
        (["--allocation", "explicit"], "needs --layer-sparsity"),
        (["--allocation", "explicit", "--layer-sparsity", "0.4,x"], "layer-sparsity"),
        (["--layer-sparsity", "0.4"], "needs --allocation explicit"),
        (["--allocation", "owl", "--scope", "global"], "scope row"),
    ],
)
def test_cli_bad_allocation_args_exit_2(cli_workspace, tmp_path, capsys, extra, message):
    from gradprobe import cli

    model_dir, text = cli_workspace
    out = tmp_path / "out"
    assert cli.main(_cli(model_dir, text, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
