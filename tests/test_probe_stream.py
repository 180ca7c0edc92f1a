"""The streamed forward/backward (gradprobe.pipeline.backward) and the probe's device / resume options.

* gradients of a streamed backward equal a whole-model ``loss.backward()`` bit for bit on the CPU;
* the probe's masks and G0 / G1 caches are the same streamed or not, in every mode;
* an interrupted probe with ``resume_dir`` continues to the uninterrupted run's weights;
* ``gradprobe prune --probe --device cpu`` killed (SIGKILL) mid-run and rerun gives the same weights.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import prune_argv, random_batches, save_tiny_checkpoint, tiny_model

import gradprobe
from gradprobe.models import get_adapter
from gradprobe.pipeline.backward import StreamedBackward
from gradprobe.probe import _Runner, probe

FAMILIES = ("llama", "mistral", "qwen2")


def _decoder_params(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the decoder layers, the final norm and lm_head (not the embedding)."""
    emb = get_adapter(model).embed(model).weight
    return {n: p for n, p in model.named_parameters() if p is not emb}


def _whole_grads(model, ids, loss=None):
    ps = _decoder_params(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in ps.values():
        p.requires_grad_(True)
    if loss is None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    else:
        loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
    return {n: p.grad.clone() for n, p in ps.items()}


def _streamed_grads(model, ids, loss=None):
    ps = _decoder_params(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in ps.values():
        p.requires_grad_(True)
    runner = _Runner(model, get_adapter(model), [ids], loss)
    runner.model_backward(0)
    return {n: p.grad.clone() for n, p in ps.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_gradients_equal_whole_model_backward(family):
    """Every decoder / head parameter's gradient of the causal-LM loss, bit for bit (torch.equal)."""
    ids = random_batches(2, 24, seed=3)
    a = tiny_model(family, num_layers=3, **({"sliding_window": 8} if family == "mistral" else {}))
    b = copy.deepcopy(a)
    want, got = _whole_grads(a, ids), _streamed_grads(b, ids)
    assert want.keys() == got.keys() and len(want) > 20
    for n in want:
        assert torch.equal(want[n], got[n]), n


def test_streamed_gradients_with_a_user_loss_and_from_a_middle_layer():
    """A user loss on the logits; and the tail from layer 1's input (layerwise mode) equals the whole graph."""
    ids = random_batches(1, 20, seed=4)

    def loss(logits, ids):
        return logits[:, :-1].float().logsumexp(-1).mean()

    a = tiny_model("llama", num_layers=3)
    b = copy.deepcopy(a)
    want, got = _whole_grads(a, ids, loss), _streamed_grads(b, ids, loss)
    for n in want:
        assert torch.equal(want[n], got[n]), n

    c = copy.deepcopy(a)
    runner = _Runner(c, get_adapter(c), [ids], None)
    with torch.no_grad():
        h = runner.run_layer(0, runner.embed(ids))
    layer1 = c.model.layers[1].mlp.down_proj.weight
    for streamed in (False, True):
        layer1.requires_grad_(True)
        runner.streamed = streamed
        runner.tail_backward(1, h, 0)
        g = layer1.grad.clone()
        layer1.grad = None
        layer1.requires_grad_(False)
        if not streamed:
            ref = g
    assert torch.equal(ref, g)


def test_streamed_backward_keeps_one_layer_graph():
    """The streamer's contract on a toy stack: input grads only where needed, recompute flag, scalar loss."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(3))
    seen = []

    def run_layer(j, h):
        seen.append((j, torch.is_grad_enabled()))
        return torch.tanh(layers[j](h))

    x = torch.randn(2, 5, 6)
    y = x
    for lin in layers:
        y = torch.tanh(lin(y))
    (y ** 2).sum().backward()
    want = [lin.weight.grad.clone() for lin in layers]
    for lin in layers:
        lin.weight.grad = lin.bias.grad = None
    s = StreamedBackward(run_layer)
    loss = s(x, 0, 3, lambda h: (h ** 2).sum())
    assert loss.dim() == 0 and not loss.requires_grad and x.grad is None
    assert seen == [(0, False), (1, False), (2, False), (2, True), (1, True), (0, True)]
    for lin, w in zip(layers, want, strict=True):
        assert torch.equal(lin.weight.grad, w)
        lin.weight.grad = lin.bias.grad = None
    StreamedBackward(run_layer, store="cpu")(x, 0, 3, lambda h: (h ** 2).sum())  # boundaries kept on the host
    for lin, w in zip(layers, want, strict=True):
        assert torch.equal(lin.weight.grad, w)
    with pytest.raises(ValueError, match="scalar"):
        s(x, 0, 1, lambda h: h.sum(-1))


SLOW = pytest.mark.slow
CASES = [
    pytest.param(dict(mode="model", method="wanda", scope="row"), id="model-wanda-row"),
    pytest.param(dict(mode="model", method="magnitude", scope="global", target="exact"), id="model-exact-global",
                 marks=SLOW),
    pytest.param(dict(mode="layerwise", method="wanda", scope="row"), id="layerwise-wanda-row", marks=SLOW),
    pytest.param(dict(mode="layerwise", method="wanda", scope="layer", order="forward"), id="layerwise-forward",
                 marks=SLOW),
    pytest.param(dict(mode="layerwise", method="wanda", scope="global"), id="layerwise-wanda-global"),
]


@pytest.mark.parametrize("kw", CASES)
def test_probe_streamed_equals_whole_graph(kw):
    """Masks and the G0 / G1 caches: streamed == whole-graph, bit for bit on the CPU."""
    batches = random_batches(2, 12, seed=7)
    a = tiny_model("qwen2", num_layers=2)
    b = copy.deepcopy(a)
    ra = probe(a, batches, 0.5, streamed=False, **kw)
    rb = probe(b, batches, 0.5, streamed=True, device="cpu", **kw)
    assert ra.tensors.keys() == rb.tensors.keys()
    for n, ta in ra.tensors.items():
        tb = rb.tensors[n]
        assert torch.equal(ta.g0, tb.g0) and torch.equal(ta.g1, tb.g1), n
        assert torch.equal(ta.mask, tb.mask), n
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_device_and_streamed_arguments():
    m = tiny_model("llama", num_layers=1)
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="device must be None or a torch device"):
        gradprobe.probe_prune_(m, random_batches(1, 8), 0.5, device="gpu7")
    with pytest.raises(TypeError, match="streamed must be True or False"):
        gradprobe.probe_prune_(m, random_batches(1, 8), 0.5, streamed="yes")
    with pytest.raises(TypeError, match="resume_dir must be None or a directory path"):
        gradprobe.probe_prune_(m, random_batches(1, 8), 0.5, resume_dir=3)
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters(), strict=True))


# ---- resume -------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@pytest.mark.parametrize("kw", [
    pytest.param(dict(mode="layerwise", order="reverse"), id="layerwise-reverse"),
    pytest.param(dict(mode="regional", order="forward"), id="regional-forward", marks=SLOW),
    pytest.param(dict(mode="layerwise", order="forward", scope="global"), id="layerwise-forward-global", marks=SLOW),
    pytest.param(dict(mode="model"), id="model", marks=SLOW),
    pytest.param(dict(mode="model", target="exact", scope="layer"), id="model-exact", marks=SLOW)])
def test_interrupted_probe_resumes_to_the_same_weights(tmp_path, monkeypatch, kw):
    """Stopped after the first checkpoint (a layer; model mode: the G0 pass) by an exception (the model is
    dense again), rerun with the same resume_dir on the dense model: the finished part is restored, the
    rest probed, and the weights equal an uninterrupted run's; a third run restores everything."""
    from gradprobe import probe as probe_mod

    batches = random_batches(2, 12, seed=11)
    dense = tiny_model("llama", num_layers=2)
    ref = copy.deepcopy(dense)
    want = probe(ref, batches, 0.5, **kw)

    name = "save_g0" if kw["mode"] == "model" else "save"
    real = getattr(probe_mod._Resume, name)

    def save_then_stop(self, *a, **k):
        real(self, *a, **k)
        raise _Stop

    monkeypatch.setattr(probe_mod._Resume, name, save_then_stop)
    first = copy.deepcopy(dense)
    with pytest.raises(_Stop):
        probe(first, batches, 0.5, resume_dir=tmp_path, **kw)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), dense.parameters(), strict=True))
    monkeypatch.setattr(probe_mod._Resume, name, real)

    again = copy.deepcopy(dense)
    got = probe(again, batches, 0.5, resume_dir=tmp_path, **kw)
    if kw["mode"] == "model":
        assert got.passes == 1 and got.info["resumed_g0"] and got.info["resumed_layers"] == []
    else:
        first_layer = 1 if kw["order"] == "reverse" else 0
        assert got.info["resumed_layers"] == [first_layer] and got.passes == 2
    for (n, p), q in zip(again.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert got.masks.keys() == want.masks.keys()
    assert all(torch.equal(got.masks[n], want.masks[n]) for n in want.masks)

    third = copy.deepcopy(dense)
    done = probe(third, batches, 0.5, resume_dir=tmp_path, **kw)
    assert done.passes == 0 and done.info["resumed_layers"] == [0, 1]
    assert all(torch.equal(p, q) for p, q in zip(third.parameters(), ref.parameters(), strict=True))


def test_resume_dir_rejects_another_run_or_a_changed_model(tmp_path):
    batches = random_batches(1, 12, seed=11)
    probe(tiny_model("llama", num_layers=2), batches, 0.5, mode="regional", resume_dir=tmp_path)
    with pytest.raises(ValueError, match="different run"):
        probe(tiny_model("llama", num_layers=2), batches, 0.4, mode="regional", resume_dir=tmp_path)
    other = tiny_model("llama", num_layers=2, seed=1)
    with pytest.raises(ValueError, match="differ from the dense model"):
        probe(other, batches, 0.5, mode="regional", resume_dir=tmp_path)


# ---- the CLI: kill -9 mid-run and resume --------------------------------------------------------

KILL_AFTER_SAVES = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from gradprobe import cli, probe

    n = {n}

    def wrap(real):
        def save(self, *a, **k):
            real(self, *a, **k)
            if len(self.state.state["finished"]) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return save

    if n:
        probe._Resume.save, probe._Resume.save_g0 = wrap(probe._Resume.save), wrap(probe._Resume.save_g0)
    raise SystemExit(cli.main({argv!r}))
""")


def _cli_run(argv, kill_after: int) -> subprocess.CompletedProcess:
    script = KILL_AFTER_SAVES.format(tests=str(Path(__file__).parent), n=kill_after, argv=argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # three subprocesses, each importing torch and transformers (~10 s each on 2 cores)
@pytest.mark.parametrize("mode", ["layerwise", "model"])
def test_cli_probe_killed_mid_run_resumes_to_identical_weights(tmp_path, mode):
    """layerwise: killed after 2 of 3 layers are checkpointed; model: after the G0 pass is checkpointed."""
    from transformers import AutoModelForCausalLM

    model_dir, text = save_tiny_checkpoint(tmp_path / "src", num_layers=3)
    extra = ("--no-eval", "--no-plot", "--probe", "--probe-mode", mode, "--device", "cpu", "--resume")
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    done = _cli_run(prune_argv(model_dir, text, ref_out, *extra), 0)
    assert done.returncode == 0, done.stderr
    killed = _cli_run(prune_argv(model_dir, text, out, *extra), 2 if mode == "layerwise" else 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    again = _cli_run(prune_argv(model_dir, text, out, *extra), 0)
    assert again.returncode == 0, again.stderr
    assert "resuming the interrupted run" in again.stdout
    if mode == "layerwise":
        assert "restored from the checkpoint: layers [1, 2]" in again.stdout
    else:
        assert "restored the probe's G0 pass from the checkpoint" in again.stdout
    a = AutoModelForCausalLM.from_pretrained(ref_out)
    b = AutoModelForCausalLM.from_pretrained(out)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert any(bool((p == 0).any()) for n, p in b.named_parameters() if "layers.0." in n)


@pytest.mark.parametrize("mode", ["model", "layerwise", pytest.param("regional", marks=SLOW)])
def test_one_decoder_layer_held_at_a_time(monkeypatch, mode):
    """With the layers living away from the device (forced here: home == device, so every move is a no-op
    and the result must not change), every decoder layer runs inside its own hold and no two are held at
    once; the masks equal the plain run's."""
    import contextlib

    from gradprobe import probe as probe_mod
    from gradprobe.pipeline import gradients

    batches = random_batches(2, 12, seed=5)
    a = tiny_model("llama", num_layers=2)
    b = copy.deepcopy(a)
    want = probe(a, batches, 0.5, mode=mode).masks

    real_init, layers, held, most = probe_mod._Runner.__init__, [], [], [0]

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        self.moves = True
        layers[:] = list(self.layers)

    @contextlib.contextmanager
    def held_on(device, *modules):
        mine = [m for m in modules if any(m is x for x in layers)]
        held.extend(mine)
        most[0] = max(most[0], len(held))
        try:
            yield
        finally:
            for m in mine:
                held.remove(m)

    def run_layer(self, j, hidden, real=probe_mod._Runner.run_layer):
        assert any(m is self.layers[j] for m in held), f"layer {j} ran outside its hold"
        return real(self, j, hidden)

    monkeypatch.setattr(probe_mod._Runner, "__init__", init)
    monkeypatch.setattr(gradients, "held_on", held_on)
    monkeypatch.setattr(probe_mod._Runner, "run_layer", run_layer)
    got = probe(b, batches, 0.5, mode=mode, device="cpu").masks
    assert most[0] == 1 and not held
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
