"""Data-parallel calibration over torch.distributed (gloo, CPU): masks bit-identical for world sizes 1, 2, 3.

Each launch starts ``world`` plain processes of tests/dist_worker.py (RANK / WORLD_SIZE / MASTER_* set, as
torchrun sets them) and reads back what every rank pruned.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
ROOT = WORKER.parent.parent
MASK_CASES = ["wanda_row", "wanda_layer", "wanda_global", "wanda_24", "wanda_head", "owl", "probe_layerwise",
              "probe_model_global", "probe_selector", "all_max", "stream", "stream_global", "global_split", "cli", "cli_probe"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(world: int, rank: int, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _start(world: int, argv: list[str], **extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen([sys.executable, *argv], env=_env(world, r, port, **extra), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank did not finish within {timeout} s (hang)")
        out.append((p.returncode, text))
    return out


def _launch(tmp: Path, world: int, cases: list[str], **extra: str) -> list[tuple[dict, dict]]:
    """[(record, tensors) per rank] of one launch of ``world`` worker processes."""
    from safetensors.torch import load_file

    for rc, text in _wait(_start(world, [str(WORKER), str(tmp), *cases], **extra), 300):
        assert rc == 0, text[-3000:]
    return [(json.loads((tmp / f"rank{r}.json").read_text()), load_file(str(tmp / f"rank{r}.safetensors")))
            for r in range(world)]


def _one_process(cases: list[str], tmp: Path) -> dict[str, torch.Tensor]:
    """The cases run here, without a process group (one thread, as the workers), writing under ``tmp``."""
    import dist_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env = os.environ.get("GP_OUT")
    os.environ["GP_OUT"] = str(tmp)
    try:
        return {f"{c}/{k}": v for c in cases for k, v in dist_worker.CASES[c]().items()}
    finally:
        torch.set_num_threads(threads)
        if env is None:
            del os.environ["GP_OUT"]
        else:
            os.environ["GP_OUT"] = env


def _check_equal(ranks: list[tuple[dict, dict]], ref: dict[str, torch.Tensor], cases: list[str],
                 ref_dir: Path, run_dir: Path) -> None:
    from safetensors.torch import load_file

    for r, (record, tensors) in enumerate(ranks):
        for case in cases:
            assert record[case]["ok"], (r, record[case])
        for k, v in ref.items():
            if not k.startswith("all_max/"):  # per-rank input; checked against a sequential fold in the worker
                assert torch.equal(tensors[k], v), f"rank {r} of {len(ranks)}: {k} differs from one process"
    pruned = [k for k in ref if not k.startswith("all_max/") and (k.startswith("wanda_head/") or "lm_head" not in k)]
    assert pruned and all(int((ref[k] == 0).sum()) > 0 for k in pruned)  # every case really pruned
    for case in ("stream", "stream_global", "cli", "cli_probe"):  # rank 0 wrote the same checkpoint as one process, and no staging is left
        if case in cases:
            a = load_file(str(ref_dir / case / "model.safetensors"))
            b = load_file(str(run_dir / case / "model.safetensors"))
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), case
            assert (run_dir / case / "prune_report.json").exists()
            assert not (run_dir / f".{case}.gradprobe-partial").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), num_layers=2)


@pytest.fixture(scope="module")
def world2(tmp_path_factory, checkpoint):
    """One launch of 2 ranks: every mask case, then the failing-rank case, then its rerun (resume)."""
    tmp = tmp_path_factory.mktemp("world2")
    return tmp, _launch(tmp, 2, [*MASK_CASES, "sparsegpt_refused", "failing", "resume"], GP_TIMEOUT="60", **_env_of(checkpoint))


def _env_of(checkpoint) -> dict[str, str]:
    return {"GP_MODEL": str(checkpoint[0]), "GP_TEXT": str(checkpoint[1])}


def test_masks_equal_one_process_world_2(world2, checkpoint, tmp_path, monkeypatch):
    for k, v in _env_of(checkpoint).items():
        monkeypatch.setenv(k, v)
    _check_equal(world2[1], _one_process(MASK_CASES, tmp_path), MASK_CASES, tmp_path, world2[0])


@pytest.mark.slow
def test_masks_equal_one_process_world_3(tmp_path, checkpoint, monkeypatch):
    for k, v in _env_of(checkpoint).items():
        monkeypatch.setenv(k, v)
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    ranks = _launch(tmp_path / "run", 3, MASK_CASES, **_env_of(checkpoint))
    _check_equal(ranks, _one_process(MASK_CASES, tmp_path / "ref"), MASK_CASES, tmp_path / "ref", tmp_path / "run")


def test_sparsegpt_is_refused_on_every_rank(world2):
    for record, _ in world2[1]:
        got = record["sparsegpt_refused"]
        assert not got["ok"] and got["type"] == "ValueError" and "several processes" in got["error"], got


def test_failing_rank_stops_every_rank_without_output(world2):
    tmp, ranks = world2
    r0, r1 = (record["failing"] for record, _ in ranks)
    assert not r1["ok"] and r1["type"] == "ValueError" and "injected failure on rank 1" in r1["error"]
    assert not r0["ok"] and r0["type"] == "RankFailedError"
    assert "rank 1" in r0["error"] and "injected failure on rank 1" in r0["error"]
    # at once, not after the process group's 60 s timeout
    assert r0["seconds"] < 30 and r1["seconds"] < 30, (r0, r1)
    # only rank 0 writes the resume checkpoint, and only layer 0 finished: nothing of layer 1
    assert r0["resume_files"] == ["layer_0000.safetensors", "state.json"], r0["resume_files"]


def test_rerun_after_failure_resumes_with_same_masks(world2, tmp_path):
    ref = _one_process(["resume"], tmp_path)
    assert ref["resume/resumed_layers"].tolist() == []
    for record, tensors in world2[1]:
        assert record["resume"]["ok"], record["resume"]
        assert tensors["resume/resumed_layers"].tolist() == [0]  # layer 0 from rank 0's checkpoint
        for k, v in ref.items():
            if k != "resume/resumed_layers":
                assert torch.equal(tensors[k], v), k


@pytest.mark.slow
def test_cli_python_m_gradprobe_makes_its_own_group(tmp_path, checkpoint):
    """``python -m gradprobe prune`` in torchrun's environment creates (and destroys) the gloo group itself."""
    from safetensors.torch import load_file
    from tiny_models import prune_argv

    from gradprobe import cli

    model_dir, text = checkpoint
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--no-eval", "--no-plot", "--batch-size", "3")
    procs = _start(2, ["-m", "gradprobe", *prune_argv(model_dir, text, two, *extra)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(prune_argv(model_dir, text, one, *extra)) == 0
    finally:
        torch.set_num_threads(threads)
    for rc, out in _wait(procs, 300):
        assert rc == 0, out[-3000:]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((two / "prune_report.json").read_text())
    assert not any(p.name.endswith("gradprobe-partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 64])
@pytest.mark.parametrize("w", [1, 2, 3, 8])
def test_sample_ranges_tile_the_samples_in_order(n, w):
    from gradprobe.distributed import sample_range

    ranges = [sample_range(n, r, w) for r in range(w)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_channel_stats_do_not_depend_on_the_batching():
    """The Wanda statistic is per-sample fp32 partials summed in sample order, so any batching (and so any
    split over ranks) gives the same bits; a plain whole-batch reduction would not promise that."""
    from gradprobe.stats import ChannelStats

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 33, 48, generator=g) * torch.logspace(-3, 3, 48)).to(torch.bfloat16)
    want = torch.zeros(48)
    for s in range(7):
        want += x[s].float().pow(2).sum(0)
    for bsz in (1, 2, 3, 7):
        st = ChannelStats(48, "cpu")
        for b0 in range(0, 7, bsz):
            st.add(x[b0 : b0 + bsz])
        assert torch.equal(st.sumsq, want), bsz
        assert st.tokens == 7 * 33


def test_helpers_are_identities_without_a_process_group():
    from gradprobe import distributed

    t = torch.tensor([1.0, float("nan"), 3.0])
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_writer()
    assert distributed.local_slice(t) is t and distributed.gather_rows(t[None]).shape == (1, 3)
    assert distributed.all_max_(t) is t and distributed.all_true(True) and distributed.all_sum_int(4) == 4
    distributed.agree("nothing", "x")
    with distributed.guard():
        distributed.barrier()


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_others_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    procs = _start(2, [str(WORKER), str(tmp_path), "dies"], GP_TIMEOUT="20")
    (_, out0), (rc1, _) = _wait(procs, 300)  # never a hang: _wait fails the test after 300 s
    assert rc1 == 3
    r0 = json.loads((tmp_path / "rank0.json").read_text())["dies"]  # rank 0 recorded an error and went on
    assert not r0["ok"] and r0["type"] == "RankFailedError" and "collective failed" in r0["error"], (r0, out0[-2000:])
    assert time.monotonic() - t0 < 300
