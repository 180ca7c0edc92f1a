"""The plan (one Target per tensor, fixed before the loop) and the selector protocol of the pipeline."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_batches, tiny_llama

import gradprobe
from gradprobe.allocation import explicit_allocation, model_layout
from gradprobe.methods import ScoreSelector
from gradprobe.plan import Target, build_plan


def _groups(model):
    ad = gradprobe.models.get_adapter(model)
    return {i: ad.prunable_linears(layer) for i, layer in enumerate(ad.decoder_layers(model))}


@pytest.mark.parametrize(
    "config",
    [
        gradprobe.PruneConfig(method="magnitude", sparsity=0.5),
        gradprobe.PruneConfig(method="magnitude", sparsity=0.6, scope="layer"),
        gradprobe.PruneConfig(method="magnitude", sparsity=[0.1, 0.3]),
        gradprobe.PruneConfig(method="magnitude", structure="2:4"),
    ],
    ids=["row", "layer", "per-layer", "2:4"],
)
def test_plan_counts_are_what_the_run_prunes(config):
    model = tiny_llama(num_layers=2)
    plan = build_plan(config, _groups(model), 2)
    rep = gradprobe.prune(model, None, config.replace(progress=False))
    for r in rep.rows:
        assert r.pruned == plan[(r.layer, r.name)].num_pruned(r.shape)


def test_allocation_is_consumed_as_counts():
    model = tiny_llama(num_layers=2)
    alloc = explicit_allocation(model_layout(model), {"attn": 0.3, "mlp": 0.55})
    plan = build_plan(alloc.config(method="magnitude"), _groups(model), 2)
    assert all(t.count == alloc.counts[k] for k, t in plan.items())
    rep = gradprobe.prune(model, None, alloc.config(method="magnitude", progress=False))
    assert {(r.layer, r.name): r.pruned for r in rep.rows} == alloc.counts


def test_plan_rejects_bad_specifications_before_anything_runs():
    model = tiny_llama(num_layers=2)
    with pytest.raises(ValueError, match="has 3 entries but the model has 2 decoder layers"):
        build_plan(gradprobe.PruneConfig(sparsity=[0.1, 0.2, 0.3]), _groups(model), 2)
    with pytest.raises(TypeError, match="PruneConfig.allocation must be"):
        gradprobe.PruneConfig(allocation=object())
    alloc = explicit_allocation(model_layout(model), 0.5)
    with pytest.raises(ValueError, match="cannot be combined with an N:M structure"):
        gradprobe.PruneConfig(allocation=alloc, structure="2:4")


class FirstColumns:
    """A custom method: prune the first k columns of every row (k from the target); records its calls."""

    needs = "norms"

    def __init__(self):
        self.calls = []

    def select_(self, layer_idx, linears, stats, targets):
        self.calls.append((layer_idx, sorted(linears), sorted(stats)))
        out = {}
        for name, lin in linears.items():
            k = int(targets[name].fraction * lin.in_features)
            mask = torch.zeros_like(lin.weight, dtype=torch.bool)
            mask[:, :k] = True
            lin.weight.data[mask] = 0
            out[name] = mask
        return out


def test_a_custom_selector_plugs_into_the_pipeline():
    model = tiny_llama(num_layers=2)
    sel = FirstColumns()
    rep = gradprobe.prune(model, random_batches(2, 16), sparsity=0.25, selector=sel, nsamples=2, seqlen=16,
                          progress=False)
    assert [c[0] for c in sel.calls] == [0, 1]
    assert all(c[1] == c[2] for c in sel.calls)  # statistics of every linear, as needs="norms" asks
    for r in rep.rows:
        assert r.pruned == r.shape[0] * int(0.25 * r.shape[1])


def test_selector_arguments_are_checked_at_entry():
    with pytest.raises(TypeError, match="PruneConfig.selector must have select_"):
        gradprobe.PruneConfig(selector=object())
    with pytest.raises(ValueError, match="selector and mask_fn"):
        gradprobe.PruneConfig(selector=ScoreSelector(), mask_fn=lambda *a: None)


def test_target_num_pruned():
    assert Target(0.5, scope="row").num_pruned((4, 10)) == 20
    assert Target(0.55, scope="layer").num_pruned((4, 10)) == 22
    assert Target(0.3, count=7).num_pruned((4, 10)) == 7
    assert Target(0.5, nm=(2, 4)).num_pruned((4, 8)) == 16
