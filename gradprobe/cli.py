"""Command line: ``gradprobe prune``, ``gradprobe eval``, ``gradprobe env``.

This module parses the options; each command turns them into a typed job and runs it
(:class:`gradprobe.jobs.PruneJob` / :class:`gradprobe.jobs.EvalJob`, :func:`gradprobe.jobs.run_prune_job`).

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
import os
import sys
from pathlib import Path

from gradprobe._argtypes import fraction, positive_int
from gradprobe.jobs import EMBEDDED_DEFAULTS, MODEL_DEFAULTS, RUN_JSON, UsageError  # noqa: F401  (re-exported)
from gradprobe.jobs import default_device as _default_device


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
        type=positive_int,
        default=None,
        metavar="N",
        help="perplexity context length (default 256 for the embedded model, 2048 with --model)",
    )
    p.add_argument(
        "--eval-stride",
        type=positive_int,
        default=None,
        metavar="N",
        help="perplexity window stride (default: = context, disjoint windows)",
    )
    p.add_argument(
        "--eval-windows",
        type=positive_int,
        default=None,
        metavar="N",
        help="evaluate only the first N windows (default 16 for the embedded model, all with --model)",
    )


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
        type=fraction,
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
        type=positive_int,
        default=None,
        help="calibration windows (default 32 for the embedded model, 128 with --model)",
    )
    p.add_argument(
        "--seqlen",
        type=positive_int,
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
        "--batch-size", type=positive_int, default=8, help="calibration windows per layer forward"
    )
    from gradprobe import allocation_args
    from gradprobe.probe import cli as probe_cli

    allocation_args.add_cli_args(p)  # --allocation uniform|variant|owl|owl-rescaled|explicit
    probe_cli.add_cli_args(p)  # --probe and its options
    _add_eval_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the dense and pruned perplexity")
    from gradprobe import zeroshot

    zeroshot.add_cli_args(p, "--eval-tasks")
    p.add_argument(
        "--dist-timeout", type=positive_int, default=1800, metavar="S",
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


# --- commands: a typed job from the options, then the library does the work (gradprobe.jobs) -------


def cmd_prune(args) -> int:
    from gradprobe.jobs import PruneJob, run_prune_job

    return run_prune_job(PruneJob.from_args(args))


def cmd_eval(args) -> int:
    from gradprobe.jobs import EvalJob, run_eval_job

    return run_eval_job(EvalJob.from_args(args))


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
