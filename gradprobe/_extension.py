"""Lazy loader for the compiled extension ``gradprobe._C`` (C++/OpenMP CPU ops, CUDA 2:4 packer).

``import gradprobe`` never needs it. :func:`load` imports it once; on failure it logs one warning and
remembers the reason, which :func:`diagnosis` reports (``python -m gradprobe.env`` prints it).
"""

from __future__ import annotations

import importlib
import logging
import types

_log = logging.getLogger("gradprobe")
_module: types.ModuleType | None = None
_error: str | None = None


def load() -> types.ModuleType:
    """Import ``gradprobe._C`` (registering the ``gradprobe_cpp::`` ops) or raise ImportError with the reason."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is None:
        try:
            import torch  # noqa: F401  (libtorch must be loaded before the extension)

            _module = importlib.import_module("gradprobe._C")
            return _module
        except ImportError as exc:
            _error = str(exc)
            _log.warning("gradprobe._C not available (%s); CPU ops use the PyTorch reference", exc)
    raise ImportError(
        f"gradprobe._C could not be loaded ({_error}); build it with `pip install --no-build-isolation -e .`"
    )


def available() -> bool:
    try:
        load()
        return True
    except ImportError:
        return False


def diagnosis() -> str:
    """'loaded (path)' or the reason it is not."""
    if available():
        return f"loaded ({_module.__file__})"
    return f"not loaded: {_error}"
