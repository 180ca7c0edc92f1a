"""SparseGPT (gradprobe/sparsegpt.py) vs a plain re-implementation of the published algorithm.

The oracle below is ``SparseGPT.add_batch`` / ``SparseGPT.fasterprune`` of IST-DASLab/sparsegpt,
rewritten in plain PyTorch with one change: the selection takes exactly the stated count by a stable
sort (ties -> lower index) instead of ``sort(...)[int(numel * s)]`` / ``topk``.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
from tiny_models import prune_argv, random_batches, save_tiny_checkpoint, tiny_llama

import gradprobe
from gradprobe.models import get_adapter
from gradprobe.pipeline.calibration import capture_calibration
from gradprobe.sparsegpt import SparseGPTMaskFn, sparsegpt_prune_
from gradprobe.stats import HessianStats, LayerStats


# ---- oracle -------------------------------------------------------------------------------------
class OracleHessian:
    """The published ``add_batch`` for a Linear."""

    def __init__(self, cols):
        self.H = torch.zeros((cols, cols))
        self.nsamples = 0

    def add_batch(self, inp):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())


def split_oracle(count, widths):
    """Largest-remainder split of ``count`` proportional to ``widths`` (ties -> lower index)."""
    total = sum(widths)
    ideal = [Fraction(count * w, total) for w in widths]
    out = [math.floor(x) for x in ideal]
    order = sorted(range(len(widths)), key=lambda i: (-(ideal[i] - out[i]), i))
    for i in order[: count - sum(out)]:
        out[i] += 1
    return out


def smallest(scores, k):
    """bool mask of the k smallest entries of each row of ``scores`` (stable sort: ties -> lower index)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    return mask.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[..., :k], True)


def fasterprune_oracle(
    W, H, sparsity=None, prunen=0, prunem=0, scope="row", blocksize=128, percdamp=0.01, row_counts=None
):
    """Published ``fasterprune`` (no quantizer) with exact, stable selection. Returns (W', mask).

    ``row_counts``: per-row pruned counts instead of ``floor(sparsity * columns)`` (scope "row").
    """
    W = W.clone().float()
    rows, columns = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    if prunen:
        blocksize = max(prunem, blocksize // prunem * prunem)
    widths = [min(blocksize, columns - i) for i in range(0, columns, blocksize)]
    if not prunen:
        if scope == "row":
            if row_counts is None:
                row_counts = [math.floor(sparsity * columns)] * rows
            counts = [split_oracle(c, widths) for c in row_counts]
        else:
            counts = split_oracle(math.floor(sparsity * rows * columns), [rows * w for w in widths])
    full_mask = torch.zeros(W.shape, dtype=torch.bool)
    for b, i1 in enumerate(range(0, columns, blocksize)):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            if scope == "row":
                mask1 = torch.stack([smallest(tmp[r], counts[r][b]) for r in range(rows)])
            else:
                mask1 = smallest(tmp.flatten(), counts[b]).reshape(tmp.shape)
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = (
                    W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                )
                mask1[:, i : i + prunem] = smallest(tmp, prunen)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, full_mask


def random_problem(rows, cols, tokens=200, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens // 4, 4, cols, generator=g) * torch.rand(cols, generator=g) * 3
    X[..., list(dead)] = 0
    h = OracleHessian(cols)
    for x in X:
        h.add_batch(x.unsqueeze(0))
    return W, h.H


# ---- unit: one linear ---------------------------------------------------------------------------
CASES = [
    dict(sparsity=0.5, scope="row", blocksize=128),
    dict(sparsity=0.5, scope="row", blocksize=16),
    dict(sparsity=0.37, scope="row", blocksize=24),
    dict(sparsity=0.6, scope="layer", blocksize=16),
    dict(sparsity=0.0, scope="row", blocksize=16),
    dict(structure="2:4", blocksize=16),
    dict(structure="4:8", blocksize=20),
    dict(structure="2:4", blocksize=128),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_prune_equals_published_algorithm(case):
    W, H = random_problem(12, 72, seed=1, dead=(5, 40))
    nm = case.get("structure")
    n, m = (int(x) for x in nm.split(":")) if nm else (0, 0)
    want_w, want_mask = fasterprune_oracle(
        W, H, case.get("sparsity"), n, m, scope=case.get("scope", "row"), blocksize=case["blocksize"]
    )
    w = W.clone()
    mask = sparsegpt_prune_(
        w, H, case.get("sparsity"), scope=case.get("scope", "row"), structure=nm, blocksize=case["blocksize"]
    )
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
    assert bool((w[mask] == 0).all())
    # exact counts
    if nm:
        assert bool((mask.reshape(12, -1, m).sum(-1) == n).all())
    elif case["scope"] == "row":
        assert bool((mask.sum(1) == math.floor(case["sparsity"] * 72)).all())
    else:
        assert int(mask.sum()) == math.floor(case["sparsity"] * W.numel())
    assert not torch.equal(w[~mask], W[~mask]) or not mask.any()  # the survivors were updated (OBS)


def test_exact_total_count_spreads_over_rows():
    W, H = random_problem(7, 40, seed=2)
    for k in (0, 3, 139, 140, 141, 279):
        w = W.clone()
        mask = sparsegpt_prune_(w, H, k=k, blocksize=16)
        a, r = divmod(k, 7)
        want_counts = [a + 1] * r + [a] * (7 - r)
        assert mask.sum(1).tolist() == want_counts
        want_w, want_mask = fasterprune_oracle(W, H, blocksize=16, row_counts=want_counts)
        assert torch.equal(mask, want_mask)
        torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)


def test_bf16_weight_updated_in_place():
    W, H = random_problem(8, 32, seed=3)
    w = W.to(torch.bfloat16)
    want, want_mask = fasterprune_oracle(w.float(), H, 0.5, blocksize=16)
    mask = sparsegpt_prune_(w, H, 0.5, blocksize=16)
    assert w.dtype == torch.bfloat16 and torch.equal(mask, want_mask)
    assert torch.equal(w, want.to(torch.bfloat16))


def test_hessian_stats_equal_published_add_batch():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(b, 5, 24, generator=g) for b in (1, 3, 2)]
    ours, ref = HessianStats(24, "cpu"), OracleHessian(24)
    for x in xs:
        ours.add(x)
        ref.add_batch(x)
    assert ours.nsamples == ref.nsamples == 6
    assert torch.equal(ours.H, ref.H)


def test_layer_stats_share_one_hessian_per_input():
    model = tiny_llama(num_layers=1, hidden=32, intermediate=48, seed=0)
    layer = model.model.layers[0]
    lins = get_adapter(model).prunable_linears(layer)
    calib = capture_calibration(model, random_batches(2, 8, seed=0), gradprobe.PruneConfig(progress=False))
    with LayerStats(lins, hessian=True) as st:
        calib.run_layer(layer, 0, calib.inputs, None)
    h = {n: s.hessian for n, s in st.stats.items()}
    assert h["self_attn.q_proj"] is h["self_attn.k_proj"] is h["self_attn.v_proj"]
    assert h["mlp.gate_proj"] is h["mlp.up_proj"]
    assert len({id(v) for v in h.values()}) == 4
    assert all(v.nsamples == 2 for v in h.values())
    with LayerStats(lins) as st2:
        calib.run_layer(layer, 0, calib.inputs, None)
    assert all(s.hessian is None for s in st2.stats.values())


# ---- end to end: the driver vs the oracle pipeline ----------------------------------------------
def oracle_pipeline(model, batches, sparsity=None, n=0, m=0, scope="row", blocksize=128):
    """The published layer loop: dense-layer Hessians of all linears, prune each, rerun the pruned layer."""
    ad = get_adapter(model)
    calib = capture_calibration(model, batches, gradprobe.PruneConfig(progress=False))
    inps, outs = calib.inputs, torch.empty_like(calib.inputs)
    for i, layer in enumerate(ad.decoder_layers(model)):
        lins = ad.prunable_linears(layer)
        hs = {name: OracleHessian(lin.in_features) for name, lin in lins.items()}
        handles = [
            lin.register_forward_pre_hook(lambda _m, args, h=hs[name]: h.add_batch(args[0].data))
            for name, lin in lins.items()
        ]
        calib.run_layer(layer, i, inps, None)
        for hd in handles:
            hd.remove()
        for name, lin in lins.items():
            w, _ = fasterprune_oracle(lin.weight.data, hs[name].H, sparsity, n, m, scope, blocksize)
            lin.weight.data.copy_(w)
        calib.run_layer(layer, i, inps, outs)
        inps, outs = outs, inps


@pytest.mark.parametrize(
    "kw",
    [dict(sparsity=0.5, scope="row"), dict(sparsity=0.6, scope="layer"), dict(structure="2:4")],
    ids=["row50", "layer60", "2of4"],
)
def test_driver_equals_oracle_pipeline(kw):
    batches = random_batches(4, 16, seed=5)
    ours = tiny_llama(num_layers=2, hidden=32, intermediate=48, seed=3)
    ref = tiny_llama(num_layers=2, hidden=32, intermediate=48, seed=3)
    cfg = gradprobe.PruneConfig(
        method="sparsegpt",
        nsamples=4,
        seqlen=16,
        progress=False,
        batch_size=2,
        mask_fn=SparseGPTMaskFn(blocksize=16),
        **kw,
    )
    rep = gradprobe.prune(ours, batches, cfg)
    # the oracle's forwards run in the same batches of 2 windows as the driver
    n, m = (2, 4) if "structure" in kw else (0, 0)
    oracle_pipeline(ref, batches, kw.get("sparsity"), n, m, kw.get("scope", "row"), blocksize=16)
    ad = get_adapter(ours)
    for la, lb in zip(ad.decoder_layers(ours), ad.decoder_layers(ref), strict=True):
        for (name, a), b in zip(
            ad.prunable_linears(la).items(), ad.prunable_linears(lb).values(), strict=True
        ):
            assert torch.equal(a.weight == 0, b.weight == 0), name
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    if "structure" in kw:
        assert rep.sparsity == 0.5
    elif kw["scope"] == "row":
        assert all(r.pruned == r.shape[0] * math.floor(0.5 * r.shape[1]) for r in rep.rows)
    else:
        assert all(r.pruned == math.floor(0.6 * r.numel) for r in rep.rows)


def test_owl_allocation_with_sparsegpt_prunes_the_plan():
    from gradprobe.allocation import owl_from_model

    batches = random_batches(2, 16, seed=8)
    model = tiny_llama(num_layers=2, hidden=32, intermediate=48, seed=5)
    alloc = owl_from_model(model, batches, 0.5, lam=0.1)
    rep = gradprobe.prune(
        model, batches, alloc.config(method="sparsegpt", nsamples=2, seqlen=16, progress=False)
    )
    alloc.check(rep)  # exactly the planned count of every tensor
    assert len(set(alloc.layer_sparsity.values())) > 1


def test_default_blocksize_runs_and_lm_head():
    batches = random_batches(2, 16, seed=6)
    model = tiny_llama(num_layers=1, hidden=32, intermediate=48, seed=4)
    rep = gradprobe.prune(
        model,
        batches,
        method="sparsegpt",
        sparsity=0.5,
        nsamples=2,
        seqlen=16,
        include_lm_head=True,
        progress=False,
    )
    assert {r.name for r in rep.rows} >= {"lm_head", "mlp.down_proj"}
    assert all(r.pruned == r.shape[0] * (r.shape[1] // 2) for r in rep.rows)
    head = model.lm_head.weight
    assert int((head == 0).sum()) >= head.numel() // 2


# ---- bad arguments ------------------------------------------------------------------------------
def test_bad_arguments_raise_and_change_nothing():
    W, H = random_problem(4, 16, seed=7)
    w = W.clone()
    bad = [
        (dict(hessian=H[:8, :8], sparsity=0.5), "hessian must be float32 of shape"),
        (dict(hessian=H.double(), sparsity=0.5), "hessian must be float32"),
        (dict(hessian=H, sparsity=1.5), "sparsity"),
        (dict(hessian=H, sparsity=None), "sparsity is None"),
        (dict(hessian=H, sparsity=0.5, scope="global"), "scope must be one of"),
        (dict(hessian=H, sparsity=0.5, structure="2:4"), "sparsity must be None"),
        (dict(hessian=H, structure="3:7"), "divisible by 7"),
        (dict(hessian=H, sparsity=0.5, blocksize=0), "blocksize"),
        (dict(hessian=H, sparsity=0.5, percdamp=-1.0), "percdamp"),
        (dict(hessian=H, k=10**6), "k must be"),
        (dict(hessian=H * float("nan"), sparsity=0.5), "hessian contains NaN"),
        (dict(hessian=-torch.eye(16), sparsity=0.5, percdamp=0.0), "not positive definite"),
    ]
    for kw, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            sparsegpt_prune_(w, **kw)
        assert torch.equal(w, W)


def test_config_rejects_global_scope_and_needs_batches():
    with pytest.raises(ValueError, match='scope="global" is not defined for method="sparsegpt"'):
        gradprobe.PruneConfig(method="sparsegpt", scope="global")
    model = tiny_llama(num_layers=1, hidden=32, intermediate=48, seed=0)
    with pytest.raises(ValueError, match="method='sparsegpt' needs calibration batches"):
        gradprobe.prune(model, None, method="sparsegpt", progress=False)


# ---- CLI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("sgpt_cli"), num_layers=1)


def test_cli_method_sparsegpt_2of4(cli_workspace, tmp_path):
    from gradprobe import cli

    model_dir, text = cli_workspace
    out = tmp_path / "out"
    assert (
        cli.main(prune_argv(model_dir, text, out, "--no-eval", "--method", "sparsegpt", "--structure", "2:4"))
        == 0
    )
    report = json.loads((out / "prune_report.json").read_text())
    assert report["totals"]["pruned"] * 2 == report["totals"]["params"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--scope", "global"], 'scope="global" is not defined for method="sparsegpt"'),
        (["--probe"], "--probe filters Wanda or magnitude"),
        (["--allocation", "variant"], "--allocation variant is Wanda's cumulative-score cut"),
    ],
)
def test_cli_bad_sparsegpt_args_exit_2(cli_workspace, tmp_path, capsys, extra, message):
    from gradprobe import cli

    model_dir, text = cli_workspace
    out = tmp_path / "out"
    assert cli.main(prune_argv(model_dir, text, out, "--no-eval", "--method", "sparsegpt", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
