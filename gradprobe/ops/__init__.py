"""Operator layer: schemas (``_schemas``), reference implementations (``reference``), dispatch."""

from gradprobe import _backend
from gradprobe._backend import BackendUnavailableError, requested_backend, resolve, use_backend
from gradprobe.ops import reference  # noqa: F401  (registers the reference backend)
from gradprobe.ops._schemas import SCHEMAS

_backend.register_dispatch(list(SCHEMAS))

__all__ = ["BackendUnavailableError", "requested_backend", "resolve", "use_backend", "SCHEMAS"]
