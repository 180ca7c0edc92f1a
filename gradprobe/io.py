"""Loading models and saving pruned ones atomically (safetensors only).

:func:`save_pruned` never leaves a half-written output: everything is written into a staging
directory beside ``out_dir`` (same filesystem) and renamed into place at the end. It refuses to
write over the directory the model was loaded from, so the source model is never modified on disk.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from gradprobe._checkpoint import publish_dir, staging_dir

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
REPORT_JSON = "gradprobe_report.json"


def parse_dtype(dtype) -> torch.dtype | str | None:
    """None / "auto" / torch.dtype / a name in :data:`DTYPES` -> what ``from_pretrained(dtype=...)`` takes."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be 'auto', a torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")


def partial_dir(out_dir: str | os.PathLike) -> Path:
    """The deterministic staging directory of ``out_dir`` (``.NAME.gradprobe-partial`` beside it).

    The CLI keeps resume checkpoints there, so a rerun after an interruption finds them.
    """
    out = Path(out_dir).expanduser().absolute()
    return out.parent / f".{out.name}.gradprobe-partial"


def _source_dirs(model) -> list[Path]:
    """Local directories the model was loaded from (``name_or_path``), if any."""
    out = []
    for attr in (
        getattr(model, "name_or_path", None),
        getattr(getattr(model, "config", None), "_name_or_path", None),
    ):
        if attr and Path(attr).expanduser().is_dir():
            out.append(Path(attr).expanduser().resolve())
    return out


def check_out_dir(
    out_dir: str | os.PathLike,
    *,
    model=None,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Validate an output directory before any work is done; returns it as an absolute Path.

    Raises:
        ValueError: ``out_dir`` is (or contains, or is inside) the source model directory, gradprobe's
            cache (the embedded model) or the Hugging Face cache; or it is a file.
        FileExistsError: ``out_dir`` exists and is not empty, and ``overwrite`` is False.
    """
    from gradprobe.preflight import protected_dirs

    out = Path(out_dir).expanduser().absolute()
    protected = [(src, "the source model directory") for src in (_source_dirs(model) if model is not None else [])]
    protected += protected_dirs(None if source is None else os.fspath(source))
    resolved = out.resolve()
    for src, what in protected:
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise ValueError(
                f"out_dir {str(out)!r} overlaps {what} {str(src)!r}; it is never written into: choose another "
                "output directory"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"out_dir {str(out)!r} exists and is not empty; pass overwrite=True (--overwrite) or another path"
        )
    return out


def _write_report(report, directory: Path, plots: bool) -> None:
    if report is None:
        return
    for method in ("save", "write"):
        fn = getattr(report, method, None)
        if callable(fn):
            takes_plot = "plot" in inspect.signature(fn).parameters
            fn(directory, plot=plots) if takes_plot else fn(directory)
            return
    if isinstance(report, dict):
        (directory / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str))
        return
    raise TypeError(f"report must be a PruneReport (with .save(dir)) or a dict, got {type(report).__name__}")


def save_pruned(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    report=None,
    *,
    overwrite: bool = False,
    staging: str | os.PathLike | None = None,
    extra_json: dict | None = None,
    extra_files: Callable[[Path], None] | None = None,
    plots: bool = True,
) -> Path:
    """Save a (pruned) model + tokenizer as a Hugging Face checkpoint, atomically.

    Args:
        model: a ``transformers`` PreTrainedModel (weights saved as safetensors only).
        tokenizer: its tokenizer, or None.
        out_dir: the final directory; must not exist, be empty, or ``overwrite`` must be True.
        report: optional PruneReport (its ``save(dir)`` writes table / JSON / PNG) or a JSON-able dict.
        overwrite: replace an existing non-empty ``out_dir``.
        staging: the directory to write into before the rename (default: a fresh temporary
            directory beside ``out_dir``); it is removed or renamed away on return.
        extra_json: optional dict written to ``gradprobe_run.json`` (e.g. the CLI's perplexities).
        extra_files: optional ``fn(staging_dir)`` writing more files, inside the atomic rename.
        plots: write the report's PNG plots (a plot that fails is a warning, never a lost result).

    The weights are written first, then the tokenizer, the report and the extra files; every file
    gets the usual permissions (0666 & ~umask) before the directory is renamed into place.

    Returns:
        ``out_dir`` as an absolute Path; ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it.
    """
    out = check_out_dir(out_dir, model=model, overwrite=overwrite)
    with staging_dir(out, staging) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        _write_report(report, stage, plots)
        if extra_json is not None:
            (stage / "gradprobe_run.json").write_text(json.dumps(extra_json, indent=2, default=str))
        if extra_files is not None:
            extra_files(stage)
        if any(stage.glob("*.bin")) or not any(stage.glob("*.safetensors")):
            raise RuntimeError(
                f"expected safetensors weights only in {stage}; got {sorted(p.name for p in stage.iterdir())}"
            )
        publish_dir(stage, out)
    return out


def load_model(
    path_or_id: str | os.PathLike | None = None, dtype="auto", device: str | torch.device | None = None
):
    """Load a causal LM and its tokenizer.

    Args:
        path_or_id: a local checkpoint directory (safetensors weights), a Hugging Face hub id, or
            None for the embedded SmolLM2-135M-Instruct (:mod:`gradprobe.embedded`).
        dtype: "auto" (the checkpoint's dtype), a torch dtype, or "float32" / "bfloat16" / "float16".
        device: where to put the model (default CPU).

    Returns:
        (model in eval mode, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    if path_or_id is None:
        from gradprobe import embedded

        return embedded.load_default_model(dtype=None if dtype == "auto" else dtype, device=device)
    name = os.fspath(path_or_id)
    local = Path(name).expanduser()
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if local.exists():
        if not local.is_dir():
            raise ValueError(
                f"model path {name!r} is a file; pass the checkpoint directory (with config.json)"
            )
        if not (local / "config.json").is_file():
            raise ValueError(
                f"model directory {name!r} has no config.json; it is not a Hugging Face checkpoint"
            )
        if not any(local.glob("*.safetensors")):
            raise ValueError(
                f"model directory {name!r} has no *.safetensors weights (gradprobe loads safetensors only)"
            )
        kwargs["use_safetensors"] = True
        name = str(local)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise OSError(
            f"could not load model {name!r}: {exc}"
            + (" (HF_HUB_OFFLINE is set: hub ids must already be in the local cache)" if offline else "")
        ) from exc
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
