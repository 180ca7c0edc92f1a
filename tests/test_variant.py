"""The Wanda variant (gradprobe/variant.py): bisection over alpha hits the target; masks equal the sort + int64
cumsum oracle of tests/ops/test_cumsum_cut.py (which tests the cut op itself)."""

from __future__ import annotations

import math

import pytest
import torch

import gradprobe  # noqa: F401  (registers the ops)
from gradprobe.variant import VariantMaskFn, variant_alpha, variant_prune_
from tests.ops.test_cumsum_cut import cut_inputs, sort_cut


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("tol", [1e-3, 0.0])
def test_bisection_hits_target_and_mask_matches_oracle(sparsity, tol):
    w, norm = cut_inputs(64, 200, torch.float32, seed=11)
    w0 = w.clone()
    mask, res = variant_prune_(w, sparsity, norm=norm, tol=tol)
    target = math.floor(sparsity * w.numel())
    assert res.target == target
    assert abs(int(mask.sum()) - target) <= int(tol * w.numel())
    assert int(mask.sum()) == res.pruned
    assert 0.0 < res.alpha < 1.0
    ref_mask, _, _ = sort_cut(w0, norm, res.alpha)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(w, w0.masked_fill(mask, 0))


def test_bad_inputs_raise_and_leave_weight():
    w, norm = cut_inputs(4, 16, torch.float32, seed=1)
    w0 = w.clone()
    with pytest.raises(ValueError, match="tol"):
        variant_prune_(w, 0.5, norm=norm, tol=1.5)
    with pytest.raises(ValueError, match="sparsity"):
        variant_prune_(w, 1.0, norm=norm)
    z = torch.zeros(4, 16)
    z[:, 0] = 1.0
    with pytest.raises(ValueError, match="alpha=0 already prunes"):
        variant_alpha(z, 0.5, tol=0.0)  # 15/16 of the scores are 0: alpha=0 prunes them all
    with pytest.raises(ValueError, match="N:M"):
        VariantMaskFn()(w, norm, None, None)
    assert torch.equal(w, w0)


def test_driver_integration_reports_alpha():
    from tiny_models import random_batches, tiny_llama

    model = tiny_llama(num_layers=2)
    fn = VariantMaskFn(tol=1e-3)
    report = gradprobe.prune(
        model,
        random_batches(4, 32),
        gradprobe.PruneConfig(sparsity=0.6, nsamples=4, seqlen=32, mask_fn=fn, progress=False),
    )
    assert len(fn.results) == len(report.rows) == 14
    for row in report.rows:
        res = fn.results[(row.layer, row.name)]
        assert row.pruned == res.pruned
        assert abs(res.pruned - math.floor(0.6 * row.numel)) <= int(1e-3 * row.numel)
        assert 0.0 < res.alpha < 1.0
