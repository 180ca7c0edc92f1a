"""Data-parallel calibration over ``torch.distributed`` (``torchrun --nproc_per_node=N -m gradprobe``).

Every function here is a no-op (or the identity) when ``torch.distributed`` is not initialised or the
world has one rank, so single-process runs pay nothing.

Model of a run with W ranks:

* The calibration samples are split into contiguous ranges, rank r gets samples
  ``[r * n // W, (r + 1) * n // W)`` (:func:`sample_range`); each rank embeds, runs and propagates only
  its own samples through the current layer on its own device.
* Statistics are combined so that the result does not depend on W, bit for bit:

  - Wanda's per-channel sum of squares is *defined* as the fp32 sum, in global sample order, of
    per-sample fp32 partials (each sample's own reduction over its tokens, independent of the batch
    it rides in): ``acc = 0; for s in samples: acc += partial[s]``. Each rank keeps its partials
    (nsamples_local, in_features) fp32; :func:`gather_rows` all-gathers them in rank order = sample
    order and the sum is then formed exactly as the single-process path forms it.
  - the gradient probe's max |grad| is an element-wise max (:func:`all_max_`): exact in any order;
    NaN sticks as in ``gradprobe::probe_accumulate_`` (gloo's MAX does not propagate NaN reliably, so
    NaN positions travel separately).
  - integer counts (OWL's outliers) are computed from the reduced norms, identical on every rank.
  - the streamed global selection's score histograms (:func:`all_sum_`): each rank counts the scores of
    its own share of the tensors; integer sums are exact in any order.

* Every rank computes the same masks; :func:`agree` proves it (all-gather of a sha256 per step) before
  anything is written, and only rank 0 writes (:func:`is_writer`).
* Errors: every collective here first all-reduces an error flag. :func:`guard` wraps a rank's work: an
  exception inside it sends the flag (and its message) to the others, which then raise
  :class:`RankFailedError` at their next collective instead of waiting for data that never comes. A
  collective that does not complete fails after the process group's timeout
  (``init_process_group(timeout=...)``, ``--dist-timeout`` on the command line).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


class RankFailedError(RuntimeError):
    """Another rank of the process group failed; raised on every rank (the message names the rank)."""


class _State:
    failed = False  # a failure was exchanged (every rank knows): not announced again by an outer guard
    broken = False  # a collective itself raised (timeout, dead peer): no more collectives
    depth = 0  # nesting of guard()


_state = _State()


def active() -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """True on the one process that writes files (rank 0, or a single process)."""
    return rank() == 0


def sample_range(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """Contiguous range ``[r * n // w, (r + 1) * n // w)`` of the ``n`` samples that rank ``r`` of ``w``
    handles (default: this process). Ranges of ranks 0..w-1 tile [0, n) in order."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return r * n // w, (r + 1) * n // w


def local_slice(x: torch.Tensor) -> torch.Tensor:
    """This rank's samples of ``x`` (nsamples, ...) (a view; all of ``x`` without a process group)."""
    if not active():
        return x
    a, b = sample_range(x.shape[0])
    return x[a:b]


def local_items(items: Sequence) -> list:
    """This rank's contiguous share of a list (e.g. the probe's calibration batches)."""
    a, b = sample_range(len(items))
    return list(items[a:b])


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flag(message: str | None) -> None:
    """The error-flag exchange that opens every collective: raises on every rank if any rank failed."""
    if _state.broken:
        raise RankFailedError("a collective of this process group failed (timeout or dead rank); no further "
                              "collectives: destroy the group and start again")
    try:
        flag = torch.tensor([0 if message is None else 1], dtype=torch.int32, device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return
        msgs: list = [None] * world_size()
        dist.all_gather_object(msgs, message)
    except RankFailedError:
        raise
    except Exception as exc:
        _state.broken = True
        raise RankFailedError(
            f"rank {rank()}: a collective failed ({type(exc).__name__}: {exc}); another rank died or "
            "timed out (process group timeout)"
        ) from exc
    _state.failed = True
    failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(msgs) if m is not None)
    raise RankFailedError(f"distributed run failed on another rank ({failed}); rank {rank()} stops too")


def _checked(fn):
    """Run the collective ``fn()`` after the error-flag exchange; a failing collective marks the group broken."""
    _flag(None)
    try:
        return fn()
    except Exception as exc:
        _state.broken = True
        raise RankFailedError(
            f"rank {rank()}: a collective failed ({type(exc).__name__}: {exc}); another rank died or timed out"
        ) from exc


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn an exception on one rank into an error on all: on exception, this rank announces it at the
    others' next collective and re-raises its own error; the others raise :class:`RankFailedError`.
    Nested guards announce once. No-op without a process group."""
    if not active():
        yield
        return
    if _state.depth == 0:
        _state.failed = _state.broken = False
    _state.depth += 1
    try:
        yield
    except BaseException as exc:
        if not (_state.failed or _state.broken or isinstance(exc, RankFailedError)):
            with contextlib.suppress(RankFailedError):
                _flag(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        _state.depth -= 1


def barrier() -> None:
    """A synchronisation point that also delivers other ranks' failures (no-op without a group)."""
    if active():
        _flag(None)


def all_true(value: bool) -> bool:
    """True iff ``value`` is True on every rank (e.g. "this resume checkpoint verifies here")."""
    if not active():
        return value

    def run():
        t = torch.tensor([int(bool(value))], dtype=torch.int32, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    return _checked(run)


def all_sum_int(value: int) -> int:
    """Sum of the integer ``value`` over ranks (exact)."""
    if not active():
        return value

    def run():
        t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())

    return _checked(run)


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    """In place: the integer tensor ``t`` <- its element-wise sum over ranks (exact in any order: integer
    counts, e.g. the global selection's score histograms when each rank scores its own share of the
    tensors). Returns ``t``; the identity without a process group."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"all_sum_ sums integer counts exactly; got {t.dtype} (a float sum would depend on the order)")
    if not active():
        return t

    def run():
        x = t.to(_comm_device())
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        if x is not t:
            t.copy_(x)
        return t

    return _checked(run)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (k_r, d) concatenated in rank order -> (sum_r k_r, d), same dtype/device as ``local``.

    With the contiguous split of :func:`sample_range` rank order is global sample order. Ranks may hold
    different numbers of rows (also 0); ``d`` and the dtype must agree.
    """
    if not active():
        return local

    def run():
        dev = _comm_device()
        counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world_size())]
        dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.int64, device=dev))
        ks = [int(c.item()) for c in counts]
        pad = max(ks)
        buf = torch.zeros((pad, *local.shape[1:]), dtype=local.dtype, device=dev)
        buf[: local.shape[0]].copy_(local)
        parts = [torch.empty_like(buf) for _ in ks]
        dist.all_gather(parts, buf)
        return torch.cat([p[:k] for p, k in zip(parts, ks, strict=True)]).to(local.device)

    return _checked(run)


def ordered_sum(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out += rows[0]; out += rows[1]; ...`` in row order (fp32 adds, one at a time: the one summation
    order every world size shares). ``rows`` (n, d); ``out`` (d,) (default zeros of rows' dtype)."""
    if out is None:
        out = torch.zeros(rows.shape[1:], dtype=rows.dtype, device=rows.device)
    for r in rows:
        out += r
    return out


def all_max_(t: torch.Tensor) -> torch.Tensor:
    """In place: ``t`` <- element-wise max over ranks, NaN sticky (a NaN on any rank gives NaN), as
    ``gradprobe::probe_accumulate_`` combines batches. Exact in any order. Returns ``t``."""
    if not active():
        return t

    def run():
        nan = torch.isnan(t)
        has = torch.tensor([int(bool(nan.any()))], dtype=torch.int32, device=_comm_device())
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        x = t.to(_comm_device())
        if has.item():  # NaN positions travel as a uint8 mask; the max runs on NaN-free values
            m = nan.to(device=x.device, dtype=torch.uint8)
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            x = x.masked_fill(nan.to(x.device), float("-inf"))
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
            x = x.masked_fill(m.bool(), float("nan"))
        else:
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        t.copy_(x)
        return t

    return _checked(run)


def masks_digest(masks: Iterable[torch.Tensor]) -> str:
    """sha256 over the shapes and bytes of boolean masks (in the given order)."""
    h = hashlib.sha256()
    for m in masks:
        m = m.detach().to("cpu", torch.bool).contiguous()
        h.update(f"{tuple(m.shape)}|".encode())
        h.update(m.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def agree(what: str, digest: str) -> None:
    """Raise on every rank unless all ranks hold the same ``digest`` of ``what`` (no-op alone)."""
    if not active():
        return

    def run():
        got: list = [None] * world_size()
        dist.all_gather_object(got, digest)
        return got

    got = _checked(run)
    if len(set(got)) != 1:
        _state.failed = True
        per_rank = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(got))
        raise RankFailedError(
            f"ranks computed different {what} ({per_rank}); nothing was written. The device or kernels are "
            "not deterministic across ranks: rerun with one process, or on identical devices"
        )


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1) with NCCL on
    CUDA and gloo on CPU and a collective timeout of ``timeout_s`` seconds; for CUDA also select the
    local rank's GPU. Returns True if this call created the group (destroy it with :func:`shutdown`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device is not None and device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=float(timeout_s))
    )
    return True


def rank_device(device: str) -> str:
    """The device of this rank: ``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun; anything else unchanged."""
    if active() and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
