"""One result type: prune, probe_prune_ and iterative_prune_ all return a PruneReport whose rows and
masks describe exactly what the model now holds."""

from __future__ import annotations

import torch
from tiny_models import random_batches, tiny_llama

import gradprobe
from gradprobe.iterative import SparsitySchedule, iterative_prune_
from gradprobe.models import get_adapter


def _linears(model):
    ad = get_adapter(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(lin.weight)]: (i, short, lin.weight)
        for i, layer in enumerate(ad.decoder_layers(model))
        for short, lin in ad.prunable_linears(layer).items()
    }


def _check_rows_describe_model(report, model):
    lins = _linears(model)
    by_key = {(r.layer, r.name): r for r in report.rows}
    assert len(by_key) == len(lins)
    for i, short, w in lins.values():
        row = by_key[(i, short)]
        assert row.shape == tuple(w.shape) and row.numel == w.numel()
        assert row.pruned == int((w == 0).sum())  # random weights have no exact zeros before pruning
    assert report.sparsity == sum(int((w == 0).sum()) for _, _, w in lins.values()) / sum(
        w.numel() for _, _, w in lins.values()
    )


def test_prune_returns_the_report_without_masks():
    model = tiny_llama()
    rep = gradprobe.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    assert isinstance(rep, gradprobe.PruneReport)
    assert rep.masks == {}  # the zeros of the weights are the masks
    _check_rows_describe_model(rep, model)


def test_probe_prune_returns_the_report_with_masks():
    model = tiny_llama()
    rep = gradprobe.probe_prune_(model, random_batches(2, 16), 0.5, method="magnitude", mode="model")
    assert isinstance(rep, gradprobe.PruneReport)
    lins = _linears(model)
    assert set(rep.masks) == set(lins)
    for name, (_, _, w) in lins.items():
        assert torch.equal(rep.masks[name], w == 0)
    _check_rows_describe_model(rep, model)


def test_iterative_result_is_a_report_of_the_accepted_step():
    model = tiny_llama()
    res = iterative_prune_(
        model,
        random_batches(2, 16),
        schedule=SparsitySchedule(0.3, 0.2, 0.5),
        evaluate=lambda m: 1.0,  # never degrades: every step is accepted
        method="magnitude",
        mode="model",
    )
    assert isinstance(res, gradprobe.PruneReport)
    assert all(s.accepted for s in res.steps) and len(res.steps) == 2
    lins = _linears(model)
    for name, (_, _, w) in lins.items():
        assert torch.equal(res.masks[name], w == 0)
    _check_rows_describe_model(res, model)
    assert abs(res.sparsity - res.steps[-1].achieved) < 1e-12
