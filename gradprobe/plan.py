"""The plan of a run: what every prunable tensor loses, fixed before the first layer is touched.

A :class:`Target` per (layer index, tensor name) is one of

* a fraction with a scope: ``scope="row"`` prunes floor(f * in_features) of every row, ``"layer"``
  floor(f * numel) of the tensor (uniform, per-layer lists / mappings, ``sparsity_fn``);
* an exact count (an :class:`gradprobe.allocation.Allocation`: OWL, explicit): exactly ``count``
  weights, the first ``count % rows`` rows one more than the others — consumed as a count, never
  turned into a fraction and back;
* N:M: N of every M consecutive inputs.

:func:`build_plan` validates the sparsity specification against the model once (list length, layer
indices, N:M divisibility) and is the only place that resolves it; the pipeline's selectors
(:mod:`gradprobe.methods`) read only the plan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from gradprobe.config import PruneConfig, check_fraction
from gradprobe.select import parse_structure


@dataclass(frozen=True)
class Target:
    """What one tensor (out_features, in_features) loses.

    Attributes:
        fraction: the planned fraction (reported as the row's target): the requested one, or
            count / numel for a count, or N/M for N:M.
        scope: "row" or "layer": how ``fraction`` becomes counts when ``count`` is None.
        count: exact number of weights to prune, spread over rows, or None.
        nm: (N, M) for N:M structure, or None.
    """

    fraction: float | None
    scope: str = "row"
    count: int | None = None
    nm: tuple[int, int] | None = None

    @property
    def structure(self) -> str | None:
        """``"N:M"`` or None."""
        return None if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"

    def num_pruned(self, shape: tuple[int, int]) -> int:
        """Exactly how many weights of a tensor of ``shape`` this target prunes."""
        rows, cols = shape
        if self.nm is not None:
            return rows * (cols // self.nm[1]) * self.nm[0]
        if self.count is not None:
            return self.count
        if self.scope == "row":
            return rows * math.floor(self.fraction * cols)
        return math.floor(self.fraction * rows * cols)


Plan = dict[tuple[int, str], Target]


def resolve_sparsity(
    config: PruneConfig, names: list[tuple[int, str]], num_layers: int
) -> dict[tuple[int, str], float | None]:
    """Target fraction of every (layer index, tensor name) from ``config.sparsity`` / ``sparsity_fn``.

    lm_head has layer index ``num_layers``. A per-layer list needs ``num_layers`` entries (one more
    when lm_head is pruned); a mapping may omit layers (they stay dense). Under N:M every fraction is
    None. ``config.sparsity_fn(layer_idx, name, config)`` overrides all of this.
    """
    has_head = any(i == num_layers for i, _ in names)
    n_expected = num_layers + int(has_head)
    s = config.sparsity
    if isinstance(s, tuple) and len(s) != n_expected:
        raise ValueError(
            f"PruneConfig.sparsity has {len(s)} entries but the model has {num_layers} decoder layers"
            + (" (+1 for lm_head)" if has_head else "")
            + f"; give {n_expected}"
        )
    if isinstance(s, dict):
        bad = [k for k in s if k >= n_expected]
        if bad:
            raise ValueError(
                f"PruneConfig.sparsity has layer indices {bad} but the model has layers 0..{n_expected - 1}"
            )
    out: dict[tuple[int, str], float | None] = {}
    for i, name in names:
        if config.structure is not None:
            v: float | None = None
        elif config.sparsity_fn is not None:
            v = check_fraction(config.sparsity_fn(i, name, config), f"sparsity_fn({i}, {name!r})")
        elif isinstance(s, tuple):
            v = s[i]
        elif isinstance(s, dict):
            v = s.get(i, 0.0)
        else:
            v = s
        out[(i, name)] = v
    return out


def check_nm_shapes(nm: tuple[int, int] | None, structure: str | None, linears: Mapping[tuple[int, str], nn.Linear]) -> None:
    """ValueError naming the first tensor whose in_features is not a multiple of M."""
    if nm is None:
        return
    m = nm[1]
    for (i, n), lin in linears.items():
        if lin.in_features % m:
            raise ValueError(
                f"structure={structure!r} needs in_features divisible by {m}; "
                f"layer {i} {n} has in_features={lin.in_features}"
            )


def build_plan(config: PruneConfig, groups: Mapping[int, Mapping[str, nn.Linear]], num_layers: int) -> Plan:
    """The :class:`Target` of every tensor of ``groups`` ({layer index: {name: linear}}; lm_head is
    layer ``num_layers``), from ``config.allocation`` (exact counts), ``config.structure`` (N:M) or the
    sparsity specification. Raises ValueError before anything is touched."""
    linears = {(i, n): lin for i, g in groups.items() for n, lin in g.items()}
    nm = parse_structure(config.structure)
    check_nm_shapes(nm, config.structure, linears)
    if nm is not None:
        return {k: Target(nm[0] / nm[1], scope=config.scope, nm=nm) for k in linears}
    alloc = config.allocation
    if alloc is not None:
        missing = [k for k in linears if k not in alloc.counts]
        if missing:
            raise ValueError(
                f"PruneConfig.allocation has no count for {missing[:3]}; build the allocation for this model "
                "(gradprobe.allocation.model_layout(model))"
            )
        plan: Plan = {}
        for k, lin in linears.items():
            count = alloc.counts[k]
            numel = lin.out_features * lin.in_features
            if not 0 <= count <= numel:
                raise ValueError(f"PruneConfig.allocation count {count} of {k} is outside [0, {numel}]")
            plan[k] = Target(count / numel if numel else 0.0, count=count)
        return plan
    fractions = resolve_sparsity(config, list(linears), num_layers)
    return {k: Target(f, scope=config.scope) for k, f in fractions.items()}
