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
from gradprobe.probe.state import TensorProbe
from gradprobe.probe.tolerance import GradientThreshold, check_threshold, resolve_threshold
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
        names = list(linears)
        params = [linears[n].weight for n in names]
        g0 = gradients(params)
        with torch.no_grad():
            cands = []
            for n, p in zip(names, params, strict=True):
                norm = stats[n].norm().to(p.device) if self.method == "wanda" and stats is not None else None
                t = targets[n]
                cands.append(prune_mask(p.data, t.fraction, norm=norm, scope=t.scope))
            g0c = [g[m].to(torch.float32) for g, m in zip(g0, cands, strict=True)]
            del g0
            backups = []
            for p, m in zip(params, cands, strict=True):
                b = p.data[m]  # the only copy kept: the candidates' original values
                backups.append(b)
                p.data.masked_scatter_(m, b * self.reduction_factor)
        try:
            g1 = gradients(params)
        except BaseException:
            with torch.no_grad():  # an interrupted probe leaves the layer as it found it
                for p, m, b in zip(params, cands, backups, strict=True):
                    p.data.masked_scatter_(m, b)
            raise
        n_max = max(p.numel() for p in params)
        out = {}
        with torch.no_grad():
            for n, p, m, b, a, g in zip(names, params, cands, backups, g0c, g1, strict=True):
                tp = TensorProbe(n, layer_idx, n, p, m, b, a, g[m].to(torch.float32))
                out[n] = tp.apply_(resolve_threshold(self.gradient_threshold, n, layer_idx, n, p.numel(), n_max))
        return out
