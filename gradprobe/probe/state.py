"""The probe's result: per-tensor cached state (:class:`TensorProbe`: candidates, their original values,
G0 / G1, the current decision) and the run's :class:`ProbeResult` (masks, re-deciding with another
threshold, the report, undo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradprobe.probe.rule import exact_key, select_by_key
from gradprobe.probe.tolerance import GradientThreshold, check_threshold, resolve_threshold
from gradprobe.report import PruneReport


@dataclass
class TensorProbe:
    """Cached probe state of one tensor; (k,) vectors are in row-major candidate order.

    Attributes:
        name: full parameter name. layer: decoder layer index. linear: name inside the layer.
        param: the weight parameter, (out, in).
        candidates: bool (out, in), the k candidates T.
        backup: (k,) original values of the candidates, weight dtype.
        g0, g1: (k,) float32, max |grad| before / after scaling the candidates by r.
        tau: the threshold the current decision used.
        mask: bool (out, in), the pruned candidates of the current decision.
        count: ``target="exact"`` only: the exact number to prune (per row if ``per_row``, else for
            the tensor); None for ``target="candidates"``.
        score: ``target="exact"`` only: (k,) float32 candidate scores (the tie-break of the rule).
    """

    name: str
    layer: int
    linear: str
    param: nn.Parameter
    candidates: torch.Tensor
    backup: torch.Tensor
    g0: torch.Tensor
    g1: torch.Tensor
    tau: float = 0.0
    mask: torch.Tensor | None = None
    count: int | None = None
    per_row: bool = True
    score: torch.Tensor | None = None

    def apply_(self, tau: float) -> torch.Tensor:
        """Restore all candidates, then zero those with g1 <= g0 * (1 + tau) (``target="candidates"``)
        or exactly ``count`` chosen by the exact rule (``target="exact"``); returns the pruned mask."""
        self.tau = tau
        if self.count is None:
            self.mask = torch.ops.gradprobe.probe_apply_(self.param.data, self.candidates, self.backup, self.g0,
                                                         self.g1, 1.0 + tau)
            return self.mask
        self.mask = select_by_key(self.candidates, exact_key(self.backup, self.g0, self.g1, tau), self.score,
                                  self.count, self.per_row)
        self.param.data.masked_scatter_(self.candidates, self.backup)
        self.param.data.masked_fill_(self.mask, 0)
        return self.mask

    def restore_(self) -> None:
        """Put every candidate back to its original value (undo the probe)."""
        self.param.data.masked_scatter_(self.candidates, self.backup)
        self.mask = None


@dataclass
class ProbeResult:
    """Everything one probe run produced; the model is pruned with ``masks``.

    Attributes:
        tensors: name -> :class:`TensorProbe` (the cache that threshold tuning reuses).
        threshold: the ``gradient_threshold`` spec used.
        seconds: wall time of the run; passes: gradient passes (forward+backward over all batches).
        restored: name -> mask of the tensors restored from ``resume_dir`` (no cache: :meth:`apply_` and
            :meth:`restore_` leave them as they are); ``info["resumed_layers"]`` their layers.
    """

    tensors: dict[str, TensorProbe]
    threshold: GradientThreshold
    mode: str
    seconds: float = 0.0
    passes: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    restored: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{name: bool mask}: probed tensors, then those restored from the resume checkpoint."""
        return {n: t.mask for n, t in self.tensors.items()} | self.restored

    def apply_(self, threshold: GradientThreshold) -> dict[str, torch.Tensor]:
        """Re-decide every tensor from the cached G0/G1 with another threshold (no gradient pass).

        Exact for ``mode="model"``. For ``"layerwise"`` it reuses each layer's statistics although
        they were gathered with the other layers decided under the old threshold (an approximation).
        """
        threshold = check_threshold(threshold)
        n_max = max(t.param.numel() for t in self.tensors.values())
        for t in self.tensors.values():
            t.apply_(resolve_threshold(threshold, t.name, t.layer, t.linear, t.param.numel(), n_max))
        self.threshold = threshold
        return self.masks

    def report(self, model: nn.Module) -> PruneReport:
        """This run as the one result type: :class:`gradprobe.report.PruneReport` of :attr:`masks`."""
        from gradprobe.config import PruneConfig

        a = self.info
        sparsity = a.get("sparsity", 0.0)
        config = PruneConfig(method=a.get("method", "wanda"), sparsity=sparsity, scope=a.get("scope", "row"),
                             progress=False)
        run = {"method": "gradient probe", "probe": {"mode": self.mode} | {
            k: a[k] for k in ("target", "candidate_sparsity", "reduction_factor", "order") if k in a}}
        return PruneReport.from_masks(model, self.masks, config, target=sparsity, seconds=self.seconds, run=run,
                                      resumed_layers=list(self.info.get("resumed_layers", [])))

    def restore_(self) -> None:
        """Undo the probe: every candidate gets its original value back."""
        for t in self.tensors.values():
            t.restore_()

    def num_pruned(self) -> int:
        return sum(int(t.mask.sum()) for t in self.tensors.values())

    def num_candidates(self) -> int:
        return sum(int(t.backup.numel()) for t in self.tensors.values())
