"""Pruning methods as selectors: the one step the layerwise pipeline asks a method for.

The pipeline (:mod:`gradprobe.pipeline.layerwise`) runs a decoder layer over the calibration windows,
collects the input statistics its method needs (:attr:`Selector.needs`), then hands the layer's
linears, their statistics and the plan's :class:`~gradprobe.plan.Target` of each to
:meth:`Selector.select_`, which zeroes the pruned weights in place and returns the masks. Everything
else (walking layers, devices, propagation, resume, distributed agreement) is the pipeline's.

Built in:

* :class:`ScoreSelector` — magnitude |W| or Wanda |W| * ||X_j||_2: the exact k smallest scores per
  row / per tensor, an exact count spread over rows, or N:M (the ``gradprobe::`` selection ops);
* :class:`SparseGPTSelector` — SparseGPT's OBS updates from the layer's Hessians (same targets);
* :class:`MaskFnSelector` — any per-tensor :class:`gradprobe.config.MaskFn` (the Wanda variant's
  :class:`gradprobe.variant.VariantMaskFn`, user hooks).

The gradient probe (:mod:`gradprobe.probe`) selects through the same exact ops, with a gradient pass
between candidate selection and decision; model-wide global scope is its own pass
(:mod:`gradprobe.pipeline.global_scope`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from gradprobe.config import PruneConfig
from gradprobe.plan import Target
from gradprobe.select import prune_
from gradprobe.stats import ChannelStats

NEEDS = ("weights", "norms", "hessian")


@dataclass
class TensorContext:
    """What a per-tensor ``mask_fn`` may need besides the weight."""

    layer_idx: int
    name: str
    config: PruneConfig
    module: nn.Linear
    stats: ChannelStats | None = None
    target: Target | None = None


class Selector(Protocol):
    """One pruning method, per decoder layer.

    Attributes:
        needs: the statistics the pipeline must collect before :meth:`select_`: "weights" (none,
            no calibration), "norms" (fp32 per-input-channel sums of squares) or "hessian" (also
            X^T X per linear).
    """

    needs: str

    def select_(
        self,
        layer_idx: int,
        linears: Mapping[str, nn.Linear],
        stats: Mapping[str, ChannelStats] | None,
        targets: Mapping[str, Target],
    ) -> dict[str, torch.Tensor]:
        """Prune every linear of ``linears`` in place to its target; {name: bool mask (out, in)}."""
        ...


def prune_rows_(weight: torch.Tensor, k: int, *, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Prune exactly ``k`` weights of ``weight`` (rows, cols) in place: the first ``k % rows`` rows
    prune ``k // rows + 1`` of their smallest scores, the others ``k // rows`` (ties -> lower index).

    Returns the bool mask (rows, cols), True = pruned.
    """
    rows, cols = weight.shape
    if not (0 <= k <= rows * cols):
        raise ValueError(f"k={k} must be in [0, {rows * cols}] for a weight of shape {(rows, cols)}")
    a, r = divmod(k, rows)
    w = weight if weight.is_contiguous() else weight.contiguous()
    mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    if r:
        mask[:r] = torch.ops.gradprobe.row_prune_(w[:r], norm, a + 1)
    if r < rows:
        mask[r:] = torch.ops.gradprobe.row_prune_(w[r:], norm, a)
    if w is not weight:
        weight.copy_(w)
    return mask


def prune_to_target_(weight: torch.Tensor, target: Target, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude (``norm=None``) or Wanda selection of ``weight`` (out, in) to ``target``, in place."""
    if target.nm is not None:
        return prune_(weight, None, norm=norm, structure=target.structure)
    if target.count is not None:
        return prune_rows_(weight, target.count, norm=norm)
    return prune_(weight, target.fraction, norm=norm, scope=target.scope)


def default_mask_fn(
    weight: torch.Tensor, norm: torch.Tensor | None, sparsity: float | None, ctx: TensorContext
) -> torch.Tensor:
    """The built-in selection as a per-tensor :class:`gradprobe.config.MaskFn` (for hooks that wrap it):
    ``ctx.target`` when the pipeline gives one, else ``sparsity`` with the config's scope / structure."""
    target = ctx.target
    if target is None:
        nm = ctx.config.nm
        target = Target(sparsity, scope=ctx.config.scope, nm=nm)
    return prune_to_target_(weight, target, norm)


def _norm(stats: Mapping[str, ChannelStats] | None, name: str, weight: torch.Tensor) -> torch.Tensor | None:
    return None if stats is None else stats[name].norm().to(weight.device)


@dataclass(frozen=True)
class ScoreSelector:
    """Magnitude (``needs="weights"``) or Wanda (``needs="norms"``) selection to each target."""

    needs: str = "norms"

    def select_(self, layer_idx, linears, stats, targets):
        return {
            name: prune_to_target_(lin.weight.data, targets[name], _norm(stats, name, lin.weight))
            for name, lin in linears.items()
        }


@dataclass(frozen=True)
class SparseGPTSelector:
    """SparseGPT (:func:`gradprobe.sparsegpt.sparsegpt_prune_`) with the layer's Hessians."""

    blocksize: int = 128
    percdamp: float = 0.01
    needs: str = "hessian"

    def select_(self, layer_idx, linears, stats, targets):
        from gradprobe.sparsegpt import sparsegpt_prune_

        out = {}
        for name, lin in linears.items():
            t = targets[name]
            hess = getattr(stats[name], "hessian", None) if stats is not None else None
            if hess is None:
                raise ValueError(
                    f"SparseGPT needs the Hessian of layer {layer_idx} {name}; use PruneConfig(method='sparsegpt')"
                )
            out[name] = sparsegpt_prune_(
                lin.weight.data,
                hess,
                None if t.count is not None or t.nm is not None else t.fraction,
                scope=t.scope,
                structure=t.structure,
                k=t.count,
                blocksize=self.blocksize,
                percdamp=self.percdamp,
            )
        return out


@dataclass(frozen=True)
class MaskFnSelector:
    """A per-tensor ``mask_fn(weight, norm, sparsity, ctx)`` (:class:`gradprobe.config.MaskFn`) as a selector."""

    mask_fn: Any
    config: PruneConfig
    needs: str = "norms"

    def select_(self, layer_idx, linears, stats, targets):
        out = {}
        for name, lin in linears.items():
            t = targets[name]
            ctx = TensorContext(layer_idx, name, self.config, lin, None if stats is None else stats[name], t)
            out[name] = self.mask_fn(lin.weight.data, _norm(stats, name, lin.weight), t.fraction if t.nm is None else None, ctx)
        return out


def selector_for(config: PruneConfig) -> Selector:
    """``config.selector``, else the selector of ``config.method`` (``config.mask_fn`` per tensor)."""
    from gradprobe.sparsegpt import SparseGPTMaskFn

    if config.selector is not None:
        return config.selector
    needs = {"magnitude": "weights", "wanda": "norms", "sparsegpt": "hessian"}[config.method]
    if isinstance(config.mask_fn, SparseGPTMaskFn):  # its settings, the selector's exact targets
        return SparseGPTSelector(config.mask_fn.blocksize, config.mask_fn.percdamp)
    if config.mask_fn is not None:
        return MaskFnSelector(config.mask_fn, config, needs=needs)
    if config.method == "sparsegpt":
        return SparseGPTSelector()
    return ScoreSelector(needs=needs)
