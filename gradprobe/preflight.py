"""Checks that run before any expensive work, and the record of what determined a run's result.

Everything here is cheap (no model is loaded): the CLI calls it right after parsing, so a missing
package, a model directory without weights or an unwritable / protected ``--out`` fails in a second,
with one line naming the option and the fix, instead of after calibration and pruning.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class PreflightError(ValueError):
    """A requirement of the run is not met (the message names the option and the fix)."""


# --- packages -------------------------------------------------------------------------------------

# (import name, pip name, what needs it)
HF_PACKAGES = (
    ("transformers", "transformers", "loading the model"),
    ("safetensors", "safetensors", "reading and writing the weights"),
    ("tokenizers", "tokenizers", "the tokenizer"),
)
PLOT_PACKAGES = (("matplotlib", "matplotlib", "the report plots (prune_report.png, allocation.png)"),)


def check_packages(packages: Iterable[tuple[str, str, str]], *, hint: str = "") -> None:
    """PreflightError listing every missing package with its pip name and what needs it."""
    missing = [(pip, why) for mod, pip, why in packages if importlib.util.find_spec(mod) is None]
    if missing:
        names = " ".join(pip for pip, _ in missing)
        whys = "; ".join(f"{pip} for {why}" for pip, why in missing)
        raise PreflightError(f"missing package(s): {whys}. Install with `pip install {names}`{hint}")


# --- model files ----------------------------------------------------------------------------------


def check_model_files(model: str | None, flag: str = "--model") -> None:
    """A local checkpoint directory needs config.json and safetensors weights; a hub id must be in the
    local cache when HF_HUB_OFFLINE is set. None (the embedded model) is checked by its loader."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise PreflightError(f"{flag} {model!r} is not a Hugging Face checkpoint directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            raise PreflightError(
                f"{flag} {model!r} has config.json but no *.safetensors weights"
                + (f" (only {', '.join(pickled)}: gradprobe never loads pickled weights; convert them to "
                   "safetensors first)" if pickled else "; copy the weights (model*.safetensors) there")
            )
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise PreflightError(f"{flag} {model!r}: {index.name} is unreadable ({exc})") from None
            absent = sorted(s for s in shards if not (path / s).is_file())
            if absent:
                raise PreflightError(f"{flag} {model!r} misses weight shard(s) {', '.join(absent)}")
        return
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise PreflightError(
                f"{flag} {model!r} is not a local directory and not in the Hugging Face cache, and "
                "HF_HUB_OFFLINE is set; download it first or pass a checkpoint directory"
            )


# --- output directory -----------------------------------------------------------------------------


def protected_dirs(model: str | None = None) -> list[tuple[Path, str]]:
    """Directories an output must never be written into, nor contain: the source model directory,
    gradprobe's cache (the embedded model) and the Hugging Face cache."""
    out: list[tuple[Path, str]] = []
    if model is not None and Path(model).expanduser().is_dir():
        out.append((Path(model).expanduser().resolve(), "the source model directory"))
    from gradprobe.embedded import cache_dir

    out.append((cache_dir().parent.expanduser().resolve(), "gradprobe's cache directory"))
    try:
        from huggingface_hub import constants

        out.append((Path(constants.HF_HUB_CACHE).expanduser().resolve(), "the Hugging Face cache"))
    except ImportError:
        pass
    return out


def check_out_location(out: Path, flag: str = "--out") -> None:
    """``out``'s parent (or the nearest existing ancestor, where it will be created) must be a
    writable directory: the output, its staging and resume directories are all created there."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PreflightError(f"{flag} {str(out)!r}: {str(parent)!r} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.writable-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PreflightError(
            f"{flag} {str(out)!r} is not writable ({exc.strerror or exc} in {str(parent)!r}); "
            "choose a directory you can write to"
        ) from None


# --- the record of a run --------------------------------------------------------------------------

# argparse destinations that do not change the pruned weights (a rerun may change them and resume)
NOT_RESULT = frozenset({
    "command", "out", "overwrite", "resume", "no_eval", "no_plot", "json", "device", "dist_timeout",
    "eval_source", "eval_context", "eval_stride", "eval_windows", "eval_tasks", "tasks",
})


def jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return str(value)


def arguments(args: Any) -> dict[str, Any]:
    """Every parsed option (``vars(args)``) as JSON: options added later are recorded without a change here."""
    return {k: jsonable(v) for k, v in sorted(vars(args).items()) if not callable(v)}


def resume_identity(args: Any, config: Any) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: every option that can change the
    pruned weights (all but :data:`NOT_RESULT`) and the effective config."""
    opts = {k: v for k, v in arguments(args).items() if k not in NOT_RESULT}
    return {"options": opts, "config": jsonable(config.fingerprint())}


def versions() -> dict[str, str]:
    import torch

    import gradprobe

    out = {"gradprobe": getattr(gradprobe, "__version__", "?"), "torch": torch.__version__,
           "python": platform.python_version()}
    for mod in ("transformers", "safetensors", "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    try:
        from gradprobe import _extension

        out["gradprobe._C"] = "loaded" if _extension.available() else "not built"
    except Exception:  # the record must never fail the run
        out["gradprobe._C"] = "?"
    return out


def command_line(argv: list[str] | None) -> str:
    import shlex

    return shlex.join(["gradprobe", *(sys.argv[1:] if argv is None else argv)])
