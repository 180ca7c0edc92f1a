"""Layerwise driver vs a straightforward sort-based Wanda reference written here (own hooks, own loop)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import random_batches, tiny_llama, tiny_mistral, tiny_qwen2

import gradprobe
from gradprobe import PruneConfig
from gradprobe.models.base import LLAMA_LINEARS

BUILDERS = {"llama": tiny_llama, "mistral": tiny_mistral}
NS, SEQ = 4, 32


# ------------------------------------------------------------------------------------------------
# reference: Wanda as in the paper's code — catch layer-0 inputs, per layer: hooks -> sum of squares,
# score |W| * ||X||, stable sort, prune, recompute outputs with the pruned layer.
# ------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _capture(model, batches):
    store = []

    def pre_hook(_mod, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"], kwargs))
        raise _Stop

    h = model.model.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    inps, kw = [], None
    try:
        for j in range(batches.shape[0]):
            store.clear()
            with pytest.raises(_Stop):
                model(batches[j : j + 1], use_cache=False)
            inps.append(store[0][0])
            kw = {k: v for k, v in store[0][1].items() if k != "hidden_states"}
    finally:
        h.remove()
    return inps, kw


def _sum_sq_hooks(layer):
    acc, handles = {}, []
    for name in LLAMA_LINEARS:
        lin = layer.get_submodule(name)

        def hook(_m, args, _out, name=name, n=lin.in_features):
            x = args[0].reshape(-1, n).float()
            acc[name] = acc.get(name, torch.zeros(n)) + torch.sum(x**2, dim=0)

        handles.append(lin.register_forward_hook(hook))
    return acc, handles


def _ref_mask(metric, sparsity, scope, nm):
    out, inp = metric.shape
    if nm is not None:
        n, m = nm
        blocks = metric.reshape(out, inp // m, m)
        idx = torch.sort(blocks, dim=-1, stable=True).indices[..., :n]
        return torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, idx, True).reshape(out, inp)
    if scope == "row":
        k = int(math.floor(sparsity * inp))
        idx = torch.sort(metric, dim=-1, stable=True).indices[:, :k]
        return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)
    k = int(math.floor(sparsity * metric.numel()))
    idx = torch.sort(metric.flatten(), stable=True).indices[:k]
    return torch.zeros(metric.numel(), dtype=torch.bool).scatter_(0, idx, True).reshape(metric.shape)


@torch.no_grad()
def reference_prune(model, batches, sparsity, scope="row", nm=None, method="wanda"):
    """Returns {(layer, name): mask} and prunes model in place."""
    layers = model.model.layers
    masks = {}
    if method == "magnitude":
        for i, layer in enumerate(layers):
            for name in LLAMA_LINEARS:
                w = layer.get_submodule(name).weight
                s = sparsity[i] if isinstance(sparsity, (list, tuple)) else sparsity
                masks[(i, name)] = _ref_mask(w.abs().float(), s, scope, nm)
                w[masks[(i, name)]] = 0
        return masks
    inps, kw = _capture(model, batches)
    metrics = {}
    for i, layer in enumerate(layers):
        acc, handles = _sum_sq_hooks(layer)
        outs = [layer(x, **kw) for x in inps]
        for h in handles:
            h.remove()
        for name in LLAMA_LINEARS:
            w = layer.get_submodule(name).weight
            metric = w.abs().float() * torch.sqrt(acc[name])[None, :]
            if scope == "global":
                metrics[(i, name)] = metric
                continue
            s = sparsity[i] if isinstance(sparsity, (list, tuple)) else sparsity
            masks[(i, name)] = _ref_mask(metric, s, scope, nm)
            w[masks[(i, name)]] = 0
        if scope != "global":
            outs = [layer(x, **kw) for x in inps]
        inps = [o[0] if isinstance(o, tuple) else o for o in outs]
    if scope == "global":
        flat = torch.cat([m.flatten() for m in metrics.values()])
        k = int(math.floor(sparsity * flat.numel()))
        sel = torch.zeros(flat.numel(), dtype=torch.bool)
        sel[torch.sort(flat, stable=True).indices[:k]] = True
        off = 0
        for (i, name), m in metrics.items():
            masks[(i, name)] = sel[off : off + m.numel()].reshape(m.shape)
            off += m.numel()
            layers[i].get_submodule(name).weight[masks[(i, name)]] = 0
    return masks


def _weights(model):
    return {
        (i, n): lay.get_submodule(n).weight.detach().clone()
        for i, lay in enumerate(model.model.layers)
        for n in LLAMA_LINEARS
    }


def _cfg(**kw):
    kw.setdefault("progress", False)
    return PruneConfig(**kw)


# ------------------------------------------------------------------------------------------------
CASES = [
    pytest.param(dict(scope="row"), id="row"),
    pytest.param(dict(scope="layer"), id="layer"),
    pytest.param(dict(scope="global"), id="global"),
    pytest.param(dict(structure="2:4"), id="2:4"),
]


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("case", CASES)
def test_wanda_matches_reference(family, case):
    batches = random_batches(NS, SEQ)
    model, ref_model = BUILDERS[family](), BUILDERS[family]()
    dense = _weights(model)
    assert all(bool((w != 0).all()) for w in dense.values())  # so "== 0" identifies the pruned set
    nm = (2, 4) if case.get("structure") == "2:4" else None
    ref_masks = reference_prune(ref_model, batches, 0.5, case.get("scope", "row"), nm)
    report = gradprobe.prune(model, batches, _cfg(**case))
    got = _weights(model)
    for key, ref_mask in ref_masks.items():
        assert torch.equal(got[key] == 0, ref_mask), f"mask differs at {key}"
        assert torch.equal(got[key][~ref_mask], dense[key][~ref_mask])
    # exact achieved sparsity, per tensor and total
    for row in report.rows:
        rows_, cols = row.shape
        if case.get("scope") == "row" or nm:
            assert row.pruned == rows_ * (cols // 2)
        elif case.get("scope") == "layer":
            assert row.pruned == (rows_ * cols) // 2
        assert row.pruned == int(ref_masks[(row.layer, row.name)].sum())
    total = sum(m.numel() for m in ref_masks.values())
    if case.get("scope") == "global":
        assert report.total_pruned == total // 2
    assert report.total_params == total and len(report.rows) == 2 * 7
    assert (report.nsamples, report.seqlen) == (NS, SEQ)


def test_qwen2_row_matches_exact_count():
    model = tiny_qwen2()
    report = gradprobe.prune(model, random_batches(2, 16), _cfg(sparsity=0.3))
    for r in report.rows:
        assert r.pruned == r.shape[0] * math.floor(0.3 * r.shape[1])
        assert int((model.model.layers[r.layer].get_submodule(r.name).weight == 0).sum()) == r.pruned


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_magnitude_matches_reference_without_calibration(scope):
    model, ref_model = tiny_llama(), tiny_llama()
    ref_masks = reference_prune(ref_model, None, 0.6, scope, method="magnitude")
    report = gradprobe.prune(model, None, _cfg(method="magnitude", sparsity=0.6, scope=scope))
    got = _weights(model)
    for key, m in ref_masks.items():
        assert torch.equal(got[key] == 0, m), key
    assert report.nsamples == 0


def test_per_layer_sparsity_list_and_mapping():
    batches = random_batches(NS, SEQ)
    model, ref_model = tiny_llama(num_layers=3), tiny_llama(num_layers=3)
    sp = [0.25, 0.0, 0.7]
    ref_masks = reference_prune(ref_model, batches, sp, "row")
    report = gradprobe.prune(model, batches, _cfg(sparsity=sp))
    got = _weights(model)
    for key, m in ref_masks.items():
        assert torch.equal(got[key] == 0, m), key
    for r in report.rows:
        assert r.pruned == r.shape[0] * math.floor(sp[r.layer] * r.shape[1])
        assert r.target == sp[r.layer]
    # a mapping leaves unlisted layers dense
    m2 = tiny_llama(num_layers=3)
    rep2 = gradprobe.prune(m2, batches, _cfg(sparsity={2: 0.5}))
    assert rep2.layer_sparsity() == {0: 0.0, 1: 0.0, 2: 0.5}


def test_sparsity_fn_and_mask_fn_hooks():
    seen = []

    def mask_fn(weight, norm, sparsity, ctx):
        seen.append((ctx.layer_idx, ctx.name, sparsity, ctx.stats.tokens))
        return gradprobe.prune_(weight, sparsity, norm=norm, scope="layer")

    model = tiny_llama()
    cfg = _cfg(sparsity_fn=lambda i, name, c: 0.1 * (i + 1), mask_fn=mask_fn)
    rep = gradprobe.prune(model, random_batches(NS, SEQ), cfg)
    assert [s[:2] for s in seen] == [(i, n) for i in range(2) for n in LLAMA_LINEARS]
    assert {s[2] for s in seen} == {0.1, 0.2} and {s[3] for s in seen} == {NS * SEQ}
    for r in rep.rows:
        assert r.pruned == math.floor(r.target * r.numel)


def test_include_lm_head():
    model = tiny_llama()
    rep = gradprobe.prune(model, random_batches(NS, SEQ), _cfg(include_lm_head=True, scope="layer"))
    head = rep.rows[-1]
    assert (head.layer, head.name) == (2, "lm_head")
    assert head.pruned == model.lm_head.weight.numel() // 2 == int((model.lm_head.weight == 0).sum())


# ------------------------------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("scope", ["row", "global"])
def test_resume_equals_uninterrupted(tmp_path, scope):
    batches = random_batches(NS, SEQ)
    cfg = _cfg(scope=scope)
    full = tiny_llama(num_layers=3)
    full_rep = gradprobe.prune(full, batches, cfg)

    def stop_after_1(i, rows):
        if i == 1:
            raise _Interrupt

    interrupted = tiny_llama(num_layers=3)
    with pytest.raises(_Interrupt):
        gradprobe.prune(interrupted, batches, cfg, resume_dir=tmp_path, callback=stop_after_1)
    state = json.loads((tmp_path / "state.json").read_text())
    assert sorted(state["finished"]) == ["0", "1"]

    # a reloaded model resumes after layer 1; then the same (partly pruned) object restores all 3
    for model, resumed in ((tiny_llama(num_layers=3), [0, 1]), (interrupted, [0, 1, 2])):
        rep = gradprobe.prune(model, batches, cfg, resume_dir=tmp_path)
        assert rep.resumed_layers == resumed
        for key, w in _weights(full).items():
            assert torch.equal(_weights(model)[key], w), key
        assert [r.pruned for r in rep.rows] == [r.pruned for r in full_rep.rows]


def test_resume_rejects_other_config_or_model(tmp_path):
    batches = random_batches(NS, SEQ)
    gradprobe.prune(tiny_llama(), batches, _cfg(), resume_dir=tmp_path)
    with pytest.raises(ValueError, match="different run.*config"):
        gradprobe.prune(tiny_llama(), batches, _cfg(sparsity=0.6), resume_dir=tmp_path)
    with pytest.raises(ValueError, match="different run.*batches"):
        gradprobe.prune(tiny_llama(), random_batches(NS, SEQ, seed=1), _cfg(), resume_dir=tmp_path)
    other = tiny_llama(seed=1)
    before = _weights(other)
    with pytest.raises(ValueError, match="match neither"):
        gradprobe.prune(other, batches, _cfg(), resume_dir=tmp_path)
    assert all(torch.equal(before[k], w) for k, w in _weights(other).items())


def test_report_files(tmp_path):
    rep = gradprobe.prune(tiny_llama(), random_batches(NS, SEQ), _cfg())
    paths = rep.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["totals"]["pruned"] == rep.total_pruned and len(data["rows"]) == 14
    assert data["calibration"] == {"nsamples": NS, "seqlen": SEQ, "tokens": NS * SEQ}
    md = paths["markdown"].read_text()
    assert "| 1 | mlp.down_proj | 64x128 | 0.5000 | 0.5000 |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()


BAD = [
    pytest.param(
        lambda: (_gpt2(), random_batches(2, 8, vocab=64), {}),
        ValueError,
        "unsupported model family 'gpt2'.*llama, mistral, qwen2",
        id="family",
    ),
    pytest.param(
        lambda: (tiny_llama(), torch.empty(0, 32, dtype=torch.int64), {}),
        ValueError,
        "calibration batches are empty",
        id="empty",
    ),
    pytest.param(
        lambda: (tiny_llama(), torch.rand(2, 8), {}), TypeError, "integer token ids", id="float-ids"
    ),
    pytest.param(
        lambda: (tiny_llama(), torch.full((2, 8), 999), {}), ValueError, r"vocab_size=256", id="ids-range"
    ),
    pytest.param(lambda: (tiny_llama(), None, {}), ValueError, "needs calibration batches", id="no-calib"),
    pytest.param(
        lambda: (tiny_llama(), random_batches(), {"sparsity": 1.2}),
        ValueError,
        r"PruneConfig.sparsity must be in \[0, 1\)",
        id="sparsity",
    ),
    pytest.param(
        lambda: (tiny_llama(), random_batches(), {"method": "obs"}),
        ValueError,
        "PruneConfig.method",
        id="method",
    ),
    pytest.param(
        lambda: (tiny_llama(), random_batches(), {"scope": "block"}),
        ValueError,
        "PruneConfig.scope",
        id="scope",
    ),
    pytest.param(
        lambda: (tiny_llama(), random_batches(), {"structure": "3:5"}),
        ValueError,
        "divisible by 5",
        id="nm-shape",
    ),
    pytest.param(
        lambda: (tiny_llama(), random_batches(), {"structure": "2:4", "sparsity": 0.3}),
        ValueError,
        "conflicts with structure",
        id="nm-sparsity",
    ),
    pytest.param(
        lambda: (tiny_llama(), random_batches(), {"sparsity": [0.5, 0.5, 0.5]}),
        ValueError,
        "3 entries but the model has 2",
        id="list-len",
    ),
    pytest.param(
        lambda: (tiny_llama(), random_batches(), {"nsamples": 0}),
        ValueError,
        "PruneConfig.nsamples",
        id="nsamples",
    ),
    pytest.param(
        lambda: (tiny_llama(), random_batches(), {"bogus": 1}),
        TypeError,
        "unknown PruneConfig field",
        id="unknown-field",
    ),
]


@pytest.mark.parametrize("make, exc, match", BAD)
def test_bad_inputs_raise_and_leave_model_unchanged(make, exc, match):
    model, batches, overrides = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        gradprobe.prune(model, batches, _cfg(), **overrides)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tied_lm_head_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="tied"):
        gradprobe.prune(model, random_batches(2, 8, vocab=64), _cfg(include_lm_head=True))
