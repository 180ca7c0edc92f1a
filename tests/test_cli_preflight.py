"""``gradprobe prune`` / ``eval``: every requirement is checked before the model is loaded (exit 2, one
line, nothing written); the result is saved before anything optional can fail; the record says what
determined the result; printed lines never share a line with a progress bar."""

from __future__ import annotations

import contextlib
import importlib.util
import io as stdio
import json
import stat
import warnings
from pathlib import Path

import pytest
from tiny_models import prune_argv, save_tiny_checkpoint

import gradprobe
from gradprobe import cli, io

TINY_EVAL = ("--eval-context", "32", "--eval-windows", "4", "--batch-size", "2")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("preflight"), num_layers=2)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything is loaded: every check must come first."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the failing check")

    monkeypatch.setattr(io, "load_model", refuse)


def _args(model_dir, text, out, *extra):
    return prune_argv(model_dir, text, out, "--eval", str(text), *TINY_EVAL, *extra)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gradprobe ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _hide_package(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


# ---- up-front failures ---------------------------------------------------------------------------------


def _no_weights(tmp_path, model_dir, pickled=False):
    d = tmp_path / "no-weights"
    d.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (d / f.name).write_bytes(f.read_bytes())
    if pickled:
        (d / "pytorch_model.bin").write_bytes(b"\x80\x02")
    return d


def _sharded_missing(tmp_path, model_dir):
    d = _no_weights(tmp_path, model_dir)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    (d / "model-00002-of-00002.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    return d


# (id, how the argv is changed, what is set up, expected message)
FAILURES = [
    ("config without weights", "model", _no_weights, "has config.json but no *.safetensors weights"),
    ("pickled weights only", "model", lambda t, m: _no_weights(t, m, pickled=True), "never loads pickled weights"),
    ("missing shard", "model", _sharded_missing, "misses weight shard(s) model-00001-of-00002.safetensors"),
    ("out not writable", "out", lambda t, m: Path("/sys/gradprobe-out"), "--out '/sys/gradprobe-out' is not writable"),
    ("out under a file", "out", lambda t, m: (t / "f").write_text("x") and t / "f" / "out", "is a file"),
    ("out inside the source", "out", lambda t, m: m / "pruned", "overlaps the source model directory"),
]


@pytest.mark.parametrize("case", range(len(FAILURES)), ids=[f[0] for f in FAILURES])
def test_requirements_fail_before_loading(workspace, tmp_path, capsys, no_loading, case):
    model_dir, text = workspace
    _, which, setup, message = FAILURES[case]
    target = setup(tmp_path, model_dir)
    model, out = (target, tmp_path / "out") if which == "model" else (model_dir, target)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(_args(model, text, out)) == 2
    assert message in _error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    if which == "model":  # eval checks the same
        assert cli.main(["eval", "--model", str(model), "--device", "cpu"]) == 2
        assert message in _error(capsys)


@pytest.mark.parametrize("cache", ["gradprobe", "huggingface"])
def test_out_inside_a_cache_fails_before_loading(workspace, tmp_path, capsys, monkeypatch, no_loading, cache):
    model_dir, text = workspace
    root = tmp_path / "cache"
    if cache == "gradprobe":
        monkeypatch.setenv("GRADPROBE_CACHE", str(root))
        out = root / "smollm2-135m" / "pruned"
    else:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
        out = root / "hub" / "models--x--y" / "pruned"
    assert cli.main(_args(model_dir, text, out)) == 2
    assert "overlaps" in _error(capsys) and "cache" in capsys.readouterr().err + str(out)
    assert not root.exists()
    # the embedded model (no --model) is loaded from gradprobe's cache: an --out there fails at once too
    monkeypatch.setenv("GRADPROBE_CACHE", str(root))
    assert cli.main(["prune", "--out", str(root / "smollm2-135m"), "--device", "cpu"]) == 2
    assert "gradprobe's cache directory" in _error(capsys)


def test_missing_matplotlib_fails_first_unless_no_plot(workspace, tmp_path, capsys, monkeypatch, no_loading):
    model_dir, text = workspace
    _hide_package(monkeypatch, "matplotlib")
    assert cli.main(_args(model_dir, text, tmp_path / "out")) == 2
    line = _error(capsys)
    assert "matplotlib" in line and "pip install matplotlib" in line and "--no-plot" in line
    assert list(tmp_path.iterdir()) == []
    _hide_package(monkeypatch, "safetensors")
    assert cli.main(["eval", "--model", str(model_dir), "--device", "cpu"]) == 2
    assert "pip install safetensors" in _error(capsys)


def test_no_plot_runs_without_matplotlib_and_a_failing_plot_is_a_warning(workspace, tmp_path, capsys, monkeypatch):
    model_dir, text = workspace
    _hide_package(monkeypatch, "matplotlib")
    out = tmp_path / "noplot"
    assert cli.main(_args(model_dir, text, out, "--no-plot")) == 0
    assert not any(p.suffix == ".png" for p in out.iterdir())
    assert {"model.safetensors", "prune_report.md", "allocation.md", "gradprobe_run.json"} <= {p.name for p in out.iterdir()}
    monkeypatch.undo()

    def broken(self, path):
        raise RuntimeError("no display")

    monkeypatch.setattr(gradprobe.report.PruneReport, "plot", broken)
    out = tmp_path / "broken-plot"
    with pytest.warns(RuntimeWarning, match="prune_report.png not written: RuntimeError: no display"):
        assert cli.main(_args(model_dir, text, out)) == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "prune_report.md" in names and "prune_report.png" not in names


# ---- the record, the files, the console -------------------------------------------------------------


def test_record_permissions_console_and_no_future_warning(workspace, tmp_path, capsys):
    model_dir, text = workspace
    out = tmp_path / "probed"
    both = stdio.StringIO()  # stdout and stderr interleaved, as in `gradprobe prune ... 2>&1 | tee log`
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
            rc = cli.main(_args(model_dir, text, out, "--probe", "--reduction-factor", "0.2", "--gradient-threshold",
                                "0.1", "--probe-mode", "layerwise", "--probe-order", "forward"))
    log = both.getvalue()
    assert rc == 0, log
    for line in log.split("\n"):  # a printed line starts its own line, never after a bar's text
        for word in ("dense perplexity", "pruned perplexity", "pruned ", "saved to"):
            if word in line and "|" in line:
                raise AssertionError(f"{word!r} shares a line with a progress bar: {line!r}")
    assert "dense perplexity:" in log and "(context 32, stride 32, 4 windows" in log

    run = json.loads((out / "gradprobe_run.json").read_text())
    assert run["method"] == "wanda + gradient probe"
    probe = run["probe"]
    assert (probe["reduction_factor"], probe["gradient_threshold"], probe["mode"], probe["order"]) == (
        0.2, 0.1, "layerwise", "forward")
    assert "target" in probe  # an option another module added to the probe group is recorded too
    assert run["arguments"]["seed"] == 0 and run["arguments"]["nsamples"] == 4 and run["arguments"]["probe"] is True
    assert set(run["versions"]) >= {"gradprobe", "torch", "transformers"}
    assert run["calibration"]["nsamples"] == 4 and run["allocation"]["allocation"] == "uniform"
    assert run["command"].startswith("gradprobe prune --model")
    md = (out / "prune_report.md").read_text()
    for needle in ("wanda + gradient probe", "reduction_factor=0.2", "gradient_threshold=0.1", "mode=layerwise",
                   "torch=", "transformers=", "seed"):
        assert needle in md, needle
    assert json.loads((out / "prune_report.json").read_text())["run"]["probe"]["order"] == "forward"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors like every other file


def test_eval_measures_with_the_settings_prune_recorded(workspace, tmp_path, capsys):
    model_dir, text = workspace
    out = tmp_path / "pruned"
    assert cli.main(_args(model_dir, text, out)) == 0
    pruned = json.loads((out / "gradprobe_run.json").read_text())["eval"]["pruned"]
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(out), "--eval", str(text), "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert "as gradprobe prune measured): context 32, stride 32, 4 windows" in captured.err
    got = json.loads(captured.out.strip().splitlines()[-1])
    assert (got["context"], got["windows"], got["tokens"]) == (32, 4, pruned["tokens"])
    assert got["value"] == pytest.approx(pruned["value"])
    # settings given on the command line win
    assert cli.main(["eval", "--model", str(out), "--eval", str(text), "--device", "cpu", "--eval-context", "16",
                     "--eval-windows", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (got["context"], got["windows"]) == (16, 2)


def test_resumed_layers_are_shown(workspace, tmp_path, capsys, monkeypatch):
    model_dir, text = workspace
    out = tmp_path / "resumed"
    real = gradprobe.api.prune

    def stop_after_0(*a, **kw):
        def cb(i, rows):
            if i == 0:
                raise KeyboardInterrupt

        return real(*a, callback=cb, **kw)

    monkeypatch.setattr(gradprobe.api, "prune", stop_after_0)
    assert cli.main(_args(model_dir, text, out, "--no-eval")) == 130
    monkeypatch.setattr(gradprobe.api, "prune", real)
    capsys.readouterr()
    assert cli.main(_args(model_dir, text, out, "--no-eval")) == 0
    captured = capsys.readouterr()
    assert "restored from the checkpoint: layers [0]" in captured.out
    assert "restored 0" in captured.err  # on the progress bar


def test_corrupt_cli_settings_start_cleanly(workspace, tmp_path, capsys):
    model_dir, text = workspace
    out = tmp_path / "o"
    partial = io.partial_dir(out)
    (partial / "checkpoint").mkdir(parents=True)
    (partial / "settings.json").write_text('{"sha256": "0", "da')  # torn write of an old version
    assert cli.main(_args(model_dir, text, out, "--no-eval")) == 0
    assert "discarding" in capsys.readouterr().err
    assert out.is_dir() and not partial.exists()
