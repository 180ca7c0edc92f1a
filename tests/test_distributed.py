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
MASK_CASES = ["wanda_row", "wanda_layer", "wanda_global", "wanda_24", "owl", "probe_layerwise",
              "probe_model_global", "all_max"]


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


def _one_process(cases: list[str]) -> dict[str, torch.Tensor]:
    """The cases run here, without a process group (one thread, as the workers)."""
    import dist_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {f"{c}/{k}": v for c in cases for k, v in dist_worker.CASES[c]().items()}
    finally:
        torch.set_num_threads(threads)


def _check_equal(ranks: list[tuple[dict, dict]], ref: dict[str, torch.Tensor], cases: list[str]) -> None:
    for r, (record, tensors) in enumerate(ranks):
        for case in cases:
            assert record[case]["ok"], (r, record[case])
        for k, v in ref.items():
            if not k.startswith("all_max/"):  # per-rank input; checked against a sequential fold in the worker
                assert torch.equal(tensors[k], v), f"rank {r} of {len(ranks)}: {k} differs from one process"
    pruned = [k for k in ref if not k.startswith("all_max/")]
    assert pruned and all(int((ref[k] == 0).sum()) > 0 for k in pruned)  # every case really pruned


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """One launch of 2 ranks: every mask case, then the failing-rank case (it ends the group)."""
    tmp = tmp_path_factory.mktemp("world2")
    return tmp, _launch(tmp, 2, [*MASK_CASES, "failing"], GP_TIMEOUT="60")


def test_masks_equal_one_process_world_2(world2):
    _check_equal(world2[1], _one_process(MASK_CASES), MASK_CASES)


@pytest.mark.slow
def test_masks_equal_one_process_world_3(tmp_path):
    _check_equal(_launch(tmp_path, 3, MASK_CASES), _one_process(MASK_CASES), MASK_CASES)


def test_failing_rank_stops_every_rank_without_output(world2):
    tmp, ranks = world2
    r0, r1 = (record["failing"] for record, _ in ranks)
    assert not r1["ok"] and r1["type"] == "ValueError" and "injected failure on rank 1" in r1["error"]
    assert not r0["ok"] and r0["type"] == "RankFailedError"
    assert "rank 1" in r0["error"] and "injected failure on rank 1" in r0["error"]
    # at once, not after the process group's 60 s timeout
    assert r0["seconds"] < 30 and r1["seconds"] < 30, (r0, r1)
    # only rank 0 writes the resume checkpoint, and only layer 0 finished: nothing of layer 1
    files = sorted(p.name for p in (tmp / "resume").iterdir())
    assert files == ["layer_0000.safetensors", "state.json"], files


def test_cli_torchrun_rank0_writes_same_model(tmp_path):
    from safetensors.torch import load_file
    from tiny_models import prune_argv, save_tiny_checkpoint

    from gradprobe import cli

    model_dir, text = save_tiny_checkpoint(tmp_path, num_layers=2)
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
