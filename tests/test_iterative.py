"""Iterative probe pruning: schedule, stop rule, threshold tuning from caches, two-step re-prune, resume."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_batches, tiny_llama

import gradprobe
from gradprobe.iterative import SparsitySchedule, ThresholdSearch, iterative_prune_

KW = dict(method="magnitude", mode="model")


@pytest.fixture(scope="module")
def batches():
    return random_batches(nsamples=2, seqlen=16)


def zero_fraction(model):
    ws = [lin.weight for layer in model.model.layers for lin in gradprobe.models.get_adapter(model).prunable_linears(layer).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def metric(model):
    """Deterministic stand-in for perplexity: 1 + sparsity (degradation relative to dense = sparsity)."""
    return 1.0 + zero_fraction(model)


def sparsity_after(batches, steps):
    """Zero fraction of a fresh model after probe steps [(target, tau), ...] done one after another."""
    m = tiny_llama()
    for target, tau in steps:
        gradprobe.probe_prune_(m, batches, target, gradient_threshold=tau, **KW)
    return zero_fraction(m), m


def test_schedule_targets():
    assert SparsitySchedule(0.5, 0.1, 0.7).targets() == [0.5, 0.6, 0.7]
    assert SparsitySchedule(0.3, 0.25, 0.9).targets() == [0.3, 0.55, 0.8]


def test_tuning_rescues_a_failing_first_step(batches):
    search = ThresholdSearch(factor=0.5, max_trials=4)  # trials 0.5, 0.25, 0.125, 0
    s = {tau: sparsity_after(batches, [(0.4, tau)])[0] for tau in (1.0, 0.5, 0.25, 0.125, 0.0)}
    assert s[1.0] > s[0.25] >= s[0.0]  # precondition: lowering tau prunes less
    limit = s[0.25] + 1e-9
    model = tiny_llama()
    res = iterative_prune_(model, batches, schedule=SparsitySchedule(0.4, 0.2, 0.6), evaluate=metric,
                           max_metric_drop=limit, gradient_threshold=1.0, tune=search, **KW)
    first = res.steps[0]
    assert first.accepted and first.trials >= 1 and first.tau == f"{res.threshold:g}"
    # the accepted tau is the first trial (largest) that passes
    want_tau = next(t for t in search.trials(1.0) if s[t] <= limit)
    assert first.tau == f"{want_tau:g}"
    assert first.achieved == pytest.approx(s[want_tau])
    # the model equals a fresh probe at the accepted tau (bit for bit) plus later accepted steps
    _, ref = sparsity_after(batches, [(r.target, float(r.tau)) for r in res.steps if r.accepted])
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert res.sparsity == pytest.approx(zero_fraction(model))
    masks = res.masks
    assert sum(int(m.sum()) for m in masks.values()) == round(zero_fraction(model) * sum(m.numel() for m in masks.values()))


def test_failed_step_without_tuning_is_undone_and_stops(batches):
    s1, ref = sparsity_after(batches, [(0.3, 0.0)])
    model = tiny_llama()
    res = iterative_prune_(model, batches, schedule=SparsitySchedule(0.3, 0.3, 0.9), evaluate=metric,
                           max_metric_drop=s1 + 1e-9, **KW)
    assert [r.accepted for r in res.steps] == [True, False]
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_reprune_previous_and_current(batches):
    search = ThresholdSearch(factor=0.5, max_trials=3, reprune_previous=True)  # trials 0.5, 0
    s_step1 = sparsity_after(batches, [(0.2, 1.0)])[0]
    s_two = {t: sparsity_after(batches, [(0.2, t), (0.4, t)])[0] for t in (1.0, 0.5, 0.0)}
    limit = min(s_two[0.5], s_two[0.0]) + 1e-9
    assert s_step1 <= limit < s_two[1.0]  # precondition: step 1 passes, step 2 fails at tau = 1
    model = tiny_llama()
    res = iterative_prune_(model, batches, schedule=SparsitySchedule(0.2, 0.2, 0.4), evaluate=metric,
                           max_metric_drop=limit, gradient_threshold=1.0, tune=search, **KW)
    want = next(t for t in (0.5, 0.0) if s_two[t] <= limit)
    assert [r.accepted for r in res.steps] == [True, True]
    assert res.steps[0].tau == res.steps[1].tau == f"{want:g}"
    _, ref = sparsity_after(batches, [(0.2, want), (0.4, want)])
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_checkpoint_resume(batches, tmp_path):
    sched = SparsitySchedule(0.2, 0.2, 0.6)
    s = sparsity_after(batches, [(0.2, 0.0), (0.4, 0.0)])[0]
    args = dict(schedule=sched, evaluate=metric, max_metric_drop=s + 1e-9, checkpoint_dir=tmp_path, **KW)
    a = tiny_llama()
    ra = iterative_prune_(a, batches, **args)
    assert [r.accepted for r in ra.steps] == [True, True, False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "step_00.safetensors", "step_01.safetensors"]
    b = tiny_llama()
    rb = iterative_prune_(b, batches, **args)  # finished run: loads the sparsest accepted masks only
    assert rb.resumed_from == 1 and rb.steps == ra.steps
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="other settings"):
        iterative_prune_(tiny_llama(), batches, **{**args, "schedule": SparsitySchedule(0.2, 0.1, 0.6)})


def test_resume_continues_after_last_accepted_step(batches, tmp_path):
    sched = SparsitySchedule(0.2, 0.2, 0.4)
    full = tiny_llama()
    iterative_prune_(full, batches, schedule=sched, evaluate=metric, max_metric_drop=1.0, **KW)
    part = tiny_llama()
    iterative_prune_(part, batches, schedule=SparsitySchedule(0.2, 0.2, 0.2), evaluate=metric, max_metric_drop=1.0,
                     checkpoint_dir=tmp_path, **KW)
    # pretend the longer run was interrupted after step 0: same identity except the schedule
    import json

    from gradprobe._checkpoint import json_digest

    st = json.loads((tmp_path / "state.json").read_text())
    st["identity"]["schedule"]["max"] = 0.4
    st["sha256"] = json_digest({k: v for k, v in st.items() if k != "sha256"})  # a deliberate edit, re-signed
    (tmp_path / "state.json").write_text(json.dumps(st))
    resumed = tiny_llama()
    res = iterative_prune_(resumed, batches, schedule=sched, evaluate=metric, max_metric_drop=1.0,
                           checkpoint_dir=tmp_path, **KW)
    assert res.resumed_from == 0 and len(res.steps) == 2
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(evaluate=None), ValueError, "eval_ids"),
    (dict(max_metric_drop=-1.0), ValueError, "max_metric_drop"),
    (dict(gradient_threshold=-0.5), ValueError, "gradient_threshold"),
    (dict(reduction_factor=1.0), ValueError, "reduction_factor"),
    (dict(sparsity=0.5), TypeError, "schedule"),
    (dict(tune=0.5), TypeError, "ThresholdSearch"),
])
def test_bad_inputs(batches, kwargs, exc, match):
    model = tiny_llama(num_layers=1)
    before = [p.detach().clone() for p in model.parameters()]
    args = dict(evaluate=metric, **KW)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        iterative_prune_(model, batches, **args)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("make", [
    lambda: SparsitySchedule(0.0, 0.1, 0.5), lambda: SparsitySchedule(0.5, 0.0, 0.6),
    lambda: SparsitySchedule(0.6, 0.1, 0.5), lambda: ThresholdSearch(factor=1.0), lambda: ThresholdSearch(max_trials=0),
])
def test_bad_schedule_and_search(make):
    with pytest.raises(ValueError):
        make()
