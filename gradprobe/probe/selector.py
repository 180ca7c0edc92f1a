"""The gradient probe as a selector of the layerwise pipeline (:mod:`gradprobe.methods`).

Per decoder layer, in the pipeline's forward order (each layer's inputs come from the already pruned
layers before it), with the block-local ("regional") loss L = ||layer(x)||_2^2 (fp32) of the layer's
pipeline inputs: G0 = max |dL/dW| over the calibration windows, candidates = the target's smallest
scores (exact ops), candidates scaled by r, G1 the same statistic, prune the candidates with
G1 <= G0 (1 + tau) and restore the others bit for bit — the same decision as
``probe_prune_(mode="regional", order="forward")``, run by the pipeline (one layer on the device,
resume, several processes) instead of the probe's own loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradprobe.plan import Target
from gradprobe.probe.modes import _probe_group, _undo
from gradprobe.probe.targets import _Target
from gradprobe.probe.tolerance import GradientThreshold, check_threshold
from gradprobe.select import prune_mask
from gradprobe.stats import ChannelStats

GradientFn = Callable[[Sequence[nn.Parameter]], list[torch.Tensor]]


@dataclass(frozen=True)
class ProbeSelector:
    """``PruneConfig(selector=ProbeSelector(...))``: the gradient probe inside the pipeline.

    Attributes:
        method: "wanda" (candidates by |W| * ||X_j||, the pipeline collects the norms) or "magnitude".
        reduction_factor: r in (0, 1), the candidates' scale for the G1 pass.
        gradient_threshold: tau >= 0 (float, a mapping keyed by layer index / linear name / "default",
            or :class:`gradprobe.probe.SizeAdaptive`).
        gradients: True: the pipeline passes ``select_`` a gradient callback (block-local loss).
    """

    method: str = "wanda"
    reduction_factor: float = 0.1
    gradient_threshold: GradientThreshold = 0.0
    gradients: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("wanda", "magnitude"):
            raise ValueError(f"ProbeSelector.method must be 'wanda' or 'magnitude', got {self.method!r}")
        r = self.reduction_factor
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) < 1.0:
            raise ValueError(f"ProbeSelector.reduction_factor must be a float in (0, 1), got {r!r}")
        check_threshold(self.gradient_threshold)

    @property
    def needs(self) -> str:
        return "norms" if self.method == "wanda" else "weights"

    def select_(self, layer_idx: int, linears: Mapping[str, nn.Linear], stats: Mapping[str, ChannelStats] | None,
                targets: Mapping[str, Target], gradients: GradientFn | None = None) -> dict[str, torch.Tensor]:
        """:meth:`gradprobe.methods.Selector.select_` with the pipeline's gradient callback ``gradients``."""
        if gradients is None:
            raise ValueError("ProbeSelector needs the pipeline's gradient callback (gradients=...)")
        bad = [n for n, t in targets.items() if t.nm is not None or t.count is not None]
        if bad:
            raise ValueError(
                f"ProbeSelector prunes fractions per row or per tensor; layer {layer_idx} {bad[0]} has an N:M or "
                "exact-count target (the probe restores candidates, which an N:M group or a count cannot absorb)"
            )
        probed = [_Target(n, layer_idx, n, lin) for n, lin in linears.items()]

        def cands() -> list[tuple[torch.Tensor, None]]:
            out = []
            for t in probed:
                norm = stats[t.name].norm().to(t.param.device) if self.method == "wanda" and stats is not None else None
                tgt = targets[t.name]
                out.append((prune_mask(t.param.data, tgt.fraction, norm=norm, scope=tgt.scope), None))
            return out

        changed: list = []  # the undo log: an interrupted probe leaves the layer as it found it
        n_max = max(t.param.numel() for t in probed)
        try:
            got = _probe_group(gradients, changed, probed, cands, self.reduction_factor, self.gradient_threshold,
                               n_max)
        except BaseException:
            _undo(changed)
            raise
        return {n: tp.mask for n, tp in got.items()}
