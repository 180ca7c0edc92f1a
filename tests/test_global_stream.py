"""Scope "global" without every weight in memory (gradprobe.pipeline.global_scope).

* select_global (histogram passes over visited tensors) equals gradprobe.global_prune_ bit for bit:
  masks, pruned weights and the threshold triple, on awkward shapes, ties and half-precision weights.
* prune_streamed(scope="global") equals the in-memory global run bit for bit, one layer in memory at a
  time, and resumes after an interruption in either pass.
* under torch.distributed (gloo, 2 and 3 ranks) each rank scores a share of the tensors, the integer
  histograms are summed, and every rank gets the masks of one process: the ``global_split`` and
  ``stream_global`` cases of tests/dist_worker.py, checked by tests/test_distributed.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import random_batches, tiny_llama
from transformers import AutoModelForCausalLM

import gradprobe
from gradprobe import PruneConfig, io
from gradprobe.pipeline import global_scope
from gradprobe.pipeline.global_scope import select_global
from gradprobe.select import global_prune_, kth_threshold, num_pruned
from gradprobe.stream import StreamedWeights, prune_streamed

NS, SEQ, VOCAB = 4, 16, 256


# --- the op: select_global vs global_prune_ ---------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _visit(ws, ns, order=None):
    order = range(len(ws)) if order is None else order
    return lambda: ((j, ws[j], None if ns is None else ns[j]) for j in order)


def _check_equal(ws, ns, sparsity, order=None):
    want_w = [w.clone() for w in ws]
    want = global_prune_(want_w, sparsity, norms=ns)
    triple = kth_threshold(ws, sparsity, norm=ns, scope="global")
    sel = select_global(_visit(ws, ns, order), [w.numel() for w in ws], sparsity)
    assert _bits(sel.threshold).item() == _bits(triple.value).item()
    assert (sel.take, sel.equal) == (int(triple.take), int(triple.equal))
    got_w = [w.clone() for w in ws]
    # masks of single tensors, in reverse order: each one needs only its own tensor
    got = {j: sel.prune_(j, got_w[j], None if ns is None else ns[j]) for j in reversed(range(len(ws)))}
    for j in range(len(ws)):
        assert torch.equal(got[j], want[j]), (j, sparsity)
        assert torch.equal(_bits(got_w[j]), _bits(want_w[j])), (j, sparsity)
    assert sum(int(m.sum()) for m in got.values()) == sel.k


def _integer_weights(g, shapes, dtype, lo=-4, hi=5):
    return [torch.randint(lo, hi, s, generator=g).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wanda", [False, True])
def test_equals_global_prune_on_ties_and_awkward_shapes(dtype, wanda, monkeypatch):
    """Integer weights: most scores tie, so the tie rule across tensors decides; shapes of one element,
    one row, one column; scores formed 300 at a time, so ties carry across chunks and tensors."""
    monkeypatch.setattr(global_scope, "CHUNK", 300)
    g = torch.Generator().manual_seed(int(wanda) * 10 + WEIGHT_SEED[dtype])
    shapes = [(1, 1), (3, 257), (129, 1), (1, 64), (7, 13), (40, 30)]
    ws = _integer_weights(g, shapes, dtype)
    ws[1][0, 5] = -0.0  # -0.0 and +0.0 score alike
    ns = None
    if wanda:  # integer norms keep exact ties between products; some zero channels
        ns = [torch.randint(0, 3, (w.shape[1],), generator=g).float() for w in ws]
    for s in (0.0, 1e-7, 0.25, 0.5, 0.6180339, 0.999):
        _check_equal(ws, ns, s)


WEIGHT_SEED = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_global_prune_on_continuous_scores(dtype):
    """Scores spread over many binades (the threshold's low digits matter), visited in any order."""
    g = torch.Generator().manual_seed(7)
    ws = [(torch.randn(s, generator=g) * torch.logspace(-6, 3, s[1])).to(dtype) for s in [(40, 96), (8, 300), (64, 64)]]
    ns = [torch.rand(w.shape[1], generator=g) * 10 for w in ws]
    for s in (0.1, 0.5, 0.9):
        _check_equal(ws, ns, s, order=[2, 0, 1])
        _check_equal(ws, None, s)


def test_all_scores_equal_and_overflowing_products():
    """One value everywhere (the whole group ties: the first k in group order), and products that
    overflow fp32 to +inf (the largest key)."""
    ws = [torch.full((5, 6), 2.0), torch.full((3, 6), 2.0), torch.full((1, 1), 2.0)]
    _check_equal(ws, None, 0.5)
    big = [torch.tensor([[3e38, 1.0], [2.0, 3e38]]), torch.tensor([[5.0, 3e38]])]
    ns = [torch.tensor([10.0, 1.0]), torch.tensor([1.0, 10.0])]
    for s in (0.3, 0.6, 0.8):
        _check_equal(big, ns, s)


def test_bad_visits_are_clear_errors():
    ws = [torch.randn(4, 4), torch.randn(2, 4)]
    numels = [16, 8]
    with pytest.raises(ValueError, match=r"weights\[1\] was visited 0 times"):
        select_global(lambda: iter([(0, ws[0], None)]), numels, 0.5)
    with pytest.raises(ValueError, match=r"weights\[0\] was visited 2 times"):
        select_global(lambda: iter([(0, ws[0], None), (0, ws[0], None), (1, ws[1], None)]), numels, 0.5)
    with pytest.raises(ValueError, match="numels"):
        select_global(_visit(ws, None), [16, 9], 0.5)
    with pytest.raises(ValueError, match="for every tensor"):
        select_global(lambda: iter([(0, ws[0], torch.ones(4)), (1, ws[1], None)]), numels, 0.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        select_global(_visit(ws, None), numels, 1.0)
    bad = [ws[0], ws[1].clone()]
    bad[1][1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or Inf \(first at index \(1, 2\)\)"):
        select_global(_visit(bad, None), numels, 0.5)


def test_weights_that_change_between_passes_are_detected():
    g = torch.Generator().manual_seed(0)
    ws = _integer_weights(g, [(8, 8), (8, 8)], torch.float32)
    sel = select_global(_visit(ws, None), [64, 64], 0.5)
    changed = ws[0].clone()
    changed[changed.abs() == sel.threshold] = 100.0
    with pytest.raises(ValueError, match="changed between the passes"):
        sel.mask(0, changed)


# --- the pipeline: prune_streamed(scope="global") ----------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A 3-layer fp32 tiny Llama in several shards (untied lm_head, so it can be pruned too)."""
    d = tmp_path_factory.mktemp("gstream") / "llama"
    tiny_llama(num_layers=3, vocab=VOCAB).save_pretrained(d, max_shard_size="200KB")
    assert len(list(d.glob("*.safetensors"))) >= 3
    return d


def _cfg(**kw) -> PruneConfig:
    return PruneConfig(device="cpu", progress=False, scope="global", **kw)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").state_dict()


def _in_memory(model_dir: Path, config: PruneConfig, batches) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    gradprobe.prune(model, batches if config.needs_calibration else None, config)
    return model.state_dict()


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


CASES = {
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "wanda-lm_head-0.7": dict(method="wanda", include_lm_head=True, sparsity=0.7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_global_equals_in_memory(sharded, tmp_path, monkeypatch, case):
    config = _cfg(**CASES[case])
    batches = random_batches(NS, SEQ, VOCAB) if config.needs_calibration else None
    real = StreamedWeights.materialize
    seen = []

    def spy(self, i):  # every decoder layer but the one asked for stays on the meta device
        real(self, i)
        layers = self.model.model.layers
        seen.append((i, [j for j, layer in enumerate(layers) if not next(layer.parameters()).is_meta]))

    monkeypatch.setattr(StreamedWeights, "materialize", spy)
    report = prune_streamed(sharded, tmp_path / "out", config, batches, plots=False)
    monkeypatch.setattr(StreamedWeights, "materialize", real)
    assert report.total_pruned == num_pruned(report.total_params, config.sparsity)  # exact: one group
    assert not io.partial_dir(tmp_path / "out").exists()
    _assert_same(_state(tmp_path / "out"), _in_memory(sharded, config, batches))
    assert all(real_layers in ([], [i]) for i, real_layers in seen)  # one decoder layer at a time
    groups = list(range(3 + int(config.include_lm_head)))  # 3 decoder layers (+ lm_head)
    # (embeddings + dense norms over the decoder layers), 2 histogram passes, the mask pass
    norms_pass = [-1, 0, 1, 2] if config.needs_calibration else []
    assert [i for i, _ in seen] == norms_pass + groups * 3


@pytest.mark.parametrize("stop_at", ["norms", "masks"])
def test_streamed_global_resumes(sharded, tmp_path, monkeypatch, stop_at):
    """Interrupted in the dense-norm pass (layer 2) or in the mask pass (group 1): the rerun restores
    what was checkpointed and equals the in-memory run."""
    config = _cfg(method="wanda", include_lm_head=True)
    batches = random_batches(NS, SEQ, VOCAB)
    real = StreamedWeights.materialize
    calls = []

    def interrupt(self, i):
        calls.append(i)
        # norms pass: groups -1, 0, 1, 2; then 2 x (0..3) histogram passes; the mask pass starts at call 13
        if (stop_at == "norms" and len(calls) == 4) or (stop_at == "masks" and len(calls) == 15):
            raise KeyboardInterrupt
        real(self, i)

    monkeypatch.setattr(StreamedWeights, "materialize", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prune_streamed(sharded, tmp_path / "out", config, batches, plots=False)
    monkeypatch.setattr(StreamedWeights, "materialize", real)
    partial = io.partial_dir(tmp_path / "out") / "checkpoint"
    kinds = sorted(p.name.split("_")[0] for p in partial.glob("*.safetensors"))
    assert kinds == (["norms"] * 2 if stop_at == "norms" else ["layer"] * 2 + ["norms"] * 3), kinds
    report = prune_streamed(sharded, tmp_path / "out", config, batches, plots=False)
    assert report.resumed_layers == ([0, 1] if stop_at == "norms" else [0, 1, 2])
    _assert_same(_state(tmp_path / "out"), _in_memory(sharded, config, batches))


def test_cli_stream_scope_global_equals_in_memory(tmp_path):
    """``gradprobe prune --stream --scope global`` writes what the in-memory ``--scope global`` run writes."""
    from safetensors.torch import load_file
    from tiny_models import prune_argv, save_tiny_checkpoint

    from gradprobe import cli

    model_dir, text = save_tiny_checkpoint(tmp_path / "ckpt", num_layers=2)
    extra = ("--no-eval", "--no-plot", "--scope", "global")
    assert cli.main(prune_argv(model_dir, text, tmp_path / "mem", *extra)) == 0
    assert cli.main(prune_argv(model_dir, text, tmp_path / "str", "--stream", *extra)) == 0
    a, b = load_file(str(tmp_path / "mem" / "model.safetensors")), load_file(str(tmp_path / "str" / "model.safetensors"))
    _assert_same(b, a)
    linears = [k for k in a if k.endswith("proj.weight")]
    zeros, total = sum(int((a[k] == 0).sum()) for k in linears), sum(a[k].numel() for k in linears)
    assert zeros == total // 2  # one group: exactly floor(0.5 * total) pruned (the random weights hold no zeros)


@pytest.mark.slow
def test_streamed_global_peak_memory(tmp_path):
    """A 2.5 GiB bf16 Llama (hidden 2048, intermediate 5504, 24 layers, vocab 32000) pruned with magnitude
    scope "global" in a subprocess: three reads of every layer, one layer in memory at a time. Measured
    0.84 GiB peak (VmHWM) = 33 % of the weights: ~0.45 GiB of torch/transformers, then about one layer,
    its masks and the checkpoint write, whatever the number of layers; it must stay under half."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    from test_stream import _write_synthetic_llama

    src = tmp_path / "big"
    size = _write_synthetic_llama(src, layers=24, hidden=2048, inter=5504, vocab=32000)
    script = textwrap.dedent(f"""
        import json
        from gradprobe import PruneConfig
        from gradprobe.stream import prune_streamed
        report = prune_streamed({str(src)!r}, {str(tmp_path / "out")!r},
                                PruneConfig(method="magnitude", scope="global", device="cpu", progress=False),
                                plots=False)
        hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
        print(json.dumps({{"peak": hwm[0] * 1024, "pruned": report.total_pruned, "total": report.total_params}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"model {size / 2**30:.2f} GiB, peak RSS {got['peak'] / 2**30:.2f} GiB ({got['peak'] / size:.1%})")
    assert got["pruned"] == num_pruned(got["total"], 0.5)
    assert got["peak"] < 0.5 * size
