"""gradprobe.probe_prune_ against a plain-PyTorch re-implementation of the probe rule, written here."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import random_batches, tiny_llama, tiny_mistral

import gradprobe
from gradprobe.probe import SizeAdaptive, probe, resolve_threshold
from tests.helpers import backend_params, with_backend

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def weights(model):
    return {f"model.layers.{i}.{n}.weight": layer.get_submodule(n).weight
            for i, layer in enumerate(model.model.layers) for n in LINEARS}


def ref_candidates(ws, norms, sparsity, scope):
    """Stable ascending sort of |W| (* norm), first k; ties to the lower (tensor, flat) index."""
    scores = {n: w.detach().abs().float() * (norms[n][None, :] if norms else 1.0) for n, w in ws.items()}
    out = {}
    if scope == "row":
        for n, s in scores.items():
            k = int(sparsity * s.shape[1])
            m = torch.zeros_like(s, dtype=torch.bool)
            m.scatter_(1, torch.sort(s, dim=1, stable=True).indices[:, :k], True)
            out[n] = m
    elif scope == "layer":
        for n, s in scores.items():
            m = torch.zeros(s.numel(), dtype=torch.bool)
            m[torch.sort(s.flatten(), stable=True).indices[: int(sparsity * s.numel())]] = True
            out[n] = m.view_as(s)
    else:
        flat = torch.cat([s.flatten() for s in scores.values()])
        m = torch.zeros(flat.numel(), dtype=torch.bool)
        m[torch.sort(flat, stable=True).indices[: int(sparsity * flat.numel())]] = True
        off = 0
        for n, s in scores.items():
            out[n] = m[off : off + s.numel()].view_as(s)
            off += s.numel()
    return out


def ref_maxabs_grads(model, names, batches, loss_fn=None):
    """max over batches of |dL/dW| by plain autograd.grad, one batch at a time, on the full model."""
    ws = weights(model)
    acc = {}
    for b in batches:
        b = b.unsqueeze(0) if b.dim() == 1 else b
        with torch.enable_grad():
            for n in names:
                ws[n].requires_grad_(True)
            if loss_fn is None:
                loss = model(input_ids=b, labels=b).loss
            else:
                loss = loss_fn(model(input_ids=b).logits, b)
            gs = torch.autograd.grad(loss, [ws[n] for n in names])
            for n in names:
                ws[n].requires_grad_(False)
        for n, g in zip(names, gs, strict=True):
            acc[n] = g.abs() if n not in acc else torch.maximum(acc[n], g.abs())
    return acc


def ref_norms(model, names, batches):
    ws = weights(model)
    mods = {n: model.get_submodule(n[: -len(".weight")]) for n in names}
    sums, hs = {}, []
    for n, mod in mods.items():
        def hook(m, args, out, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[n] = sums.get(n, 0) + (x * x).sum(0)
        hs.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b.unsqueeze(0) if b.dim() == 1 else b)
    for h in hs:
        h.remove()
    assert set(sums) == set(ws) & set(names)
    return {n: s.sqrt() for n, s in sums.items()}


def ref_probe_group(model, names, batches, sparsity, method, scope, r, tau, cands=None, loss_fn=None):
    """The rule: G0, candidates, W[T] *= r, G1 on the same batches, prune T & (G1 <= G0 (1 + tau))."""
    ws = weights(model)
    norms = ref_norms(model, names, batches) if method == "wanda" else None
    g0 = ref_maxabs_grads(model, names, batches, loss_fn)
    if cands is None:
        cands = ref_candidates({n: ws[n] for n in names}, norms, sparsity, scope)
    orig = {n: ws[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            ws[n].copy_(torch.where(cands[n], orig[n] * r, orig[n]))
    g1 = ref_maxabs_grads(model, names, batches, loss_fn)
    masks = {}
    with torch.no_grad():
        for n in names:
            t = tau(n) if callable(tau) else tau
            prune = cands[n] & (g1[n].float() <= g0[n].float() * torch.tensor(1.0 + t, dtype=torch.float32))
            ws[n].copy_(torch.where(prune, torch.zeros_like(orig[n]), orig[n]))
            masks[n] = prune
    return masks


@pytest.fixture(scope="module")
def batches():
    return random_batches(nsamples=3, seqlen=24)


@pytest.mark.parametrize("method,scope", [("wanda", "row"), ("magnitude", "layer"), ("wanda", "global")])
def test_model_mode_equals_reference(batches, method, scope):
    model, ref = tiny_llama(), tiny_llama()
    dense = {n: w.detach().clone() for n, w in weights(model).items()}
    masks = gradprobe.probe_prune_(model, batches, 0.5, method=method, scope=scope, mode="model",
                                   gradient_threshold=0.05).masks
    want = ref_probe_group(ref, list(weights(ref)), list(batches), 0.5, method, scope, 0.1, 0.05)
    assert set(masks) == set(want)
    for n in want:
        assert torch.equal(masks[n], want[n]), n
        w = weights(model)[n]
        # pruned -> exactly 0; everything else bit-identical to the dense original (restored candidates too)
        assert torch.equal(w[masks[n]], torch.zeros_like(w[masks[n]]))
        assert torch.equal(w[~masks[n]], dense[n][~masks[n]])
    pruned = sum(int(m.sum()) for m in masks.values())
    assert 0 < pruned < 0.5 * sum(m.numel() for m in masks.values()) + 1  # some candidates were restored


@pytest.mark.parametrize(("backend", "device"), backend_params(("reference", "cpp", "triton")))
def test_every_backend_runs_the_probe_identically(batches, backend, device):
    """The hook's accumulation and the fused decide + restore + zero, end to end, on each backend."""
    model, ref = tiny_llama().to(device), tiny_llama()
    with with_backend(backend):
        masks = gradprobe.probe_prune_(model, [b.to(device) for b in batches], 0.5, mode="model").masks
    want = ref_probe_group(ref, list(weights(ref)), list(batches), 0.5, "wanda", "row", 0.1, 0.0)
    for n in want:
        assert torch.equal(masks[n].cpu(), want[n]), n
        assert torch.equal(weights(model)[n].detach().cpu(), weights(ref)[n].detach()), n


@pytest.mark.parametrize("order,method,scope", [("reverse", "wanda", "row"), ("forward", "wanda", "row"),
                                                ("reverse", "magnitude", "global"), ("forward", "wanda", "global")])
def test_layerwise_equals_reference(batches, order, method, scope):
    model, ref = tiny_llama(num_layers=3, hidden=32, intermediate=64), tiny_llama(num_layers=3, hidden=32, intermediate=64)
    masks = gradprobe.probe_prune_(model, batches, 0.6, method=method, scope=scope, mode="layerwise", order=order).masks
    ws = weights(ref)
    cands = None
    if scope == "global":  # chosen once from the dense model
        norms = ref_norms(ref, list(ws), list(batches)) if method == "wanda" else None
        cands = ref_candidates(ws, norms, 0.6, "global")
    want = {}
    layers = range(3) if order == "forward" else range(2, -1, -1)
    for i in layers:
        names = [f"model.layers.{i}.{n}.weight" for n in LINEARS]
        want.update(ref_probe_group(ref, names, list(batches), 0.6, method, scope, 0.1, 0.0,
                                    cands=None if cands is None else {n: cands[n] for n in names}))
    for n in want:
        assert torch.equal(masks[n], want[n]), n
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_same_batches_for_g0_and_g1_and_user_loss(batches):
    """A custom loss sees the very same batches, each once per pass, in the same order for G0 and G1."""
    seen = []

    def loss(logits, ids):
        seen.append(ids.clone())
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    model, ref = tiny_mistral(), tiny_mistral()
    masks = gradprobe.probe_prune_(model, batches, 0.5, method="magnitude", mode="model", loss=loss).masks
    assert len(seen) == 2 * len(batches)
    for i, b in enumerate(seen):
        assert torch.equal(b, batches[i % len(batches)].unsqueeze(0))
    want = ref_probe_group(ref, list(weights(ref)), list(batches), 0.5, "magnitude", "row", 0.1, 0.0, loss_fn=loss)
    for n in want:
        assert torch.equal(masks[n], want[n]), n


def test_layerwise_tail_forward_matches_full_model(batches):
    """Layerwise from layer 0 (cached embeddings) gives the same decisions as model mode for 1 layer."""
    a, b = tiny_llama(num_layers=1), tiny_llama(num_layers=1)
    ma = gradprobe.probe_prune_(a, batches, 0.5, mode="layerwise", method="wanda").masks
    mb = gradprobe.probe_prune_(b, batches, 0.5, mode="model", method="wanda").masks
    for n in ma:
        assert torch.equal(ma[n], mb[n]), n


def test_cache_redecide_and_restore_are_exact(batches):
    model = tiny_llama()
    dense = copy.deepcopy(model)
    res = probe(model, batches, 0.5, mode="model", method="magnitude", gradient_threshold=0.0)
    m0 = {n: m.clone() for n, m in res.masks.items()}
    m_hi = res.apply_(10.0)  # every candidate whose G1 <= 11 G0: a superset
    assert all(bool((m0[n] & ~m_hi[n]).sum() == 0) for n in m0)
    assert sum(int(m.sum()) for m in m_hi.values()) > sum(int(m.sum()) for m in m0.values())
    res.apply_(0.0)
    for n in m0:
        assert torch.equal(res.masks[n], m0[n])
    res.restore_()
    for (n, p), (_, q) in zip(model.named_parameters(), dense.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_size_adaptive_rejects_bad_values():
    with pytest.raises(ValueError, match="n_ref"):
        SizeAdaptive(0.1, 0)
    with pytest.raises(ValueError, match="tau"):
        SizeAdaptive(-0.1)


def test_threshold_forms(batches):
    model = tiny_llama()
    ws = weights(model)
    n_max = max(w.numel() for w in ws.values())
    name = "model.layers.1.mlp.down_proj.weight"
    assert resolve_threshold(SizeAdaptive(0.5), name, 1, "mlp.down_proj", 256, 1024) == pytest.approx(0.25)
    spec = {name: 0.3, 0: 0.2, "mlp.up_proj": 0.1, "default": 0.05}
    assert resolve_threshold(spec, name, 1, "mlp.down_proj", 1, n_max) == 0.3
    assert resolve_threshold(spec, "model.layers.0.mlp.down_proj.weight", 0, "mlp.down_proj", 1, n_max) == 0.2
    assert resolve_threshold(spec, "model.layers.1.mlp.up_proj.weight", 1, "mlp.up_proj", 1, n_max) == 0.1
    assert resolve_threshold(spec, "model.layers.1.self_attn.q_proj.weight", 1, "self_attn.q_proj", 1, n_max) == 0.05
    ref = tiny_llama()
    sa = SizeAdaptive(0.4)
    masks = gradprobe.probe_prune_(model, batches, 0.5, method="magnitude", mode="model", gradient_threshold=sa).masks
    want = ref_probe_group(ref, list(weights(ref)), list(batches), 0.5, "magnitude", "row", 0.1,
                           lambda n: 0.4 * (weights(ref)[n].numel() / n_max) ** 0.5)
    for n in want:
        assert torch.equal(masks[n], want[n]), n


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(reduction_factor=0.0), ValueError, "reduction_factor"),
    (dict(reduction_factor=1.0), ValueError, "reduction_factor"),
    (dict(reduction_factor=1.5), ValueError, "reduction_factor"),
    (dict(gradient_threshold=-0.1), ValueError, "gradient_threshold"),
    (dict(gradient_threshold={"default": -1.0}), ValueError, "gradient_threshold"),
    (dict(structure="2:4"), ValueError, "N:M"),
    (dict(mode="both"), ValueError, "mode"),
    (dict(order="random"), ValueError, "order"),
    (dict(scope="tensor"), ValueError, "scope"),
    (dict(method="random"), ValueError, "method"),
    (dict(sparsity=1.0), ValueError, "sparsity"),
    (dict(batches=[]), ValueError, "empty"),
    (dict(batches=torch.zeros(0, 16, dtype=torch.long)), ValueError, "empty"),
    (dict(batches=torch.zeros(2, 16)), TypeError, "integer"),
    (dict(loss="ce"), TypeError, "loss"),
])
def test_bad_inputs_raise_and_change_nothing(batches, kwargs, exc, match):
    model = tiny_llama(num_layers=1)
    before = [p.detach().clone() for p in model.parameters()]
    args = dict(batches=batches, sparsity=0.5)
    if "sparsity" in kwargs or "batches" in kwargs:
        args.update({k: kwargs.pop(k) for k in ("sparsity", "batches") if k in kwargs})
    with pytest.raises(exc, match=match):
        gradprobe.probe_prune_(model, args["batches"], args["sparsity"], **kwargs)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
