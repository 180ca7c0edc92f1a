"""Forward-hook accumulators of per-input-channel activation statistics (fp32).

For a linear ``y = x W^T`` with input ``x`` of shape (..., in_features) the Wanda statistic is the
per-column sum of squares over all calibration tokens, ``sumsq[j] = sum_t x[t, j]^2`` (float32), and
its norm ``||X_j||_2 = sqrt(sumsq[j])``. Linears fed the same tensor (q/k/v, gate/up) share one
computation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Per-channel fp32 sum of squares of x (..., in) over all leading dims -> (in,) float32."""
    xf = x.reshape(-1, x.shape[-1]).float()
    return (xf * xf).sum(dim=0)


class ChannelStats:
    """Running fp32 sum of squares (in_features,) and token count for one linear's input."""

    def __init__(self, in_features: int, device: torch.device | str):
        self.sumsq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, sq: torch.Tensor | None = None) -> None:
        """Accumulate x (..., in_features); ``sq`` = precomputed :func:`sum_of_squares` (x)."""
        self.sumsq += sum_of_squares(x) if sq is None else sq
        self.tokens += x.numel() // x.shape[-1]

    def norm(self) -> torch.Tensor:
        """||X_j||_2 = sqrt(sum of squares), (in_features,) float32."""
        return torch.sqrt(self.sumsq)


class LayerStats:
    """Context manager: forward pre-hooks on ``linears`` accumulating :class:`ChannelStats`.

    Usage::

        with LayerStats(adapter.prunable_linears(layer)) as st:
            layer(x, **kwargs)
        norms = st.norms()   # {name: (in_features,) float32}
    """

    def __init__(self, linears: Mapping[str, nn.Linear]):
        self.linears = dict(linears)
        self.stats: dict[str, ChannelStats] = {
            name: ChannelStats(lin.in_features, lin.weight.device) for name, lin in self.linears.items()
        }
        self._handles: list = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def _hook(self, name: str):
        def hook(_module, args, kwargs=None):
            x = args[0] if args else kwargs["input"]
            if self._last is not None and self._last[0] is x:
                sq = self._last[1]
            else:
                sq = sum_of_squares(x)
                self._last = (x, sq)
            self.stats[name].add(x, sq)

        return hook

    def __enter__(self) -> LayerStats:
        for name, lin in self.linears.items():
            self._handles.append(lin.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def norms(self) -> dict[str, torch.Tensor]:
        """{name: (in_features,) float32 ||X_j||_2} over everything seen so far."""
        return {name: st.norm() for name, st in self.stats.items()}
