"""The probe's gradient tolerance tau (``gradient_threshold``): its type, checks, scaling and the tau
of one tensor.

A candidate is pruned if G1 <= G0 * (1 + tau); tau is one float, a mapping (parameter name, decoder layer
index, linear name or "default" -> tau) or :class:`SizeAdaptive` (tau * sqrt(numel / n_ref)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class SizeAdaptive:
    """Size-adaptive threshold: tensor t gets tau_t = tau * sqrt(numel_t / n_ref).

    Attributes:
        tau: base threshold >= 0.
        n_ref: reference size; None = numel of the largest probed tensor (so tau_t <= tau).
    """

    tau: float
    n_ref: int | None = None

    def __post_init__(self) -> None:
        _check_tau(self.tau, "SizeAdaptive.tau")
        if self.n_ref is not None and (isinstance(self.n_ref, bool) or not isinstance(self.n_ref, int) or self.n_ref < 1):
            raise ValueError(f"SizeAdaptive.n_ref must be None or a positive int (a tensor size), got {self.n_ref!r}")


GradientThreshold = Union[float, Mapping[Any, float], SizeAdaptive]  # noqa: UP007  (runtime alias)
"""The gradient probe's tolerance tau: one float, a mapping (parameter name, layer index, linear name or
"default" -> tau) or :class:`SizeAdaptive`. (Not :class:`gradprobe.Threshold`, the exact k-th score of a group.)"""


def _check_tau(tau: Any, name: str) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(tau).__name__}")
    tau = float(tau)
    if not (tau >= 0.0 and math.isfinite(tau)):
        raise ValueError(f"{name} must be a finite float >= 0 (prune if G1 <= G0 * (1 + tau)), got {tau}")
    return tau


def check_threshold(spec: Any) -> GradientThreshold:
    """Validate ``gradient_threshold``: a float >= 0, a mapping, or :class:`SizeAdaptive`."""
    if isinstance(spec, SizeAdaptive):
        return spec
    if isinstance(spec, Mapping):
        for k, v in spec.items():
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise TypeError(
                    f"gradient_threshold mapping keys must be layer indices (int), parameter names or linear "
                    f"names like 'mlp.down_proj' (str), or 'default'; got {k!r}"
                )
            _check_tau(v, f"gradient_threshold[{k!r}]")
        return dict(spec)
    return _check_tau(spec, "gradient_threshold")


def scale_threshold(spec: GradientThreshold, factor: float) -> GradientThreshold:
    """The threshold spec with every tau multiplied by ``factor`` (used by the threshold search)."""
    if isinstance(spec, SizeAdaptive):
        return SizeAdaptive(spec.tau * factor, spec.n_ref)
    if isinstance(spec, Mapping):
        return {k: v * factor for k, v in spec.items()}
    return spec * factor


def threshold_is_zero(spec: GradientThreshold) -> bool:
    if isinstance(spec, SizeAdaptive):
        return spec.tau == 0.0
    if isinstance(spec, Mapping):
        return all(v == 0.0 for v in spec.values())
    return spec == 0.0


def resolve_threshold(spec: GradientThreshold, name: str, layer: int, linear: str, numel: int, n_max: int) -> float:
    """tau of one tensor. Mapping lookup order: full parameter name, layer index, linear name, "default" (else 0)."""
    if isinstance(spec, SizeAdaptive):
        n_ref = spec.n_ref if spec.n_ref is not None else n_max
        return spec.tau * math.sqrt(numel / n_ref)
    if isinstance(spec, Mapping):
        for key in (name, layer, linear, "default"):
            if key in spec:
                return float(spec[key])
        return 0.0
    return float(spec)
