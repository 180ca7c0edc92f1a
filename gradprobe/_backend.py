"""Backend registry: which implementation of a ``gradprobe::`` op runs for a tensor's device.

The dispatcher picks the device (``register_kernel(op, "cpu" | "cuda")``); this module picks the
backend for that device:

* ``auto`` (default): CPU -> ``cpp`` if ``gradprobe._C`` loaded, else ``reference``;
  CUDA -> ``cpp`` for the ops ``gradprobe._C`` has CUDA kernels for (the 2:4 packer, when the
  extension was built with CUDA), else ``triton`` if Triton imports, else ``reference``; any other
  device -> ``reference``.
  An automatic choice that is unavailable falls back silently (one warning for ``_C``).
* ``reference`` | ``cpp`` | ``triton``: forced with ``GRADPROBE_BACKEND`` or :func:`use_backend`.
  A forced backend that cannot run raises :class:`BackendUnavailableError` with a diagnosis.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "reference", "cpp", "triton")
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cpp", "triton", "reference")}
# module whose import registers a backend's implementations
_BACKEND_MODULES = {
    "reference": "gradprobe.ops.reference",
    "cpp": "gradprobe.ops._cpp",
    "triton": "gradprobe.kernels",
}

_IMPLS: dict[str, dict[str, Callable]] = {b: {} for b in BACKENDS if b != "auto"}
# (backend, op) -> device types it implements; absent = every device the backend runs on
_DEVICES: dict[tuple[str, str], frozenset[str]] = {}
_LOAD_ERRORS: dict[str, str] = {}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("gradprobe_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


def impl(op: str, backend: str, devices: tuple[str, ...] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``gradprobe::op``.

    ``devices``: the device types ``fn`` implements (the compiled extension registers CUDA kernels
    for some ops only); None = every device type the backend runs on.
    """

    def deco(fn: Callable) -> Callable:
        _IMPLS[backend][op] = fn
        if devices is not None:
            _DEVICES[(backend, op)] = frozenset(devices)
        return fn

    return deco


def requested_backend() -> str:
    """The backend asked for: :func:`use_backend` if active, else ``GRADPROBE_BACKEND``, else auto."""
    name = _override.get() or os.environ.get("GRADPROBE_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"GRADPROBE_BACKEND={name!r} is not one of {BACKENDS}; unset it or pick one of those")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (thread/context local); ``"auto"`` restores the default."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _why_unavailable(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on ``device_type`` (loading it on first use), else a diagnosis."""
    if backend == "triton":
        if device_type not in ("cuda", "cpu"):
            return f"Triton kernels run on CUDA tensors (got a {device_type} tensor)"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return (
                "Triton kernels run on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 "
                "in the environment before gradprobe (and triton) are imported, or move tensors to CUDA"
            )
    if backend == "cpp" and device_type not in ("cpu", "cuda"):
        return f"the compiled backend (gradprobe._C) implements CPU and CUDA tensors only (got a {device_type} tensor)"
    if backend not in _LOAD_ERRORS and not _IMPLS[backend]:
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
        except Exception as exc:  # noqa: BLE001 — any failure is reported in the diagnosis
            _LOAD_ERRORS[backend] = f"{type(exc).__name__}: {exc}"
    if backend in _LOAD_ERRORS:
        hint = {
            "cpp": "rebuild with `pip install --no-build-isolation -e .` (needs a C++17 compiler)",
            "triton": "install it with `pip install triton` (a version matching your torch)",
        }.get(backend, "")
        return f"the {backend} backend failed to load ({_LOAD_ERRORS[backend]}); {hint}"
    return None


def _implements(backend: str, op: str, device_type: str) -> bool:
    return op in _IMPLS[backend] and device_type in _DEVICES.get((backend, op), (device_type,))


def resolve(op: str, device_type: str) -> tuple[str, Callable]:
    """(backend name, implementation) of ``gradprobe::op`` for tensors on ``device_type``."""
    requested = requested_backend()
    if requested == "auto":
        for backend in _AUTO_ORDER.get(device_type, ("reference",)):
            if _why_unavailable(backend, device_type) is None and _implements(backend, op, device_type):
                return backend, _IMPLS[backend][op]
        raise NotImplementedError(f"gradprobe::{op} has no implementation for {device_type} tensors")
    why = _why_unavailable(requested, device_type)
    if why is not None:
        raise BackendUnavailableError(f"GRADPROBE_BACKEND={requested} requested for gradprobe::{op}, but {why}")
    if op not in _IMPLS[requested]:
        raise BackendUnavailableError(
            f"gradprobe::{op} has no {requested} implementation; use GRADPROBE_BACKEND=auto"
        )
    if not _implements(requested, op, device_type):
        has = ", ".join(sorted(_DEVICES[(requested, op)])) or "no device"
        hint = (" (the CUDA kernels of gradprobe._C are built only when torch has CUDA and nvcc is found at "
                "install time)" if requested == "cpp" and device_type == "cuda" else "")
        raise BackendUnavailableError(
            f"GRADPROBE_BACKEND={requested} requested for gradprobe::{op} on a {device_type} tensor, but that "
            f"backend implements it for {has} tensors only{hint}; use GRADPROBE_BACKEND=auto"
        )
    return requested, _IMPLS[requested][op]


def _first_tensor(args: tuple) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("gradprobe op called without a tensor argument")


def _make_kernel(op: str, device_type: str) -> Callable:
    def kernel(*args):
        return resolve(op, device_type)[1](*args)

    kernel.__name__ = f"{op}_{device_type}"
    return kernel


def _make_default(op: str) -> Callable:
    def kernel(*args):
        return resolve(op, _first_tensor(args).device.type)[1](*args)

    kernel.__name__ = f"{op}_default"
    return kernel


def register_dispatch(op_names: list[str]) -> None:
    """Route every op through :func:`resolve`: CPU and CUDA keys, plus a default for other devices."""
    for op in op_names:
        torch.library.register_kernel(f"gradprobe::{op}", None, _make_default(op))
        for device_type in _AUTO_ORDER:
            torch.library.register_kernel(f"gradprobe::{op}", device_type, _make_kernel(op, device_type))
