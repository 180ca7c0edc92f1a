"""``gradprobe prune --probe``: the probe's command-line options, their checks and the resumable run.

The run holds one decoder layer at a time on ``--device`` (the model stays where it was loaded) and
checkpoints each finished step in the run's partial directory (:func:`gradprobe.probe.probe`'s
``resume_dir``): a decoder layer in layerwise / regional mode; in model mode the G0 pass (candidates and
their G0) and then the result. A killed
run rerun with the same command restores the finished steps and continues; its final weights equal an
uninterrupted run's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from gradprobe._argtypes import fraction, nonneg_float

MODES = ("model", "layerwise", "regional")


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """The ``--probe`` option group of ``gradprobe prune``."""
    g = p.add_argument_group("gradient probe (gradprobe.probe_prune_)")
    g.add_argument("--probe", action="store_true", help="prune with the gradient probe: candidates whose |grad| grew when shrunk are restored")
    g.add_argument("--reduction-factor", type=fraction, default=0.1, help="probe: candidates are scaled by r in (0, 1) (default 0.1)")
    g.add_argument("--gradient-threshold", type=nonneg_float, default=0.0, help="probe: tau >= 0, prune if G1 <= G0 * (1 + tau) (default 0)")
    g.add_argument("--adaptive-threshold", action="store_true", help="probe: scale tau by sqrt(numel / largest numel) per tensor")
    g.add_argument("--probe-mode", choices=list(MODES), default="model",
                   help="probe: one G0/G1 pass for the model, per decoder layer (model loss), or per decoder layer "
                        "with the block-local loss ||block output||^2 (regional); the model loss is back-propagated "
                        "one decoder layer at a time on --device; layerwise / regional resume per layer")
    g.add_argument("--probe-target", choices=["candidates", "exact"], default="candidates",
                   help="probe: prune the candidates whose gradient did not grow (candidates; prunes <= --sparsity), "
                        "or exactly --sparsity: of the candidates at --candidate-sparsity, the not-grown ones first, then the "
                        "grown ones, each in score order (exact)")
    g.add_argument("--candidate-sparsity", type=fraction, default=None,
                   help="probe --probe-target exact: candidate fraction s' >= --sparsity (default s + 0.2 (1 - s))")
    g.add_argument("--probe-order", choices=["reverse", "forward"], default="reverse", help="probe: layer order in layerwise mode")


def check_cli_args(args: Any) -> None:
    """ValueError naming the option the probe cannot honour (before anything is loaded)."""
    if not args.probe:
        return
    if args.structure != "unstructured":
        raise ValueError(f"--probe cannot be combined with --structure {args.structure}: restoring a candidate breaks the N:M pattern")
    if args.method == "sparsegpt":
        raise ValueError("--probe filters Wanda or magnitude candidates; use --method wanda or magnitude")
    if getattr(args, "allocation", "uniform") != "uniform":
        raise ValueError(f"--probe cannot be combined with --allocation {args.allocation}; use uniform")
    if not 0.0 < args.reduction_factor < 1.0:
        raise ValueError(f"--reduction-factor must be in (0, 1), got {args.reduction_factor}")
    if args.candidate_sparsity is not None:
        if args.probe_target != "exact":
            raise ValueError("--candidate-sparsity is used only with --probe-target exact")
        if args.candidate_sparsity < (args.sparsity if args.sparsity is not None else 0.5):
            raise ValueError(f"--candidate-sparsity {args.candidate_sparsity} must be >= --sparsity")


def run(args: Any, model, batches, config, directory: Path):
    """Prune ``model`` in place with the probe on ``config.device``, checkpointed in ``directory``; the
    result described as a :class:`gradprobe.report.PruneReport` (one row per probed tensor, in model order;
    ``resumed_layers``: the layers restored from the checkpoint)."""
    from gradprobe import probe as probe_mod

    t0 = time.perf_counter()
    tau = probe_mod.SizeAdaptive(args.gradient_threshold) if args.adaptive_threshold else args.gradient_threshold
    res = probe_mod.probe(
        model, batches, config.sparsity, method=config.method, scope=config.scope,
        reduction_factor=args.reduction_factor, gradient_threshold=tau, mode=args.probe_mode,
        order=args.probe_order, target=args.probe_target, candidate_sparsity=args.candidate_sparsity, progress=True,
        device=config.device, resume_dir=directory,
    )
    if res.info.get("resumed_g0"):
        print(f"restored the probe's G0 pass from the checkpoint in {directory}", flush=True)
    report = res.report(model)  # rows in the pipeline's (layer, linear) naming, masks by parameter name
    report.config, report.seconds = config, time.perf_counter() - t0
    report.nsamples, report.seqlen = int(batches.shape[0]), int(batches.shape[-1])
    return report
