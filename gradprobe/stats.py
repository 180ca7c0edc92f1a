"""Forward-hook accumulators of per-input-channel activation statistics (fp32).

For a linear ``y = x W^T`` with input ``x`` of shape (..., in_features) the Wanda statistic is the
per-column sum of squares over all calibration tokens, ``sumsq[j] = sum_t x[t, j]^2`` (float32), and
its norm ``||X_j||_2 = sqrt(sumsq[j])``. Linears fed the same tensor (q/k/v, gate/up) share one
computation.

With ``LayerStats(..., hessian=True)`` the hooks also accumulate SparseGPT's layer Hessian
``H = 2/N sum_t x_t x_t^T`` (:class:`HessianStats`, in_features^2 fp32, N = calibration windows seen),
one per distinct input tensor: linears fed the same tensor share one Hessian object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from gradprobe import distributed


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Per-channel fp32 sum of squares of x (..., in) over all leading dims -> (in,) float32."""
    xf = x.reshape(-1, x.shape[-1]).float()
    return (xf * xf).sum(dim=0)


def sample_sums_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Per-sample partials: x (..., seqlen, in) -> (samples, in) float32, row s = :func:`sum_of_squares`
    of sample s alone (its own reduction, whatever batch it rides in); a 2-D x is one sample."""
    if x.dim() <= 2:
        return sum_of_squares(x)[None]
    xs = x.reshape(-1, x.shape[-2], x.shape[-1])
    if xs.device.type == "cpu":
        # One mul and one reduction over the token dim for the whole batch. The CPU sum kernel reduces
        # each contiguous (seqlen, in) slab of (samples, seqlen, in) over seqlen exactly as it reduces
        # that slab alone (the same cascade over seqlen per column, vectorised along ``in``; the
        # threads split the outputs, never the seqlen sum), so every row has the bits of the
        # per-sample loop below (checked in tests/test_stats.py) at 2 ops instead of 2 per sample:
        # on a loaded CPU each op's thread hand-off costs far more than its arithmetic.
        xf = xs.contiguous().float()
        return (xf * xf).sum(dim=1)
    return torch.stack([sum_of_squares(s) for s in xs])


class HessianStats:
    """Running SparseGPT Hessian of one linear's input: ``H = 2/N sum_t x_t x_t^T``, (in, in) fp32.

    ``N`` counts calibration windows (leading dims of x except the token dim), as the published
    ``SparseGPT.add_batch``: per batch of ``n`` windows, ``H *= N / (N + n)``, ``N += n``, then
    ``H += (sqrt(2/N) x)^T (sqrt(2/N) x)`` over the batch's tokens, in fp32.
    """

    def __init__(self, in_features: int, device: torch.device | str):
        self.H = torch.zeros((in_features, in_features), dtype=torch.float32, device=device)
        self.nsamples = 0
        self.cache: dict = {}  # derived factors keyed by their settings (see gradprobe.sparsegpt)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate x (..., in_features), any float dtype."""
        n = math.prod(x.shape[:-2]) if x.dim() >= 3 else 1
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        xs = math.sqrt(2 / self.nsamples) * x.reshape(-1, x.shape[-1]).t().float()  # (in, tokens)
        self.H += xs.matmul(xs.t())
        self.cache.clear()


class ChannelStats:
    """Running fp32 sum of squares (in_features,) and token count for one linear's input.

    ``hessian``: the input's :class:`HessianStats` when the collector was asked for it, else None.
    """

    def __init__(self, in_features: int, device: torch.device | str):
        self.sumsq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.hessian: HessianStats | None = None
        self._parts: list[torch.Tensor] = []  # under torch.distributed: this rank's per-sample partials

    def add(self, x: torch.Tensor, sq: torch.Tensor | None = None) -> None:
        """Accumulate x (..., in_features); ``sq`` = precomputed :func:`sample_sums_of_squares` (x).

        ``sumsq`` is the fp32 sum of the per-sample partials, added one at a time in sample order (the
        definition every world size shares, see :mod:`gradprobe.distributed`)."""
        sq = sample_sums_of_squares(x) if sq is None else sq
        if sq.dim() == 1:  # one (in_features,) partial: a single sample
            sq = sq[None]
        if distributed.active():
            self._parts.append(sq)
        else:
            distributed.ordered_sum(sq, self.sumsq)
        self.tokens += x.numel() // x.shape[-1]

    def all_reduce(self) -> None:
        """Combine the ranks' partials into ``sumsq`` / ``tokens`` in global sample order (every rank the
        same result, equal to one process's); no-op without a process group. Call once, after the
        last :meth:`add`."""
        if not distributed.active():
            return
        local = torch.cat(self._parts) if self._parts else self.sumsq.new_zeros((0, self.sumsq.shape[0]))
        self._parts = []
        self.sumsq = distributed.ordered_sum(distributed.gather_rows(local))
        self.tokens = distributed.all_sum_int(self.tokens)

    def norm(self) -> torch.Tensor:
        """||X_j||_2 = sqrt(sum of squares), (in_features,) float32."""
        return torch.sqrt(self.sumsq)


class LayerStats:
    """Context manager: forward pre-hooks on ``linears`` accumulating :class:`ChannelStats`.

    Usage::

        with LayerStats(adapter.prunable_linears(layer)) as st:
            layer(x, **kwargs)
        norms = st.norms()   # {name: (in_features,) float32}

    ``hessian=True`` also fills ``st.stats[name].hessian`` (:class:`HessianStats`, shared by the
    linears that read the same input tensor, allocated when its first input arrives).
    """

    def __init__(self, linears: Mapping[str, nn.Linear], *, hessian: bool = False):
        self.linears = dict(linears)
        self.stats: dict[str, ChannelStats] = {
            name: ChannelStats(lin.in_features, lin.weight.device) for name, lin in self.linears.items()
        }
        self.hessian = hessian
        self._handles: list = []
        self._last: tuple[torch.Tensor, torch.Tensor, str] | None = None

    def _hook(self, name: str):
        def hook(_module, args, kwargs=None):
            x = args[0] if args else kwargs["input"]
            if self._last is not None and self._last[0] is x:
                sq, owner = self._last[1], self._last[2]
            else:
                sq, owner = sample_sums_of_squares(x), name
                self._last = (x, sq, name)
            st = self.stats[name]
            st.add(x, sq)
            if self.hessian:
                if owner == name:  # the first linear reading x accumulates its Hessian
                    if st.hessian is None:
                        st.hessian = HessianStats(x.shape[-1], x.device)
                    st.hessian.add(x)
                elif st.hessian is None:  # same input as ``owner``: same Hessian, shared
                    st.hessian = self.stats[owner].hessian

        return hook

    def __enter__(self) -> LayerStats:
        for name, lin in self.linears.items():
            self._handles.append(lin.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
        if exc_type is None and distributed.active():  # ranks' partials -> the same sums on every rank
            if self.hessian:
                raise ValueError(
                    "method='sparsegpt' is not supported with several processes (torch.distributed): its "
                    "Hessian sum depends on the summation order; run it in one process"
                )
            for st in self.stats.values():
                st.all_reduce()

    def norms(self) -> dict[str, torch.Tensor]:
        """{name: (in_features,) float32 ||X_j||_2} over everything seen so far."""
        return {name: st.norm() for name, st in self.stats.items()}
