"""CLI and save/load: argument errors (exit 2, nothing written), end to end on a tiny Llama, resume,
atomic save + reload round trip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from text_helpers import char_tokenizer
from tiny_models import prune_argv, save_tiny_checkpoint
from transformers import AutoModelForCausalLM

import gradprobe.api
from gradprobe import cli, io
from gradprobe.config import PruneConfig
from gradprobe.data import calibration_batches, eval_ids
from gradprobe.eval import perplexity

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny random Llama + char tokenizer saved as a safetensors checkpoint, and a text file."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("cli"), num_layers=2)


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _prune_args(model_dir, text, out, *extra):
    evaluation = ("--eval", str(text), "--eval-context", "32", "--eval-windows", "4")
    return prune_argv(model_dir, text, out, *evaluation, "--batch-size", "2", *extra)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sparsity", "1.5"], "must be in [0, 1)"),
        (["--sparsity", "abc"], "must be a number"),
        (["--structure", "3:4"], "invalid choice"),
        (["--method", "obs"], "invalid choice"),
        (["--structure", "2:4", "--sparsity", "0.6"], "conflicts with --structure 2:4"),
        (["--structure", "2:4", "--scope", "global"], "--scope global cannot be combined"),
        (["--nsamples", "0"], "must be >= 1"),
        (["--eval-context", "16", "--eval-stride", "32"], "exceeds the context"),
        (["--calib", "/no/such/file.txt"], "--calib '/no/such/file.txt' is not a text file"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
        (["--seqlen", "100000"], "fewer than one window of seqlen=100000"),
        (["--probe", "--structure", "2:4"], "--probe cannot be combined with --structure 2:4"),
        (["--probe", "--reduction-factor", "0"], "--reduction-factor must be in (0, 1)"),
        (["--probe", "--gradient-threshold", "-1"], "must be >= 0"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(workspace, tmp_path, capsys, extra, message):
    model_dir, text = workspace
    before = _digest(model_dir)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(cli.main(_prune_args(model_dir, text, out, *extra)))
    assert exc_info.value.code == 2
    assert message in capsys.readouterr().err
    assert _listing(tmp_path) == []  # no output, no partial/staging directory
    assert _digest(model_dir) == before


def test_missing_model_and_out_dir_conflicts(workspace, tmp_path, capsys):
    model_dir, text = workspace
    before = _digest(model_dir)
    assert cli.main(_prune_args(tmp_path / "nope", text, tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(_prune_args(model_dir, text, model_dir)) == 2  # never overwrite the source
    assert "overlaps the source model directory" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert cli.main(_prune_args(model_dir, text, busy)) == 2
    assert "not empty" in capsys.readouterr().err
    assert _listing(tmp_path) == ["busy", "busy/keep.txt"]
    assert _digest(model_dir) == before
    with pytest.raises(SystemExit) as exc_info:
        cli.main(["prune", "--model", str(model_dir)])  # --out is required
    assert exc_info.value.code == 2


def test_prune_end_to_end(workspace, tmp_path, capsys):
    model_dir, text = workspace
    before = _digest(model_dir)
    out = tmp_path / "pruned"
    assert cli.main(_prune_args(model_dir, text, out)) == 0
    printed = capsys.readouterr().out
    assert "context 32, stride 32, 4 windows" in printed and "perplexity: dense" in printed
    assert f"calibration: {text}, 4 windows x 32 tokens (seed 0)" in printed
    assert _digest(model_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # staging dir gone
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "prune_report.md",
        "prune_report.json",
        "prune_report.png",
        "gradprobe_run.json",
    } <= names
    assert not any(n.endswith(".bin") for n in names)

    # the output is exactly what gradprobe.prune does to the same model with the same calibration
    pruned = AutoModelForCausalLM.from_pretrained(out)
    ref, tok = io.load_model(model_dir)
    batches = calibration_batches(tok, str(text), nsamples=4, seqlen=32, seed=0)
    gradprobe.api.prune(ref, batches, PruneConfig(nsamples=4, seqlen=32, batch_size=2, progress=False))
    for (name, p), (_, q) in zip(pruned.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    for layer in pruned.model.layers:
        for lin in (
            *(getattr(layer.self_attn, n) for n in LINEARS[:4]),
            *(getattr(layer.mlp, n) for n in LINEARS[4:]),
        ):
            w = lin.weight
            assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), w.shape[1] // 2))

    run = json.loads((out / "gradprobe_run.json").read_text())
    ids = eval_ids(tok, str(text))
    assert run["eval"]["pruned"]["value"] == pytest.approx(
        perplexity(pruned, ids, context=32, max_windows=4, progress=False).value
    )
    assert run["eval"]["dense"]["context"] == 32 and run["eval"]["dense"]["stride"] == 32
    assert json.loads((out / "prune_report.json").read_text())["totals"]["sparsity"] == pytest.approx(0.5)


def test_interrupted_run_resumes_to_the_same_result(workspace, tmp_path, monkeypatch, capsys):
    model_dir, text = workspace
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--method", "wanda", "--no-eval"]
    assert cli.main(_prune_args(model_dir, text, full, *args)) == 0

    real = gradprobe.api.prune

    def crash_after_layer_0(*a, **kw):
        def cb(i, rows):
            if i == 0:
                raise KeyboardInterrupt

        return real(*a, callback=cb, **kw)

    monkeypatch.setattr(gradprobe.api, "prune", crash_after_layer_0)
    assert cli.main(_prune_args(model_dir, text, resumed, *args)) == 130
    assert not resumed.exists() and io.partial_dir(resumed).is_dir()
    # a different configuration does not silently reuse the checkpoints
    assert cli.main(_prune_args(model_dir, text, resumed, *args, "--sparsity", "0.6")) == 2
    assert "different settings" in capsys.readouterr().err

    monkeypatch.setattr(gradprobe.api, "prune", real)
    assert cli.main(_prune_args(model_dir, text, resumed, *args)) == 0
    assert "resuming the interrupted run" in capsys.readouterr().out
    assert not io.partial_dir(resumed).exists()
    assert json.loads((resumed / "prune_report.json").read_text())["resumed_layers"] == [0]
    a = AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_command(workspace, capsys):
    model_dir, text = workspace
    assert (
        cli.main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--eval",
                str(text),
                "--eval-context",
                "32",
                "--eval-stride",
                "16",
                "--eval-windows",
                "3",
                "--device",
                "cpu",
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tok = io.load_model(model_dir)
    want = perplexity(model, eval_ids(tok, str(text)), context=32, stride=16, max_windows=3, progress=False)
    assert (got["context"], got["stride"], got["windows"], got["tokens"]) == (32, 16, 3, want.tokens)
    assert got["value"] == pytest.approx(want.value)


def test_env_command(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "gradprobe._C:" in out and "row_threshold" in out


# --- io.save_pruned / load_model -----------------------------------------------------------------


def test_save_round_trip_and_atomic_refusals(workspace, tmp_path):
    model_dir, _ = workspace
    model, tok = io.load_model(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    out = io.save_pruned(model, tok, tmp_path / "a", report={"note": "test"})
    again = AutoModelForCausalLM.from_pretrained(out)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert json.loads((out / io.REPORT_JSON).read_text()) == {"note": "test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

    with pytest.raises(FileExistsError, match="not empty"):
        io.save_pruned(model, tok, out)
    with pytest.raises(ValueError, match="source model directory"):
        io.save_pruned(model, tok, model_dir, overwrite=True)
    io.save_pruned(model, tok, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_failed_save_leaves_nothing(workspace, tmp_path):
    model_dir, _ = workspace
    model, tok = io.load_model(model_dir)

    class BadReport:
        def save(self, directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_pruned(model, tok, tmp_path / "out", report=BadReport())
    assert list(tmp_path.iterdir()) == []


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        io.load_model(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        io.load_model(tmp_path, dtype="int8")


def test_unsupported_model_family_exit_2(workspace, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, text = workspace
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128, n_positions=64)
    ).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    assert cli.main(_prune_args(src, text, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "unsupported model family 'gpt2'" in err and "llama" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_prune_with_probe_equals_probe_prune_(workspace, tmp_path, capsys):
    model_dir, text = workspace
    out = tmp_path / "probed"
    args = _prune_args(model_dir, text, out, "--probe", "--reduction-factor", "0.2", "--gradient-threshold", "0.1")
    assert cli.main(args) == 0
    capsys.readouterr()
    pruned = AutoModelForCausalLM.from_pretrained(out)
    ref, tok = io.load_model(model_dir)
    batches = calibration_batches(tok, str(text), nsamples=4, seqlen=32, seed=0)
    masks = gradprobe.probe_prune_(
        ref, batches, 0.5, method="wanda", scope="row", reduction_factor=0.2, gradient_threshold=0.1, mode="model"
    ).masks
    for (name, p), (_, q) in zip(pruned.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    report = json.loads((out / "prune_report.json").read_text())
    pruned_count = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert report["totals"]["sparsity"] == pytest.approx(pruned_count / total)
    assert 0 < pruned_count <= total // 2
