"""Fault injection: corrupted / truncated resume state, disk full during a run, kill -9 at many points.

Every case checks that nothing is lost: the output is complete or absent, the source model is never
touched, and a rerun either resumes (bit-identical to an uninterrupted run) or starts cleanly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import prune_argv, random_batches, save_tiny_checkpoint, tiny_llama
from transformers import AutoModelForCausalLM

import gradprobe
from gradprobe import PruneConfig, cli, io
from gradprobe._checkpoint import ResumeStateWarning

NS, SEQ = 4, 32


def _cfg(**kw):
    kw.setdefault("progress", False)
    return PruneConfig(**kw)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Stop(Exception):
    pass


def _interrupted_run(resume_dir: Path, scope: str = "row", stop_after: int = 1):
    """Prune a 3-layer tiny Llama with checkpoints, stopping after layer ``stop_after``."""

    def stop(i, rows):
        if i == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        gradprobe.prune(tiny_llama(num_layers=3), random_batches(NS, SEQ), _cfg(scope=scope),
                        resume_dir=resume_dir, callback=stop)


class _References(dict):
    """state dicts of uninterrupted runs, per scope, computed on first use."""

    def __missing__(self, scope):
        m = tiny_llama(num_layers=3)
        gradprobe.prune(m, random_batches(NS, SEQ), _cfg(scope=scope))
        self[scope] = _weights(m)
        return self[scope]


@pytest.fixture(scope="module")
def reference():
    return _References()


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _corrupt_state_value(path: Path) -> None:
    """A well-formed state.json whose content was changed without its checksum (a pruned count)."""
    state = json.loads(path.read_text())
    state["finished"]["0"]["rows"][0]["pruned"] += 1
    path.write_text(json.dumps(state))


# (what is damaged, how, which layers the rerun may restore)
SLOW = pytest.mark.slow  # the default run keeps one case of each kind (each case prunes 3 times)
STATE_FAULTS = [
    pytest.param("layer_0001.safetensors", _flip_byte, [0], id="layer1-bitflip"),
    pytest.param("layer_0001.safetensors", _truncate, [0], id="layer1-truncated", marks=SLOW),
    pytest.param("layer_0000.safetensors", _flip_byte, [], id="layer0-bitflip", marks=SLOW),
    pytest.param("layer_0000.safetensors", lambda p: p.write_bytes(b""), [], id="layer0-empty", marks=SLOW),
    pytest.param("state.json", _truncate, [0, 1], id="state-truncated"),
    pytest.param("state.json", lambda p: p.write_text("{"), [0, 1], id="state-garbage", marks=SLOW),
    pytest.param("state.json", _corrupt_state_value, [0, 1], id="state-edited", marks=SLOW),
    pytest.param("state.json", lambda p: p.unlink(), None, id="state-missing", marks=SLOW),  # a fresh run
]


@pytest.mark.parametrize("target,damage,resumed", STATE_FAULTS)
def test_corrupt_resume_state_is_detected_and_the_run_restarts_from_the_last_good_layer(
        tmp_path, reference, target, damage, resumed):
    _interrupted_run(tmp_path)
    damage(tmp_path / target)
    model = tiny_llama(num_layers=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = gradprobe.prune(model, random_batches(NS, SEQ), _cfg(), resume_dir=tmp_path)
    reports = [str(w.message) for w in caught if issubclass(w.category, ResumeStateWarning)]
    if resumed is None:
        assert rep.resumed_layers == [] and not reports
    else:
        assert rep.resumed_layers == resumed
        assert reports and target.split(".")[0] in reports[0], reports  # reported, naming the file
    got = _weights(model)
    assert all(torch.equal(got[k], v) for k, v in reference["row"].items())  # never a mixed state
    # the state is whole again: a third run restores every layer without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeStateWarning)
        again = gradprobe.prune(tiny_llama(num_layers=3), random_batches(NS, SEQ), _cfg(), resume_dir=tmp_path)
    assert again.resumed_layers == [0, 1, 2]


@pytest.mark.slow
def test_corrupt_norms_checkpoint_of_global_scope(tmp_path, reference):
    _interrupted_run(tmp_path, scope="global")
    _flip_byte(tmp_path / "norms_0001.safetensors")
    model = tiny_llama(num_layers=3)
    with pytest.warns(ResumeStateWarning, match="norms_0001"):
        rep = gradprobe.prune(model, random_batches(NS, SEQ), _cfg(scope="global"), resume_dir=tmp_path)
    assert rep.resumed_layers == [0]
    got = _weights(model)
    assert all(torch.equal(got[k], v) for k, v in reference["global"].items())


@pytest.mark.slow
def test_checkpoint_of_another_run_is_not_mixed_in(tmp_path, reference):
    mine = tmp_path / "mine"
    _interrupted_run(mine)
    # a foreign layer file (same shapes, another run's identity) replaces layer 1
    foreign = tmp_path / "foreign"
    with pytest.raises(_Stop):
        gradprobe.prune(tiny_llama(num_layers=3), random_batches(NS, SEQ, seed=5), _cfg(),
                        resume_dir=foreign, callback=lambda i, r: (_ for _ in ()).throw(_Stop) if i == 1 else None)
    (mine / "layer_0001.safetensors").write_bytes((foreign / "layer_0001.safetensors").read_bytes())
    model = tiny_llama(num_layers=3)
    with pytest.warns(ResumeStateWarning, match="another run"):
        rep = gradprobe.prune(model, random_batches(NS, SEQ), _cfg(), resume_dir=mine)
    assert rep.resumed_layers == [0]
    got = _weights(model)
    assert all(torch.equal(got[k], v) for k, v in reference["row"].items())


# ---- CLI: disk full and kill -9 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("faults"), num_layers=2)


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _argv(model_dir, text, out, *extra):
    return prune_argv(model_dir, text, out, "--no-eval", "--batch-size", "2", *extra)


@pytest.fixture(scope="module")
def cli_reference(workspace, tmp_path_factory):
    model_dir, text = workspace
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cli.main(_argv(model_dir, text, out)) == 0
    return _weights(AutoModelForCausalLM.from_pretrained(out)), sorted(p.name for p in out.iterdir())


def _assert_complete(out: Path, cli_reference) -> None:
    want, names = cli_reference
    assert sorted(p.name for p in out.iterdir()) == names
    got = _weights(AutoModelForCausalLM.from_pretrained(out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    json.loads((out / "gradprobe_run.json").read_text())


class _Writes:
    """Counts write events (checkpoint saves, file writes, renames) and fails the n-th one."""

    def __init__(self, n: int, fail):
        self.n, self.count, self.fail = n, 0, fail

    def hit(self):
        self.count += 1
        if self.count == self.n:
            self.fail()


def _install_write_hooks(monkeypatch, counter: _Writes) -> None:
    import safetensors.torch as st

    real_save, real_write, real_replace, real_rename = st.save_file, Path.write_text, os.replace, os.rename

    def save_file(*a, **k):
        counter.hit()
        return real_save(*a, **k)

    def write_text(self, *a, **k):
        counter.hit()
        return real_write(self, *a, **k)

    def replace(*a, **k):
        counter.hit()
        return real_replace(*a, **k)

    def rename(*a, **k):
        counter.hit()
        return real_rename(*a, **k)

    monkeypatch.setattr(st, "save_file", save_file)
    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)


def _enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def write_events(workspace, tmp_path_factory) -> int:
    """How many write events a clean run has (the fault points are chosen among them)."""
    model_dir, text = workspace
    counter = _Writes(10**9, lambda: None)
    with pytest.MonkeyPatch.context() as mp:
        _install_write_hooks(mp, counter)
        assert cli.main(_argv(model_dir, text, tmp_path_factory.mktemp("count") / "out")) == 0
    return counter.count


# n-th write event; negative: counted from the last (-1: the final rename)
ENOSPC_POINTS = [1, pytest.param(2, marks=SLOW), pytest.param(4, marks=SLOW), pytest.param(7, marks=SLOW),
                 pytest.param(11, marks=SLOW), pytest.param(-3, marks=SLOW), -2, pytest.param(-1, marks=SLOW)]


@pytest.mark.parametrize("point", ENOSPC_POINTS)
def test_disk_full_gives_a_clear_error_no_partial_output_and_the_rerun_resumes(
        monkeypatch, workspace, tmp_path, capsys, cli_reference, write_events, point):
    model_dir, text = workspace
    before = _digest(model_dir)
    n = point if point > 0 else write_events + 1 + point
    out = tmp_path / "out"
    _install_write_hooks(monkeypatch, _Writes(n, _enospc))
    capsys.readouterr()
    assert cli.main(_argv(model_dir, text, out)) == 1
    err = capsys.readouterr().err
    assert "gradprobe prune: error: [Errno 28] No space left on device" in err and "Traceback" not in err, err
    assert not out.exists()  # no partial output
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers in ([], [io.partial_dir(out).name]), leftovers  # at most the resume state
    monkeypatch.undo()
    assert cli.main(_argv(model_dir, text, out)) == 0
    _assert_complete(out, cli_reference)
    assert not io.partial_dir(out).exists()
    assert _digest(model_dir) == before


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import safetensors.torch as st
    from gradprobe import cli

    n, count = {n}, [0]

    def hit():
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(obj, name):
        real = getattr(obj, name)
        def f(*a, **k):
            hit()
            return real(*a, **k)
        setattr(obj, name, f)

    wrap(st, "save_file"); wrap(Path, "write_text"); wrap(os, "replace"); wrap(os, "rename")
    raise SystemExit(cli.main({argv!r}))
""")


def _killed_run(argv, n: int) -> int:
    """Run ``gradprobe prune argv`` in a subprocess that SIGKILLs itself at write event ``n`` (0: never)."""
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), n=n, argv=argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode


def _kill_case(workspace, tmp_path, cli_reference, n: int, total: int) -> None:
    model_dir, text = workspace
    before = _digest(model_dir)
    out = tmp_path / f"out{n}"
    argv = _argv(model_dir, text, out)
    rc = _killed_run(argv, n)
    assert rc == -signal.SIGKILL, f"the run was not killed at write event {n} of {total} (rc {rc})"
    if out.exists():  # killed after the rename: the output must be whole
        _assert_complete(out, cli_reference)
    else:  # rerun (a fresh process, as a user would): resumes from the checkpoints or starts cleanly
        assert _killed_run(argv, 0) == 0
        _assert_complete(out, cli_reference)
    assert not any(p.name.startswith(f".out{n}.tmp") for p in tmp_path.iterdir())
    assert _digest(model_dir) == before


@pytest.mark.slow  # ~18 s on the shared 2-core machine, nearly all of it the subprocess importing torch
def test_kill_9_at_a_random_point(workspace, tmp_path, cli_reference, write_events):
    """SIGKILL at a seeded random write event (a checkpoint write, the save, a rename). One subprocess:
    most of its time is importing torch and transformers."""
    import random

    _kill_case(workspace, tmp_path, cli_reference, random.Random(13).randint(1, write_events), write_events)


@pytest.mark.slow
def test_kill_9_at_every_write_event(workspace, tmp_path, cli_reference, write_events):
    for n in range(1, write_events + 1):
        _kill_case(workspace, tmp_path, cli_reference, n, write_events)


def test_probe_result_survives_a_full_disk_at_save(monkeypatch, workspace, tmp_path, capsys):
    """The probe has no per-layer resume, so its result is checkpointed before anything that can fail
    after it; the rerun restores it instead of probing again."""
    model_dir, text = workspace
    argv = _argv(model_dir, text, tmp_path / "out", "--probe", "--gradient-threshold", "0.05")
    ref_out = tmp_path / "ref"
    assert cli.main(_argv(model_dir, text, ref_out, "--probe", "--gradient-threshold", "0.05")) == 0
    real_save = io.save_pruned

    def full_disk(*a, **k):
        k["extra_files"] = lambda stage: _enospc()
        return real_save(*a, **k)

    monkeypatch.setattr(io, "save_pruned", full_disk)
    assert cli.main(argv) == 1
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(io, "save_pruned", real_save)
    monkeypatch.setattr(gradprobe.probe, "probe_prune_", lambda *a, **k: pytest.fail("probed again"))
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "restored from the checkpoint" in capsys.readouterr().out
    a = _weights(AutoModelForCausalLM.from_pretrained(ref_out))
    b = _weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((ref_out / "prune_report.json").read_text())["totals"]
    rb = json.loads((tmp_path / "out" / "prune_report.json").read_text())["totals"]
    assert (ra["pruned"], ra["params"]) == (rb["pruned"], rb["params"])


# ---- iterative_prune_'s checkpoint -------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["step", pytest.param("state", marks=pytest.mark.slow)])
def test_corrupt_iterative_checkpoint_is_reported_and_the_run_starts_over(tmp_path, damage):
    from gradprobe.iterative import SparsitySchedule, iterative_prune_

    batches = random_batches(nsamples=2, seqlen=16)
    kw = dict(schedule=SparsitySchedule(0.2, 0.2, 0.4), evaluate=lambda m: 1.0, max_metric_drop=1.0,
              method="magnitude", mode="model")
    done = tiny_llama()
    first = iterative_prune_(done, batches, checkpoint_dir=tmp_path, **kw)
    _flip_byte(tmp_path / ("step_01.safetensors" if damage == "step" else "state.json"), 3)
    again = tiny_llama()
    with pytest.warns(ResumeStateWarning, match="fails its checksum|unreadable"):
        res = iterative_prune_(again, batches, checkpoint_dir=tmp_path, **kw)
    assert res.resumed_from == -1 and [s.achieved for s in res.steps] == [s.achieved for s in first.steps]
    assert all(torch.equal(p, q) for p, q in zip(done.parameters(), again.parameters(), strict=True))
