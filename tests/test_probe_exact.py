"""target="exact" (exact counts, the did-not-grow-first rule) and mode="regional" of the gradient probe."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_batches, tiny_llama

import gradprobe
from gradprobe.iterative import SparsitySchedule, ThresholdSearch, iterative_prune_
from gradprobe.models import get_adapter
from gradprobe.probe import _Runner, exact_key, probe, select_by_key
from tests.test_probe import ref_candidates, ref_maxabs_grads, ref_norms, weights


def ref_select(candidates, key, score, k, per_row):
    """Plain rule: stable sort of the candidates by (key, score, flat index), first k (per row or in total)."""
    out = torch.zeros_like(candidates)
    groups = [(candidates[i], out[i]) for i in range(candidates.shape[0])] if per_row else [
        (candidates.flatten(), out.view(-1))]
    full_key = torch.full(candidates.shape, float("inf"))
    full_key[candidates] = key
    full_score = torch.zeros(candidates.shape)
    full_score[candidates] = score
    rows = range(candidates.shape[0]) if per_row else [None]
    for (cand, o), r in zip(groups, rows, strict=True):
        kk = full_key[r] if per_row else full_key.flatten()
        ss = full_score[r] if per_row else full_score.flatten()
        idx = cand.nonzero().flatten()
        order = sorted(idx.tolist(), key=lambda j: (float(kk[j]), float(ss[j]), j))
        o[order[:k]] = True
    return out


def ref_key(orig, g0, g1, tau=0.0):
    """1 = the gradient grew (G1 > G0 (1 + tau) in fp32) and the weight is not already zero, else 0."""
    return ((g1.float() > g0.float() * torch.tensor(1.0 + tau, dtype=torch.float32)) & (orig != 0)).float()


def ref_probe_exact(model, batches, s, s_cand, scope, r=0.1, tau=0.0):
    """The whole rule by plain autograd: candidates at s', W[T] *= r, G1; prune the k smallest
    (grew, score, index) per row / tensor; counts for global from the global selection at s."""
    ws = weights(model)
    names = list(ws)
    norms = ref_norms(model, names, batches)
    g0 = ref_maxabs_grads(model, names, batches)
    cands = ref_candidates(ws, norms, s_cand, scope)
    at_s = ref_candidates(ws, norms, s, scope)
    orig = {n: ws[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            ws[n].copy_(torch.where(cands[n], orig[n] * r, orig[n]))
    g1 = ref_maxabs_grads(model, names, batches)
    out = {}
    with torch.no_grad():
        for n in names:
            c = cands[n]
            key = ref_key(orig[n][c], g0[n][c], g1[n][c], tau)
            score = (orig[n].abs().float() * norms[n].abs())[c]
            if scope == "row":
                k, per_row = int(s * c.shape[1]), True
            elif scope == "layer":
                k, per_row = int(s * c.numel()), False
            else:
                k, per_row = int(at_s[n].sum()), False
            out[n] = ref_select(c, key, score, k, per_row)
            ws[n].copy_(torch.where(out[n], torch.zeros_like(orig[n]), orig[n]))
    return out


@pytest.fixture(scope="module")
def batches():
    return random_batches(nsamples=3, seqlen=24)


@pytest.mark.parametrize("per_row", [True, False])
def test_select_by_key_equals_plain_sort_with_ties(per_row):
    g = torch.Generator().manual_seed(3)
    cand = torch.rand(6, 40, generator=g) < 0.7
    cand[:, :30] = True  # >= 30 candidates per row
    c = int(cand.sum())
    key = torch.randint(0, 4, (c,), generator=g).float() / 4  # many key ties
    score = torch.randint(0, 3, (c,), generator=g).float()  # score ties and zero scores
    for k in (0, 1, 7, 30):
        kk = k if per_row else k * 6
        got = select_by_key(cand, key, score, kk, per_row)
        assert torch.equal(got, ref_select(cand, key, score, kk, per_row)), k
        assert not bool((got & ~cand).any())
        if per_row:
            assert got.sum(1).tolist() == [k] * 6
        else:
            assert int(got.sum()) == kk


def test_exact_key_edge_cases():
    backup = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, -2.0])
    g0 = torch.tensor([2.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    g1 = torch.tensor([1.0, 0.0, 3.0, 5.0, 1.05, 1.2])
    assert exact_key(backup, g0, g1).tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert exact_key(backup, g0, g1, 0.1).tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("scope", ["row", pytest.param("layer", marks=pytest.mark.slow),
                                   pytest.param("global", marks=pytest.mark.slow)])
def test_exact_model_mode_equals_reference_and_counts(batches, scope):
    model, ref = tiny_llama(), tiny_llama()
    masks = gradprobe.probe_prune_(model, batches, 0.5, scope=scope, mode="model", target="exact",
                                   candidate_sparsity=0.7, gradient_threshold=0.02).masks
    want = ref_probe_exact(ref, list(batches), 0.5, 0.7, scope, tau=0.02)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == int(0.5 * total)
    for n, w in weights(model).items():
        assert torch.equal(masks[n], want[n]), n
        assert torch.equal(w, weights(ref)[n]), n  # pruned -> 0, all else (restored candidates too) bit-identical
        if scope == "row":
            assert masks[n].sum(1).tolist() == [int(0.5 * w.shape[1])] * w.shape[0]
        elif scope == "layer":
            assert int(masks[n].sum()) == int(0.5 * w.numel())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["layerwise", "regional"])
def test_exact_is_deterministic_and_differs_from_wanda(batches, mode):
    a, b = tiny_llama(), tiny_llama()
    ma = gradprobe.probe_prune_(a, batches, 0.4, mode=mode, target="exact").masks
    mb = gradprobe.probe_prune_(b, batches, 0.4, mode=mode, target="exact").masks
    for n in ma:
        assert torch.equal(ma[n], mb[n])
        assert torch.equal(weights(a)[n], weights(b)[n])
        assert ma[n].sum(1).tolist() == [int(0.4 * ma[n].shape[1])] * ma[n].shape[0]
    wanda = tiny_llama()
    gradprobe.prune(wanda, batches, gradprobe.PruneConfig(sparsity=0.4, nsamples=3, seqlen=24))
    assert any(not torch.equal(weights(wanda)[n] == 0, ma[n]) for n in ma)  # the probe changed the choice


@pytest.mark.slow
def test_regional_equals_block_loss_reference_and_needs_one_layer(batches, monkeypatch):
    """mode="regional": G0 = max_b |d ||block_i(h_b)||^2 / dW| with h_b the dense input of layer i;
    each gradient pass runs only that block and only that layer's linears require grad."""
    model, ref = tiny_llama(), tiny_llama()
    layer = 1
    seen = []
    orig_pass = _Runner.grad_pass

    def spy(self, params, loss_of_batch):
        seen.append({n for n, p in model.named_parameters() if p.requires_grad})
        return orig_pass(self, params, loss_of_batch)

    monkeypatch.setattr(_Runner, "grad_pass", spy)
    monkeypatch.setattr(_Runner, "tail_loss", lambda *a, **k: pytest.fail("regional must not run the model's tail"))
    res = probe(model, batches, 0.5, mode="regional", layers=[layer], target="exact", method="magnitude")
    assert len(seen) == 2 and all(s == {n for n in weights(model) if f"layers.{layer}." in n} for s in seen)

    # reference: hidden input of the layer from the dense model, block loss by plain autograd
    inputs = []
    h = ref.model.layers[layer].register_forward_pre_hook(lambda m, a, kw: inputs.append(
        (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            ref(input_ids=b.unsqueeze(0))
    h.remove()
    runner = _Runner(ref, get_adapter(ref), [], None)
    names = [n for n in weights(ref) if f"layers.{layer}." in n]
    ws = weights(ref)

    def g(names):
        acc = {}
        for x in inputs:
            for n in names:
                ws[n].requires_grad_(True)
            gs = torch.autograd.grad(runner.block_loss(layer, x), [ws[n] for n in names])
            for n in names:
                ws[n].requires_grad_(False)
            for n, gg in zip(names, gs, strict=True):
                acc[n] = gg.abs() if n not in acc else torch.maximum(acc[n], gg.abs())
        return acc

    g0 = g(names)
    cand = ref_candidates({n: ws[n] for n in names}, None, res.info["candidate_sparsity"], "row")
    orig = {n: ws[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            ws[n].copy_(torch.where(cand[n], orig[n] * 0.1, orig[n]))
    g1 = g(names)
    for n in names:
        c = cand[n]
        want = ref_select(c, ref_key(orig[n][c], g0[n][c], g1[n][c]), orig[n].abs().float()[c],
                          int(0.5 * c.shape[1]), True)
        assert torch.equal(res.tensors[n].mask, want), n


def test_iterative_exact_hits_every_target(batches):
    model = tiny_llama()
    res = iterative_prune_(model, batches, schedule=SparsitySchedule(0.25, 0.25, 0.5), evaluate=lambda m: 1.0,
                           max_metric_drop=1.0, target="exact", mode="model")
    assert [s.target for s in res.steps] == [0.25, 0.5]
    assert [s.achieved for s in res.steps] == [0.25, 0.5]
    for n, w in weights(model).items():
        assert (w == 0).sum(1).tolist() == [w.shape[1] // 2] * w.shape[0]
        assert torch.equal(res.masks[n], w == 0)
    # a failing step re-decided with smaller tau keeps the exact counts
    model = tiny_llama()
    zeros = lambda m: float(sum(int((w == 0).sum()) for w in weights(m).values()))  # noqa: E731  (fails any pruning)
    res = iterative_prune_(model, batches, schedule=SparsitySchedule(0.25, 0.25, 0.5), evaluate=zeros,
                           max_metric_drop=0.0, gradient_threshold=0.1, tune=ThresholdSearch(max_trials=2),
                           target="exact", mode="model")
    assert res.steps[0].trials == 2 and res.steps[0].achieved == 0.25 and not res.steps[0].accepted
    assert zeros(model) == 0.0  # the rejected step is undone bit for bit


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target": "exactly"}, "target must be one of"),
    ({"target": "exact", "candidate_sparsity": 0.3}, "candidate_sparsity must be >= sparsity"),
    ({"candidate_sparsity": 0.7}, 'only with target="exact"'),
    ({"target": "exact", "candidate_sparsity": 1.0}, "candidate_sparsity must be in"),
    ({"mode": "regionl"}, "mode must be one of"),
])
def test_bad_target_arguments_raise_and_change_nothing(batches, kwargs, match):
    model = tiny_llama()
    before = {n: w.detach().clone() for n, w in weights(model).items()}
    with pytest.raises(ValueError, match=match):
        gradprobe.probe_prune_(model, batches, 0.5, **kwargs)
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())


@pytest.mark.slow
def test_cli_probe_target_exact_regional_equals_probe_prune_(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from gradprobe import cli, io
    from gradprobe.data import calibration_batches
    from tests.tiny_models import prune_argv, save_tiny_checkpoint

    model_dir, text = save_tiny_checkpoint(tmp_path / "src", num_layers=2)
    out = tmp_path / "out"
    argv = prune_argv(model_dir, text, out, "--no-eval", "--probe", "--probe-target", "exact", "--probe-mode", "regional",
                      "--candidate-sparsity", "0.7", "--sparsity", "0.4")
    assert cli.main(argv) == 0
    capsys.readouterr()
    ref, tok = io.load_model(model_dir)
    batches = calibration_batches(tok, str(text), nsamples=4, seqlen=32, seed=0)
    masks = gradprobe.probe_prune_(ref, batches, 0.4, mode="regional", target="exact", candidate_sparsity=0.7).masks
    pruned = AutoModelForCausalLM.from_pretrained(out)
    for (name, p), (_, q) in zip(pruned.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    for m in masks.values():
        assert m.sum(1).tolist() == [int(0.4 * m.shape[1])] * m.shape[0]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(cli.main(prune_argv(model_dir, text, tmp_path / "o2", "--probe", "--candidate-sparsity", "0.7")))
    assert exc.value.code == 2 and "--candidate-sparsity is used only with --probe-target exact" in capsys.readouterr().err
