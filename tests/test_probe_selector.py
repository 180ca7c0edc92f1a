"""The gradient probe as a selector of the layerwise pipeline: same decisions as the probe's own
regional forward-order loop, bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_batches, tiny_llama, tiny_qwen2

import gradprobe
from gradprobe.probe import ProbeSelector


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("method,scope,tau", [("wanda", "row", 0.0), ("magnitude", "layer", 0.05)])
def test_pipeline_probe_equals_probe_regional_forward(family, method, scope, tau):
    batches = random_batches(3, 16)
    a, b = family(), family()
    b.load_state_dict(a.state_dict())
    rep = gradprobe.prune(
        a, batches, sparsity=0.5, scope=scope, batch_size=1, nsamples=3, seqlen=16, progress=False,
        selector=ProbeSelector(method=method, reduction_factor=0.1, gradient_threshold=tau),
    )
    ref = gradprobe.probe_prune_(b, batches, 0.5, method=method, scope=scope, mode="regional", order="forward",
                                 gradient_threshold=tau)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)  # pruned and restored weights identical
    assert rep.total_pruned == ref.total_pruned > 0
    assert rep.sparsity <= 0.5  # restored candidates lower it
    assert all(not p.requires_grad or p.grad is None for p in a.parameters())


def test_probe_selector_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="reduction_factor"):
        ProbeSelector(reduction_factor=1.5)
    with pytest.raises(ValueError, match="cannot take lm_head"):
        gradprobe.prune(tiny_llama(), random_batches(2, 8), selector=ProbeSelector(), include_lm_head=True,
                        nsamples=2, seqlen=8, progress=False)
    with pytest.raises(ValueError, match="N:M or exact-count target"):
        gradprobe.prune(tiny_llama(), random_batches(2, 8), selector=ProbeSelector(), structure="2:4",
                        nsamples=2, seqlen=8, progress=False)
