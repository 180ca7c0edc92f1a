"""One rank of a CPU (gloo) data-parallel run, launched by tests/test_distributed.py as a plain process.

``python tests/dist_worker.py OUT CASE...`` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (WORLD_SIZE=1
or unset: a single process, no process group). Each case prunes a fresh tiny model and stores its pruned
prunable weights in ``OUT/rank{r}.safetensors`` under ``CASE/param``; ``OUT/rank{r}.json`` records
per case "ok" or the error (type and message) and the seconds taken.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

N_SAMPLES, SEQLEN = 5, 16  # 5 samples: uneven shares for 2 and 3 ranks (2+3, 1+2+2)


def _model():
    from tiny_models import tiny_llama

    return tiny_llama(num_layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=128, max_pos=64)


def _batches():
    from tiny_models import random_batches

    return random_batches(N_SAMPLES, SEQLEN, vocab=128, seed=1)


def _prunable(model) -> dict[str, torch.Tensor]:
    from gradprobe.models import get_adapter

    ad = get_adapter(model)
    out = {}
    for i, layer in enumerate(ad.decoder_layers(model)):
        for n, lin in ad.prunable_linears(layer).items():
            out[f"{i}.{n}"] = lin.weight.detach().clone()
    out["lm_head"] = ad.lm_head(model).weight.detach().clone()
    return out


def _wanda(**kw):
    import gradprobe

    model = _model()
    gradprobe.prune(model, _batches(), gradprobe.PruneConfig(progress=False, batch_size=2, **kw))
    return _prunable(model)


def _owl():
    import gradprobe
    from gradprobe.allocation import owl_from_model

    model = _model()
    cfg = gradprobe.PruneConfig(progress=False, batch_size=2)
    alloc = owl_from_model(model, _batches(), 0.6, config=cfg)
    gradprobe.prune(model, _batches(), alloc.config(progress=False, batch_size=2))
    return _prunable(model)


def _probe(mode: str, scope: str):
    import gradprobe

    model = _model()
    b = _batches()
    batches = [b[0:2], b[2:3], b[3:4], b[4:5]]
    gradprobe.probe_prune_(model, batches, 0.5, method="wanda", scope=scope, mode=mode)
    return _prunable(model)


def _stream():
    """``prune_streamed`` of the checkpoint in $GP_MODEL into $GP_OUT/stream (rank 0 writes); the output's
    tensors are compared by the test."""
    import gradprobe
    from gradprobe.stream import prune_streamed

    out = Path(os.environ["GP_OUT"]) / "stream"
    prune_streamed(os.environ["GP_MODEL"], out, gradprobe.PruneConfig(progress=False, batch_size=2), _batches(),
                   plots=False)
    return {}


def _stream_global():
    """``prune_streamed`` with Wanda scope "global": two histogram passes (each rank scores its share of
    the layers; integer counts summed over ranks), then the mask pass; rank 0 writes $GP_OUT/stream_global."""
    import gradprobe
    from gradprobe.stream import prune_streamed

    out = Path(os.environ["GP_OUT"]) / "stream_global"
    prune_streamed(os.environ["GP_MODEL"], out, gradprobe.PruneConfig(progress=False, batch_size=2, scope="global",
                                                                       sparsity=0.6), _batches(), plots=False)
    return {}


def _global_split():
    """select_global(split=True) over 4 tensors with ties and mixed dtypes, each rank scoring its contiguous
    share; every rank then computes the masks of all tensors and reports the threshold triple."""
    from gradprobe import distributed
    from gradprobe.pipeline.global_scope import select_global

    g = torch.Generator().manual_seed(5)
    ws = [torch.randint(-3, 4, (33, 17), generator=g).float(), (torch.randn(9, 40, generator=g) * 3).round().bfloat16(),
          torch.randn(1, 7, generator=g) * 30, torch.randint(-3, 4, (20, 20), generator=g).half()]
    ns = [torch.randint(0, 3, (w.shape[1],), generator=g).float() for w in ws]
    a, b = distributed.sample_range(len(ws))
    sel = select_global(lambda: ((j, ws[j], ns[j]) for j in range(a, b)), [w.numel() for w in ws], 0.55, split=True)
    out = {f"mask{j}": sel.mask(j, w, ns[j]) for j, w in enumerate(ws)}
    out["triple"] = torch.tensor([int(sel.threshold.view(torch.int32)), sel.take, sel.equal, *sel.equal_before])
    return out


def _cli(name: str = "cli", *extra: str):
    """``gradprobe prune`` of $GP_MODEL (calibration text $GP_TEXT) into $GP_OUT/NAME: inside the process group
    the launcher made, as under torchrun; rank 0 writes."""
    from tiny_models import prune_argv

    from gradprobe import cli

    out = Path(os.environ["GP_OUT"]) / name
    argv = prune_argv(os.environ["GP_MODEL"], os.environ["GP_TEXT"], out, "--no-eval", "--no-plot", "--batch-size", "3",
                      *extra)
    rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"gradprobe prune exited with {rc}")
    return {}


_FAIL = {"on": False}


def failing_mask_fn(w, norm, s, ctx):
    """The default mask step, except that rank 1 raises at layer 1 while ``_FAIL["on"]``."""
    from gradprobe import distributed
    from gradprobe.methods import default_mask_fn

    if _FAIL["on"] and distributed.rank() == 1 and ctx.layer_idx == 1:
        if _FAIL.get("die"):
            os._exit(3)  # no exception, no announcement: the others must time out, not hang
        raise ValueError("injected failure on rank 1")
    return default_mask_fn(w, norm, s, ctx)


def _resumable(fail: bool) -> dict[str, torch.Tensor]:
    import gradprobe

    model = _model()
    out = Path(os.environ["GP_OUT"]) / "resume"
    _FAIL["on"] = fail
    report = gradprobe.prune(model, _batches(), gradprobe.PruneConfig(progress=False, mask_fn=failing_mask_fn),
                             resume_dir=out)
    return _prunable(model) | {"resumed_layers": torch.tensor(report.resumed_layers, dtype=torch.int64)}


def _failing():
    """Rank 1 raises inside layer 1's mask step; every rank must stop with an error."""
    return _resumable(True)


def _dies():
    """Rank 1 exits hard inside layer 1; rank 0 must fail with an error (process-group timeout at worst)."""
    _FAIL["die"] = True
    return _resumable(True)


def _resume():
    """The rerun of :func:`_failing`: restores layer 0 from rank 0's checkpoint, prunes layer 1."""
    return _resumable(False)


def _all_max():
    """all_max_ = probe_accumulate_ over the ranks' values (NaN sticky), against a sequential fold."""
    from gradprobe import distributed

    w = distributed.world_size()
    g = torch.Generator().manual_seed(3)
    vals = [torch.randn(64, generator=g).abs() for _ in range(w)]
    vals[0][5] = float("nan")
    vals[-1][7] = float("nan")
    vals[-1][9] = float("inf")
    ref = vals[0].clone()
    for v in vals[1:]:
        torch.ops.gradprobe.probe_accumulate_(ref, v)
    got = distributed.all_max_(vals[distributed.rank()].clone())
    if distributed.active():
        assert torch.equal(got.isnan(), ref.isnan()), "NaN positions"
        assert torch.equal(got.nan_to_num(0.0), ref.nan_to_num(0.0)), "values"
    return {"all_max": got}


CASES = {
    "wanda_row": lambda: _wanda(),
    "wanda_layer": lambda: _wanda(scope="layer"),
    "wanda_global": lambda: _wanda(scope="global"),
    "wanda_24": lambda: _wanda(structure="2:4"),
    "wanda_head": lambda: _wanda(include_lm_head=True),
    "owl": _owl,
    "probe_layerwise": lambda: _probe("layerwise", "row"),
    "probe_model_global": lambda: _probe("model", "global"),
    "probe_selector": lambda: _wanda(selector=__import__("gradprobe.probe", fromlist=["ProbeSelector"]).ProbeSelector()),
    "all_max": _all_max,
    "stream": _stream,
    "stream_global": _stream_global,
    "global_split": _global_split,
    "cli": _cli,
    "cli_probe": lambda: _cli("cli_probe", "--probe"),
    "sparsegpt_refused": lambda: _wanda(method="sparsegpt"),
    "failing": _failing,
    "resume": _resume,
    "dies": _dies,
}


def main(out: str, cases: list[str]) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    import gradprobe  # noqa: F401 (registers the ops)

    torch.set_num_threads(1)
    os.environ["GP_OUT"] = out
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        timeout = float(os.environ.get("GP_TIMEOUT", "30"))
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    r = int(os.environ.get("RANK", "0"))
    tensors, record = {}, {}
    for case in cases:
        t0 = time.perf_counter()
        try:
            for k, v in CASES[case]().items():
                tensors[f"{case}/{k}"] = v.contiguous()
            record[case] = {"ok": True}
        except Exception as exc:
            record[case] = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
        record[case]["seconds"] = time.perf_counter() - t0
        resume = Path(out) / "resume"
        record[case]["resume_files"] = sorted(os.listdir(resume)) if resume.is_dir() else []
    save_file(tensors, str(Path(out) / f"rank{r}.safetensors"))
    (Path(out) / f"rank{r}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
