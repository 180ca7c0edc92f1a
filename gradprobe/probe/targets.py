"""The model side: the probed linears of each decoder layer (``_Target``) and the Wanda activation norms
of their inputs collected by forward pre-hooks (``_Norms``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradprobe.stats import ChannelStats


@dataclass
class _Target:
    name: str
    layer: int
    linear: str
    module: nn.Linear

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight


def _targets(model: nn.Module, adapter) -> list[list[_Target]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        out.append([_Target(names[id(m.weight)], i, lin, m) for lin, m in adapter.prunable_linears(layer).items()])
    return out


class _Norms:
    """Wanda norms ||X_j||_2 of the probed linears' inputs, accumulated by :class:`gradprobe.stats.ChannelStats`
    (fp32 per-window partials in window order, as every other collector) from forward pre-hooks.

    ``counting()`` says whether a forward counts: the streamed backward's recomputation of a layer
    does not (its tokens were counted in the forward)."""

    def __init__(self, targets: Sequence[_Target], device: torch.device, counting: Callable[[], bool] = lambda: True):
        self.stats = {t.name: ChannelStats(t.module.in_features, device) for t in targets}
        self.counting = counting
        self.handles = [t.module.register_forward_pre_hook(self._hook(t.name)) for t in targets]
        self.result: dict[str, torch.Tensor] | None = None

    def _hook(self, name: str):
        def hook(mod, args):
            if self.counting():
                self.stats[name].add(args[0].detach())

        return hook

    def close(self) -> None:
        """Remove the hooks (safe on an error path: no collective)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def remove(self) -> dict[str, torch.Tensor]:
        """Remove the hooks; {name: ||X_j||_2 (in_features,) fp32}, combined across ranks in global window
        order. Idempotent (computed once)."""
        self.close()
        if self.result is None:
            for st in self.stats.values():
                st.all_reduce()
            self.result = {n: st.norm() for n, st in self.stats.items()}
        return self.result
