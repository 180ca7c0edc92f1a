"""Streamed pruning (gradprobe.stream): one decoder layer in memory, output shard by shard.

The streamed output must equal the in-memory run bit for bit, keep the source's shard names and
index, load with from_pretrained, never touch the source, and resume after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import prune_argv, random_batches, save_tiny_checkpoint, tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM

import gradprobe
from gradprobe import PruneConfig, cli, io
from gradprobe._checkpoint import ResumeStateWarning
from gradprobe.stream import INDEX, StreamedCheckpoint, StreamedWeights, prune_streamed

NS, SEQ, VOCAB = 4, 16, 256


def _cfg(**kw) -> PruneConfig:
    return PruneConfig(device="cpu", progress=False, **kw)


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _state(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").state_dict()


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), f"{k} differs"


def _stream(src: Path, out: Path, config: PruneConfig, batches=None, **kw):
    return prune_streamed(src, out, config, batches, plots=False, **kw)


def _save_sharded(d: Path, model, shard_size: str) -> Path:
    model.save_pretrained(d, max_shard_size=shard_size)
    assert len(list(d.glob("*.safetensors"))) >= 3
    return d


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A 4-layer fp32 tiny Llama saved in several shards (model-0000x-of-0000N + index)."""
    return _save_sharded(tmp_path_factory.mktemp("stream") / "llama-sharded", tiny_llama(num_layers=4, vocab=VOCAB),
                         "200KB")


WANDA = dict(method="wanda")


@pytest.fixture(scope="module")
def wanda_out(sharded, tmp_path_factory):
    """(streamed Wanda output, the groups materialised and the decoder layers then holding real weights)."""
    seen = []
    real = StreamedWeights.materialize

    def spy(self, i):
        real(self, i)
        layers = self.model.model.layers
        seen.append((i, [j for j, layer in enumerate(layers) if not next(layer.parameters()).is_meta]))

    out = tmp_path_factory.mktemp("wanda") / "out"
    before = _digest(sharded)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StreamedWeights, "materialize", spy)
        report = _stream(sharded, out, _cfg(**WANDA), random_batches(NS, SEQ, VOCAB))
    assert _digest(sharded) == before  # the source is never written
    assert report.sparsity == pytest.approx(0.5)
    return out, seen


def _in_memory(model_dir: Path, config: PruneConfig, batches, dtype="auto") -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    gradprobe.prune(model, batches if config.needs_calibration else None, config)
    return model.state_dict()


CASES = {
    "magnitude": dict(method="magnitude"),
    "wanda-row": WANDA,
    "wanda-2:4": dict(method="wanda", structure="2:4"),
    "sparsegpt": dict(method="sparsegpt"),
    "wanda-lm_head": dict(method="wanda", include_lm_head=True),  # lm_head read only for its own step
    "magnitude-per-layer": dict(method="magnitude", sparsity=(0.3, 0.4, 0.5, 0.6)),  # explicit allocation
}


# the default run keeps the cases (magnitude, Wanda row, 2:4); the rest run with -m slow
SLOW_CASES = ("sparsegpt", "wanda-lm_head", "magnitude-per-layer")


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES]
)
def test_streamed_equals_in_memory(sharded, wanda_out, tmp_path, case):
    config, batches = _cfg(**CASES[case]), random_batches(NS, SEQ, VOCAB)
    if case == "wanda-row":
        out = wanda_out[0]
    else:
        out = tmp_path / "out"
        report = _stream(sharded, out, config, batches if config.needs_calibration else None)
        if "sparsity" in CASES[case]:
            assert {r.layer: r.target for r in report.rows} == dict(enumerate(CASES[case]["sparsity"]))
        else:
            assert report.sparsity == pytest.approx(0.5)
        assert not io.partial_dir(out).exists()  # checkpoints and staging are gone after the rename
    _assert_same_weights(_state(out), _in_memory(sharded, config, batches))


def test_one_layer_in_memory_at_a_time(wanda_out):
    """The embeddings only for the calibration capture; then layer i alone holds real weights."""
    assert wanda_out[1] == [(-1, []), (0, [0]), (1, [1]), (2, [2]), (3, [3])]


def test_shard_names_and_index_preserved(sharded, wanda_out):
    out = wanda_out[0]
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    src, dst = json.loads((sharded / INDEX).read_text()), json.loads((out / INDEX).read_text())
    assert dst["weight_map"] == src["weight_map"]
    assert dst["metadata"]["total_size"] == src["metadata"]["total_size"]
    for s in shards:  # each shard holds exactly the source's tensors, with the same dtype and shape
        with safe_open(sharded / s, "pt") as a, safe_open(out / s, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():  # noqa: SIM118 (safe_open has no iterator)
                sa, sb = a.get_slice(k), b.get_slice(k)
                assert (sa.get_dtype(), sa.get_shape()) == (sb.get_dtype(), sb.get_shape())
            assert b.metadata() == a.metadata()
    for f in ("config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (sharded / f).read_bytes()


@pytest.mark.slow  # seconds; keeps the default run inside its budget
def test_single_file_qwen2_with_biases(tmp_path):
    """Unsharded model.safetensors stays one file; biases and norms are copied unchanged."""
    src = tmp_path / "qwen"
    tiny_qwen2(num_layers=2, vocab=VOCAB).save_pretrained(src)
    assert (src / "model.safetensors").is_file() and not (src / INDEX).exists()
    config, batches = _cfg(**WANDA), random_batches(NS, SEQ, VOCAB)
    _stream(src, tmp_path / "out", config, batches)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / INDEX).exists()
    _assert_same_weights(_state(tmp_path / "out"), _in_memory(src, config, batches))


@pytest.mark.slow  # seconds; keeps the default run inside its budget
def test_tied_embeddings(tmp_path):
    """A tied lm_head is not in the checkpoint: streaming accepts it, the output stays tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)
    src = _save_sharded(tmp_path / "tied", LlamaForCausalLM(cfg), "100KB")
    config, batches = _cfg(**WANDA), random_batches(NS, SEQ, VOCAB)
    _stream(src, tmp_path / "out", config, batches)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    _assert_same_weights(got.state_dict(), _in_memory(src, config, batches))
    with pytest.raises(ValueError, match="tied to the input embeddings"):
        _stream(src, tmp_path / "out2", _cfg(method="magnitude", include_lm_head=True))


@pytest.mark.slow  # seconds; keeps the default run inside its budget
def test_bf16_source_and_dtype_override(tmp_path):
    """bf16 shards (tensors copied byte for byte), and dtype=float32 on them: each output is what
    from_pretrained(dtype=...) + prune saves; the config records the new dtype."""
    src = _save_sharded(tmp_path / "bf16", tiny_llama(num_layers=2, vocab=VOCAB).to(torch.bfloat16), "100KB")
    config = _cfg(method="magnitude")
    _stream(src, tmp_path / "same", config)
    _assert_same_weights(_state(tmp_path / "same"), _in_memory(src, config, None))
    _stream(src, tmp_path / "fp32", config, dtype="float32")
    _assert_same_weights(_state(tmp_path / "fp32"), _in_memory(src, config, None, dtype=torch.float32))
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


class _Stop(Exception):
    pass


def test_resume_after_failure_mid_run(sharded, wanda_out, tmp_path):
    config, batches = _cfg(**WANDA), random_batches(NS, SEQ, VOCAB)
    out = tmp_path / "out"

    def stop(i, rows):
        if i == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _stream(sharded, out, config, batches, callback=stop)
    assert not out.exists() and (io.partial_dir(out) / "checkpoint" / "layer_0001.safetensors").is_file()
    report = _stream(sharded, out, config, batches)
    assert report.resumed_layers == [0, 1, 2]  # layer 2 was checkpointed before the callback raised
    _assert_same_weights(_state(out), _state(wanda_out[0]))


@pytest.mark.slow  # seconds; keeps the default run inside its budget
def test_resume_after_failure_while_writing(sharded, tmp_path, monkeypatch):
    """A failure while the output shards are written leaves no output; the rerun restores every layer
    from the verified checkpoints and writes the same result."""
    config = _cfg(method="magnitude")
    out = tmp_path / "out"
    real = StreamedCheckpoint._write_shard
    calls = []

    def fail_second(self, shard, path):
        calls.append(shard)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, shard, path)

    monkeypatch.setattr(StreamedCheckpoint, "_write_shard", fail_second)
    with pytest.raises(OSError, match="No space"):
        _stream(sharded, out, config)
    monkeypatch.setattr(StreamedCheckpoint, "_write_shard", real)
    assert not out.exists()
    report = _stream(sharded, out, config)
    assert report.resumed_layers == [0, 1, 2, 3]
    _assert_same_weights(_state(out), _in_memory(sharded, config, None))


@pytest.mark.slow  # seconds; keeps the default run inside its budget
def test_corrupt_checkpoint_is_redone(sharded, tmp_path):
    """A checkpoint that fails its sha256 is reported and its layer (and the later ones) recomputed."""
    config = _cfg(method="magnitude")
    out = tmp_path / "out"

    def stop(i, rows):
        if i == 3:
            raise _Stop

    with pytest.raises(_Stop):
        _stream(sharded, out, config, callback=stop)
    ck = io.partial_dir(out) / "checkpoint" / "layer_0001.safetensors"
    raw = bytearray(ck.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the last tensor's data
    ck.write_bytes(bytes(raw))
    with pytest.warns(ResumeStateWarning, match="layer_0001.*fails its checksum"):
        report = _stream(sharded, out, config)
    assert report.resumed_layers == [0]
    _assert_same_weights(_state(out), _in_memory(sharded, config, None))


@pytest.mark.slow  # seconds; keeps the default run inside its budget
def test_resume_with_other_settings_is_refused(sharded, tmp_path):
    out = tmp_path / "out"

    def stop(i, rows):
        raise _Stop

    with pytest.raises(_Stop):
        _stream(sharded, out, _cfg(method="magnitude"), callback=stop)
    with pytest.raises(ValueError, match="different run"):
        _stream(sharded, out, _cfg(method="magnitude", sparsity=0.6))
    _stream(sharded, out, _cfg(method="magnitude", sparsity=0.6), resume=False)  # starts over
    assert out.is_dir()


def test_clear_errors_before_any_work(sharded, tmp_path):
    before = _digest(sharded)
    with pytest.raises(ValueError, match="overlaps the source model directory"):
        prune_streamed(sharded, sharded / "pruned", _cfg(method="magnitude"))
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune_streamed(sharded, tmp_path / "o2", _cfg(method="wanda"))
    (tmp_path / "notckpt").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        prune_streamed(tmp_path / "notckpt", tmp_path / "o3", _cfg(method="magnitude"))
    assert _digest(sharded) == before
    assert not any(p.name.startswith((".o1", ".o2", ".o3", "o1", "o2", "o3")) for p in tmp_path.iterdir())


# --- CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("stream-cli"), num_layers=3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--probe"], "--stream cannot be combined with --probe"),
        (["--allocation", "owl"], "--stream cannot be combined with --allocation owl"),
        (["--eval-windows", "2"], "--stream does not evaluate perplexity"),
    ],
)
def test_cli_stream_refuses_options(checkpoint, tmp_path, capsys, extra, message):
    model_dir, text = checkpoint
    argv = prune_argv(model_dir, text, tmp_path / "out", "--stream", *extra)
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_stream_needs_a_local_directory(tmp_path, capsys):
    assert cli.main(["prune", "--stream", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "--stream reads a local checkpoint directory" in capsys.readouterr().err


def test_cli_stream_equals_cli_in_memory(checkpoint, tmp_path, capsys, monkeypatch):
    """An interrupted (Ctrl-C at layer 2) ``--stream`` run, rerun, equals the in-memory CLI run."""
    model_dir, text = checkpoint
    before = _digest(model_dir)
    assert cli.main(prune_argv(model_dir, text, tmp_path / "mem", "--no-eval", "--no-plot")) == 0
    real = StreamedWeights.materialize

    def interrupt(self, i):
        if i == 2:
            raise KeyboardInterrupt
        real(self, i)

    argv = prune_argv(model_dir, text, tmp_path / "str", "--stream", "--no-plot")
    monkeypatch.setattr(StreamedWeights, "materialize", interrupt)
    assert cli.main(argv) == 130
    monkeypatch.setattr(StreamedWeights, "materialize", real)
    assert not (tmp_path / "str").exists()
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "perplexity: skipped with --stream" in printed and "restored from the checkpoint: layers [0, 1]" in printed
    assert _digest(model_dir) == before
    _assert_same_weights(_state(tmp_path / "str"), _state(tmp_path / "mem"))
    run = json.loads((tmp_path / "str" / "gradprobe_run.json").read_text())
    assert run["stream"] is True and run["arguments"]["stream"] is True
    for f in ("tokenizer.json", "prune_report.md", "allocation.md"):
        assert (tmp_path / "str" / f).is_file(), f


# --- peak host memory on a multi-GB model (slow) --------------------------------------------------
def _write_synthetic_llama(d: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    """A random bf16 Llama written one shard per decoder layer, so the generator holds one layer at a
    time; returns the bytes of weights. Each layer's matrices are a random base rolled by a
    layer-dependent offset (a copy, not a fresh draw: generating many GB of randn takes minutes)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    base = {"attn": rnd(hidden, hidden), "in": rnd(inter, hidden), "out": rnd(hidden, inter)}
    ones = torch.ones(hidden, dtype=torch.bfloat16)
    n = layers + 2
    weight_map, total = {}, 0
    for k in range(n):
        if k == 0:
            tensors = {"model.embed_tokens.weight": rnd(vocab, hidden)}
        elif k == n - 1:
            tensors = {"model.norm.weight": ones.clone(), "lm_head.weight": rnd(vocab, hidden)}
        else:
            p = f"model.layers.{k - 1}."
            tensors = {p + "input_layernorm.weight": ones.clone(), p + "post_attention_layernorm.weight": ones.clone()}
            for j, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
                tensors[f"{p}self_attn.{name}.weight"] = base["attn"].roll(7919 * (4 * k + j))
            for j, name in enumerate(("gate_proj", "up_proj")):
                tensors[f"{p}mlp.{name}.weight"] = base["in"].roll(7919 * (2 * k + j))
            tensors[p + "mlp.down_proj.weight"] = base["out"].roll(7919 * k)
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, d / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


LAYERS = 12


@pytest.mark.slow
def test_peak_memory_well_below_model_size(tmp_path):
    """A 5.4 GB bf16 Llama (hidden 4096, intermediate 11008, 12 layers, vocab 32000) pruned with Wanda
    (8 x 128 calibration tokens) in a subprocess: its peak RSS must stay under 35 % of the weights' size.
    The peak is ~0.45 GiB of torch/transformers + ~2.1 x one decoder layer (its weights, the selection's
    temporaries), independent of the number of layers."""
    src = tmp_path / "big"
    size = _write_synthetic_llama(src, layers=LAYERS, hidden=4096, inter=11008, vocab=32000)
    script = textwrap.dedent(f"""
        import json, resource, sys, torch
        from gradprobe import PruneConfig
        from gradprobe.stream import prune_streamed
        batches = torch.randint(0, 32000, (8, 128), generator=torch.Generator().manual_seed(0))
        report = prune_streamed({str(src)!r}, {str(tmp_path / "out")!r},
                                PruneConfig(method="wanda", device="cpu", progress=False), batches, plots=False)
        # VmHWM: this process's own high-water mark. ru_maxrss would not do: Linux carries it across
        # exec, so a child spawned by pytest reports at least pytest's own RSS at the spawn.
        hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
        peak = hwm[0] * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"peak": peak, "sparsity": report.sparsity}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"model {size / 2**30:.2f} GiB, peak RSS {got['peak'] / 2**30:.2f} GiB ({got['peak'] / size:.1%})")
    assert got["sparsity"] == pytest.approx(0.5)
    assert got["peak"] < 0.35 * size
    shard = f"model-00002-of-{LAYERS + 2:05d}.safetensors"
    with safe_open(tmp_path / "out" / shard, "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert (w == 0).sum(dim=1).eq(w.shape[1] // 2).all()  # Wanda row: half of every row pruned
