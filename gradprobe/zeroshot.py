"""Zero-shot accuracy with lm-evaluation-harness on an already loaded model (extra ``gradprobe[eval]``).

:func:`prepare` checks everything a run needs *before* a model is loaded or pruned: lm-eval is
importable, every task name resolves (built-in tasks or YAML files under ``include_path``), and, when
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set, every task's data set can be opened from the
local cache (a hub task whose data set was never downloaded fails here, with one line, not after the
pruning). :func:`evaluate` then runs ``lm_eval.simple_evaluate`` with lm-eval's ``HFLM`` wrapped
around the model object itself (no second copy, no reload), zero-shot.

Local tasks use lm-eval's task YAML format; e.g. ``DIR/mytask.yaml``::

    task: mytask
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/mytask.json}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{label}}"
    metric_list: [{metric: acc}]

and ``--tasks mytask --tasks-include DIR``.
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = 'pip install "gradprobe[eval]"'
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class ZeroShotError(ValueError):
    """A zero-shot request that cannot run (missing package, unknown task, data set not available)."""


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task: ``value`` (e.g. accuracy in [0, 1]), its standard error, sample count."""

    task: str
    metric: str
    value: float
    stderr: float | None
    samples: int | None


@dataclass
class ZeroShotResult:
    """Scores of one :func:`evaluate` call (``num_fewshot`` = 0; ``limit`` = samples per task or None)."""

    scores: list[TaskScore]
    tasks: list[str]
    limit: int | None = None
    num_fewshot: int = 0
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "seconds": self.seconds,
            "versions": dict(self.versions),
            "scores": [asdict(s) for s in self.scores],
        }

    def value(self, task: str, metric: str = "acc") -> float:
        for s in self.scores:
            if s.task == task and s.metric == metric:
                return s.value
        raise KeyError(f"no {metric!r} for task {task!r}")


def parse_tasks(text: str) -> list[str]:
    """``"boolq, rte"`` -> ``["boolq", "rte"]`` (order kept, duplicates dropped)."""
    out: list[str] = []
    for t in (p.strip() for p in str(text).split(",")):
        if t and t not in out:
            out.append(t)
    if not out:
        raise ZeroShotError(f"no task names in {text!r}; give comma-separated lm-eval task names, e.g. boolq,rte")
    return out


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def _leaf_configs(tm: Any, name: str, depth: int = 0) -> list[dict[str, Any]]:
    """The full YAML configs of the tasks ``name`` stands for (a task, or a group / tag's members)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index.get(name)
    if entry is None or depth > 8:
        return []
    if entry.kind == Kind.TASK:
        return [tm._factory._load_full_config(entry)]
    if entry.kind == Kind.TAG:
        return [c for n, e in tm.task_index.items() if name in e.tags for c in _leaf_configs(tm, n, depth + 1)]
    if entry.kind == Kind.GROUP and entry.yaml_path is not None:
        members = load_yaml(entry.yaml_path, resolve_func=False).get("task", [])
        out = []
        for m in members if isinstance(members, list) else [members]:
            if isinstance(m, str):
                out += _leaf_configs(tm, m, depth + 1)
        return out
    return []  # Python-defined tasks: their data loading is their own


def _check_dataset(task: str, cfg: dict[str, Any]) -> None:
    """Offline only: the task's data set must open from the local cache (no download is attempted)."""
    path = cfg.get("dataset_path")
    if not path or "custom_dataset" in cfg:
        return
    import datasets

    kwargs = dict(cfg.get("dataset_kwargs") or {})
    try:
        datasets.load_dataset_builder(path, cfg.get("dataset_name"), **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure means "not available offline"
        set_vars = " and ".join(v for v in OFFLINE_VARS if os.environ.get(v))
        what = path + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
        raise ZeroShotError(
            f"task {task!r} needs the data set {what}, which is not in the local cache and {set_vars} is set "
            f"({type(exc).__name__}); download it once online, or give a local task with --tasks-include DIR"
        ) from None


@dataclass
class Plan:
    """A checked zero-shot request: the task names and the lm-eval TaskManager that resolves them."""

    tasks: list[str]
    task_manager: Any
    include_path: str | None = None
    limit: int | None = None
    batch_size: int = 1


def prepare(
    tasks: str | list[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 1,
) -> Plan:
    """Check a zero-shot request before any model work (see the module docstring).

    Args:
        tasks: lm-eval task / group / tag names (list or comma-separated string).
        include_path: a directory of task YAML files (lm-eval's ``--include_path``).
        limit: evaluate only the first ``limit`` samples of each task (None = all).
        batch_size: HFLM batch size.

    Raises:
        ZeroShotError: lm-eval missing, unknown task, bad include_path, or (offline) a data set
            that is not cached. Nothing is loaded or modified.
    """
    names = parse_tasks(tasks) if isinstance(tasks, str) else parse_tasks(",".join(tasks))
    for name, v in (("limit", limit), ("batch_size", batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ZeroShotError(f"{name} must be a positive int, got {v!r}")
    if include_path is not None and not Path(include_path).is_dir():
        raise ZeroShotError(f"include_path {str(include_path)!r} is not a directory of lm-eval task YAML files")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ZeroShotError(f"zero-shot tasks need lm-evaluation-harness ({exc}); {INSTALL_HINT}") from None
    include = None if include_path is None else str(Path(include_path).resolve())
    tm = None
    if include is not None:  # only the local tasks: indexing lm-eval's ~15k built-in YAML files takes a while
        local = TaskManager(include_path=include, include_defaults=False)
        if all(n in local.task_index for n in names):
            tm = local
    if tm is None:
        tm = TaskManager(include_path=include)
    unknown = [n for n in names if n not in tm.task_index]
    if unknown:
        hints = {n: difflib.get_close_matches(n, tm.all_tasks, n=3) for n in unknown}
        raise ZeroShotError(
            "unknown lm-eval task(s): "
            + ", ".join(f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items())
            + ("" if include else "; local task YAML files need --tasks-include DIR")
        )
    if _offline():
        for n in names:
            for cfg in _leaf_configs(tm, n):
                _check_dataset(n, cfg)
    return Plan(tasks=names, task_manager=tm, include_path=include, limit=limit, batch_size=batch_size)


def _scores(results: dict[str, Any]) -> list[TaskScore]:
    out = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            out.append(TaskScore(task=task, metric=metric if filt == "none" else key, value=float(value),
                                 stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                                 samples=None if n is None else int(n)))
    return out


def evaluate(model: Any, tokenizer: Any, plan: Plan, *, device: str | None = None, progress: bool = False) -> ZeroShotResult:
    """Zero-shot scores of ``model`` on ``plan``'s tasks (lm-eval ``simple_evaluate`` over ``HFLM``).

    Args:
        model: a loaded Hugging Face causal LM; wrapped as is (HFLM's ``pretrained=`` object), not copied.
        tokenizer: its tokenizer.
        plan: from :func:`prepare`.
        device: where the forwards run; the model is moved there and back if it is elsewhere.

    Returns:
        :class:`ZeroShotResult` with one :class:`TaskScore` per task and metric (acc, acc_norm, ...).
    """
    import logging

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    home = next(model.parameters()).device
    dev = home if device is None else torch.device(device)
    if dev != home:
        model.to(dev)
    was_training = model.training
    model.eval()
    level = logging.getLogger("lm_eval").level
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=plan.batch_size)
        if lm.model is not model:  # the promise: evaluate this object, never a reloaded copy
            raise RuntimeError("lm-eval's HFLM did not wrap the given model object")
        res = lm_eval.simple_evaluate(
            model=lm, tasks=list(plan.tasks), num_fewshot=0, limit=plan.limit, task_manager=plan.task_manager,
            log_samples=False, bootstrap_iters=1000,
        )
    finally:
        logging.getLogger("lm_eval").setLevel(level)
        if dev != home:
            model.to(home)
        model.train(was_training)
    import transformers

    return ZeroShotResult(
        scores=_scores(res or {}), tasks=list(plan.tasks), limit=plan.limit, seconds=time.perf_counter() - t0,
        versions={"lm_eval": getattr(lm_eval, "__version__", "?"), "transformers": transformers.__version__},
    )


# --- presentation (no lm-eval import) --------------------------------------------------------------
def table(results: dict[str, ZeroShotResult | dict | None]) -> list[str]:
    """Markdown rows: one per (task, metric), one column per labelled result (e.g. dense, pruned)."""
    res = {k: (v.as_dict() if isinstance(v, ZeroShotResult) else v) for k, v in results.items() if v}
    if not res:
        return []
    keys: list[tuple[str, str]] = []
    vals: dict[tuple[str, str, str], dict] = {}
    for label, r in res.items():
        for s in r.get("scores", []):
            k = (s["task"], s["metric"])
            if k not in keys:
                keys.append(k)
            vals[(label, *k)] = s
    labels = list(res)
    lines = ["| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for task, metric in keys:
        cells = []
        for label in labels:
            s = vals.get((label, task, metric))
            if s is None:
                cells.append("-")
            else:
                err = f" ± {s['stderr']:.4f}" if s.get("stderr") is not None else ""
                cells.append(f"{s['value']:.4f}{err}")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    any_r = next(iter(res.values()))
    lines.append("")
    lines.append(
        f"zero-shot (lm-evaluation-harness {any_r.get('versions', {}).get('lm_eval', '?')}), "
        + ("all samples" if any_r.get("limit") is None else f"first {any_r['limit']} samples per task")
    )
    return lines


def markdown(record: dict | None) -> list[str]:
    """A run-report section from :func:`record`'s dict (empty when there was no zero-shot run)."""
    if not record:
        return []
    lines = ["## zero-shot accuracy", ""]
    if record.get("error"):
        lines += [f"zero-shot evaluation failed: {record['error']}", ""]
    return lines + table({k: v for k, v in record.items() if k != "error"}) + [""]


def record(**results: ZeroShotResult | None) -> dict[str, Any]:
    """JSON-able dict of labelled results, e.g. ``record(dense=r0, pruned=r1)``."""
    return {k: v.as_dict() for k, v in results.items() if v is not None}


# --- CLI glue (the CLI only parses and calls these) ------------------------------------------------
def add_cli_args(p: Any, flag: str) -> None:
    """``flag`` (``--tasks`` / ``--eval-tasks``) and its options on an argparse parser."""
    g = p.add_argument_group("zero-shot accuracy (lm-evaluation-harness, pip install 'gradprobe[eval]')")
    g.add_argument(flag, dest="tasks", default=None, metavar="T1,T2",
                   help="comma-separated lm-eval tasks (e.g. boolq,rte), run zero-shot on the loaded model")
    g.add_argument("--tasks-include", default=None, metavar="DIR",
                   help="directory of local lm-eval task YAML files (lm-eval's --include_path)")
    g.add_argument("--tasks-limit", type=int, default=None, metavar="N",
                   help="evaluate only the first N samples of each task (default: all)")
    g.add_argument("--tasks-batch-size", type=int, default=1, metavar="N", help="lm-eval batch size (default 1)")


def check_cli_args(args: Any) -> Plan | None:
    """The checked plan of ``args.tasks`` (None when no tasks were asked for); ZeroShotError if bad."""
    if getattr(args, "tasks", None) is None:
        if getattr(args, "tasks_include", None) or getattr(args, "tasks_limit", None):
            raise ZeroShotError("--tasks-include / --tasks-limit need --tasks (or --eval-tasks for prune)")
        return None
    return prepare(args.tasks, include_path=args.tasks_include, limit=args.tasks_limit,
                   batch_size=args.tasks_batch_size)


def run_cli(plan: Plan | None, model: Any, tokenizer: Any, device: str | None, label: str) -> ZeroShotResult | None:
    """Evaluate and print one line per task and metric (None without a plan)."""
    if plan is None:
        return None
    print(f"{label} zero-shot: {', '.join(plan.tasks)} ...", flush=True)
    res = evaluate(model, tokenizer, plan, device=device)
    for s in res.scores:
        err = "" if s.stderr is None else f" ± {s.stderr:.4f}"
        print(f"{label} {s.task} {s.metric}: {s.value:.4f}{err}  ({s.samples} samples)", flush=True)
    return res
