"""Scope "global": one selection group over every prunable tensor of the model.

Two parts:

* :func:`select_global` — the exact global k-th score of tensors that are *visited* rather than held:
  each tensor is read (possibly loaded from disk) once per pass, and no pass keeps more than one
  tensor's scores. The result equals :func:`gradprobe.global_prune_` bit for bit. Under
  ``torch.distributed`` the ranks may each visit a disjoint share of the tensors; their integer
  counts are summed, so every rank gets the threshold one process gets.
* :func:`run_global` — the pipeline's scope-"global" run (``LayerwisePruner`` delegates to it): the
  dense-norm calibration pass, then the in-memory :func:`gradprobe.global_prune_` over every weight,
  or, with a :class:`~gradprobe.pipeline.calibration.LayerProvider` (``gradprobe prune --stream``),
  the streamed selection: two histogram passes and a mask pass, one layer in memory at a time.

The streamed selection (radix select on the scores' bit patterns)
-----------------------------------------------------------------
A score ``s = fp32(|W|) * |norm|`` (or ``fp32(|W|)``; :func:`gradprobe.select.score`) is ``>= +0.0``,
so its int32 bit pattern ``key`` orders exactly as the score does (``+inf`` from an overflowing
product included: ``0x7f800000`` is the largest key). With ``k = floor(sparsity * total)``:

1. pass 1: histogram of ``key >> 16`` (32768 bins, int64 counts) over every score; the k-th smallest
   key lies in bin ``b``, the first whose cumulative count reaches k (``below`` = the count of lower bins).
2. pass 2: histogram of ``key & 0xffff`` over the scores of bin ``b`` (65536 bins): the k-th key is
   ``t = b << 16 | lo`` with ``lo`` the first bin whose cumulative count reaches ``k - below``. Now
   ``less = count(key < t)``, ``equal = count(key == t)``, ``take = k - less``: the threshold triple
   of ``gradprobe::global_threshold``. Each tensor also keeps its sparse pass-2 histogram (at most
   65536 (bin, count) pairs, usually far fewer) so that ``equal`` splits into per-tensor counts.
3. mask pass: tensor ``j`` prunes ``key < t`` and the keys equal to ``t`` whose rank in group order
   (tensor position, row-major flat index) is ``<= take``; the ties before tensor ``j`` are the sum
   of the per-tensor equal counts of tensors ``0..j-1``, so any tensor's mask can be computed alone,
   in any order, on any rank (resume and data parallelism need nothing else).

Counts are integers, so summing them over ranks is exact in any order. Peak memory: one tensor, its
scores' temporaries for at most :data:`CHUNK` elements at a time, and the small histograms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradprobe import distributed
from gradprobe.ops._checks import check_finite
from gradprobe.pipeline.calibration import EMBEDDINGS, LM_HEAD, capture_calibration, dense_norm_pass
from gradprobe.select import check_norm, check_sparsity, check_weight, global_prune_, num_pruned, score

if TYPE_CHECKING:
    from gradprobe.pipeline.layerwise import LayerwisePruner
    from gradprobe.report import TensorRow

HI_SHIFT = 16
HI_BINS = 1 << 15  # key >> 16 of a score >= +0.0 is < 2^15 (sign bit 0)
LO_BINS = 1 << 16
LO_MASK = LO_BINS - 1
CHUNK = 1 << 20  # elements whose scores are formed at once (4 MiB of fp32 temporaries per array)

# the streamed checkpoint of a globally pruned layer also carries that layer's dense norms, so a
# resumed run can recompute the threshold without the norms checkpoint the layer record replaced
NORM_PREFIX = "norm/"

Visit = Callable[[], Iterable[tuple[int, torch.Tensor, "torch.Tensor | None"]]]


def _key_chunks(weight: torch.Tensor, norm: torch.Tensor | None, name: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(flat offset, int32 keys (n,)) of ``weight``'s scores in row-major order, a block of rows at a time.
    Raises ValueError on NaN / Inf weights (naming the first one) before the block is used."""
    w = weight.contiguous()
    rows = max(1, CHUNK // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], rows):
        part = w[r0 : r0 + rows]
        if not bool(torch.isfinite(part).all()):
            check_finite(w, name)
        yield r0 * w.shape[1], score(part, norm).view(torch.int32).reshape(-1)


def _first_reaching(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(first bin whose inclusive cumulative count is >= rank, count of the bins below it); rank >= 1."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype)).item())
    return b, int(cum[b - 1]) if b else 0


@dataclass
class GlobalSelection:
    """The exact global selection of tensors ``0..n-1`` (group order = tensor position, flat index).

    Attributes:
        k: how many scores are pruned, floor(sparsity * total).
        threshold: fp32 0-dim tensor, the k-th smallest score (``-inf`` when k == 0).
        take: how many scores equal to ``threshold`` are pruned (the first ones in group order).
        equal: how many scores of the group equal ``threshold``.
        equal_before: per tensor, the count of scores equal to ``threshold`` in the tensors before it.
        numels: per tensor, its number of elements.
        names: per tensor, the name error messages use.
    """

    k: int
    threshold: torch.Tensor
    take: int
    equal: int
    equal_before: list[int]
    numels: list[int]
    names: list[str]

    @property
    def key(self) -> int:
        """The threshold's int32 bit pattern (-1 when k == 0: below every key)."""
        return int(self.threshold.view(torch.int32)) if self.k else -1

    def mask(self, j: int, weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
        """bool mask (weight's shape, True = pruned) of tensor ``j``; ``weight`` (out, in) and ``norm``
        (in,) fp32 or None as when the selection was made (ValueError if its counts differ)."""
        if not 0 <= j < len(self.numels):
            raise IndexError(f"tensor index {j} out of range for a selection of {len(self.numels)} tensors")
        check_weight(weight, self.names[j])
        check_norm(norm, weight, f"norm of {self.names[j]}", self.names[j])
        if weight.numel() != self.numels[j]:
            raise ValueError(f"{self.names[j]} has {weight.numel()} elements but {self.numels[j]} were selected over")
        out = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        t, take, carry = self.key, self.take, self.equal_before[j]
        for off, key in _key_chunks(weight, norm, self.names[j]):
            m = key < t
            eq = key == t
            n_eq = int(eq.sum())
            if n_eq and carry < take:
                m |= eq & (torch.cumsum(eq, 0) + carry <= take)  # 1-based rank among the group's ties
            carry += n_eq
            out[off : off + key.numel()] = m
        after = self.equal_before[j + 1] if j + 1 < len(self.equal_before) else self.equal
        if self.k and carry != after:
            raise ValueError(
                f"{self.names[j]} holds {carry - self.equal_before[j]} scores equal to the threshold but held "
                f"{after - self.equal_before[j]} when the threshold was selected; its weights or norm changed "
                "between the passes"
            )
        return out.reshape(weight.shape)

    def prune_(self, j: int, weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
        """Zero in place (``+0.0``) what :meth:`mask` selects in tensor ``j``; returns the mask."""
        m = self.mask(j, weight, norm)
        weight.masked_fill_(m, 0)
        return m


def select_global(
    visit: Visit,
    numels: Sequence[int],
    sparsity: float,
    *,
    split: bool = False,
    names: Sequence[str] | None = None,
) -> GlobalSelection:
    """The exact global selection of ``len(numels)`` tensors that are visited, not held (two passes).

    Args:
        visit: called once per pass (twice); each call yields ``(j, weight, norm)``: tensor index
            ``j``, ``weight`` (out_j, in_j) float32/bfloat16/float16 (any device; not modified),
            ``norm`` (in_j,) float32 on weight's device or None (magnitude; all or none). A visit may
            load the tensor and drop it after the next item is asked for. Without ``split`` (or without
            a process group) every index is visited exactly once per pass, in any order.
        numels: numel of every tensor of the group, in group order (identical on every rank).
        sparsity: fraction in [0, 1); k = floor(sparsity * sum(numels)).
        split: under ``torch.distributed``, the ranks' visits partition the tensors (each rank scores its
            share; the counts are summed over ranks). False: every rank visits every tensor.
        names: per tensor, the name error messages use (default ``weights[j]``).

    Returns:
        A :class:`GlobalSelection` whose :meth:`GlobalSelection.mask` of every tensor equals
        ``gradprobe.global_prune_masks`` of all of them, bit for bit.

    Raises:
        ValueError: bad sparsity / numels, a tensor visited twice or never, a shape that is not its
            numel, norms for only some tensors, NaN / Inf weights (before anything is written).
    """
    sparsity = check_sparsity(sparsity)
    numels = [int(n) for n in numels]
    if not numels:
        raise ValueError("numels is empty; a global selection needs at least one tensor")
    if any(n < 0 for n in numels):
        raise ValueError(f"numels must be >= 0, got {numels}")
    names = [f"weights[{j}]" for j in range(len(numels))] if names is None else list(names)
    if len(names) != len(numels):
        raise ValueError(f"names has {len(names)} entries for {len(numels)} tensors")
    split = split and distributed.active()
    n = len(numels)
    k = num_pruned(sum(numels), sparsity)

    # pass 1: high digits; also the coverage check (each index once) and the finite check
    hist = torch.zeros(HI_BINS, dtype=torch.int64)
    seen = torch.zeros(2 * n, dtype=torch.int64)  # [visits per index | has-norm per index]
    for j, w, nrm in _checked(visit(), numels, names):
        seen[j] += 1
        seen[n + j] = int(nrm is not None)
        for _, key in _key_chunks(w, nrm, names[j]):
            hist += torch.bincount(key >> HI_SHIFT, minlength=HI_BINS).cpu()
    if split:
        both = distributed.all_sum_(torch.cat([hist, seen]))  # one collective for both
        hist, seen = both[:HI_BINS], both[HI_BINS:]
    _check_coverage(seen, names, split)

    if k == 0:
        thr = torch.tensor(float("-inf"), dtype=torch.float32)
        return GlobalSelection(k, thr, 0, 0, [0] * n, numels, names)

    b, below = _first_reaching(hist, k)
    del hist

    # pass 2: low digits of the keys in bin b, per tensor (sparse) and in total
    lo_hist = torch.zeros(LO_BINS, dtype=torch.int64)
    sparse: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for j, w, nrm in _checked(visit(), numels, names):
        h = torch.zeros(LO_BINS, dtype=torch.int64)
        for _, key in _key_chunks(w, nrm, names[j]):
            sel = key[(key >> HI_SHIFT) == b]
            if sel.numel():
                h += torch.bincount(sel & LO_MASK, minlength=LO_BINS).cpu()
        nz = h.nonzero().reshape(-1)
        sparse[j] = (nz.to(torch.int32), h[nz])
        lo_hist += h
    if split:
        distributed.all_sum_(lo_hist)
    lo, less_in_bin = _first_reaching(lo_hist, k - below)
    key_t = (b << HI_SHIFT) | lo
    equal = int(lo_hist[lo])
    take = k - below - less_in_bin

    per = torch.zeros(n, dtype=torch.int64)
    for j, (idx, cnt) in sparse.items():
        per[j] = cnt[idx == lo].sum()
    if split:
        distributed.all_sum_(per)
    if int(per.sum()) != equal:
        raise ValueError("the tensors changed between the selection passes (their threshold counts disagree)")
    before = torch.cumsum(per, 0) - per
    thr = torch.tensor(key_t, dtype=torch.int32).view(torch.float32)
    return GlobalSelection(k, thr, take, equal, before.tolist(), numels, names)


def _checked(items: Iterable, numels: list[int], names: list[str]) -> Iterator:
    """The visited items, each validated (index, shape, dtype, norm) before it is scored."""
    for j, w, nrm in items:
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < len(numels):
            raise ValueError(f"visit yielded tensor index {j!r}; indices must be ints in [0, {len(numels)})")
        check_weight(w, names[j])
        check_norm(nrm, w, f"norm of {names[j]}", names[j])
        if w.numel() != numels[j]:
            raise ValueError(f"{names[j]} has {w.numel()} elements but numels[{j}] = {numels[j]}")
        yield j, w, nrm


def _check_coverage(seen: torch.Tensor, names: list[str], split: bool) -> None:
    n = len(names)
    visits, has_norm = seen[:n], seen[n:]
    bad = (visits != 1).nonzero().reshape(-1).tolist()
    if bad:
        j = bad[0]
        where = "over all ranks" if split else "in one pass"
        raise ValueError(
            f"{names[j]} was visited {int(visits[j])} times {where}; every tensor must be visited exactly once per "
            "pass (with split=True the ranks' shares must partition the tensors)"
        )
    if 0 < int((has_norm > 0).sum()) < n:
        raise ValueError("norms must be given for every tensor (Wanda) or for none (magnitude), not for some")


# --------------------------------------------------------------------------------------------------
# the pipeline's scope "global"
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def run_global(p: LayerwisePruner, layer_seconds: dict[int, float], resumed: list[int]) -> list[TensorRow]:
    """Scope "global" of the run ``p``: dense norms (Wanda), then one selection over every prunable tensor."""
    norms = _dense_norms(p, layer_seconds, resumed) if p.wanda else None
    if p.provider is None:
        return _prune_in_memory(p, norms)
    return _prune_streamed(p, norms, layer_seconds, resumed)


def _kind(p: LayerwisePruner, i: int) -> str | None:
    """The kind ("norms" / "layer") of group i's record in the resume state, or None."""
    if p.resume is None:
        return None
    entry = p.resume.state["finished"].get(str(i))
    return None if entry is None else entry.get("kind", "layer")


def _dense_norms(p: LayerwisePruner, layer_seconds: dict[int, float], resumed: list[int]):
    """(layer, name) -> fp32 (in,) CPU norms of every prunable linear of the *dense* model (one
    calibration pass, dense outputs feed the next layer); each layer's norms are checkpointed."""
    p._materialize(EMBEDDINGS)
    calib = capture_calibration(p.model, p.batches, p.config, p.adapter)
    p._release(EMBEDDINGS)

    def restored(i: int) -> dict[str, torch.Tensor] | None:
        kind = _kind(p, i)
        if not distributed.all_true(kind is not None and p.resume.finished(i)):
            return None
        saved = p.resume.tensors(kind, i)
        if kind == "layer":  # pruned by the streamed mask pass: its dense norms ride along
            return {n[len(NORM_PREFIX):]: v for n, v in saved.items() if n.startswith(NORM_PREFIX)}
        return dict(saved)

    all_norms: dict[tuple[int, str], torch.Tensor] = {}
    bar = p._progress(len(p.groups), "wanda global: dense norms")
    walk = dense_norm_pass(calib, p.layers, lambda i: p.groups[i], p.config.device, restored=restored,
                           materialize=p._materialize, release=p._release)
    last = calib.inputs  # the last decoder layer's dense outputs: lm_head's input (after the final norm)
    t0 = time.perf_counter()
    for i, norms, done, out in walk:
        last = out
        if done:
            resumed.append(i)
            bar.set_postfix_str(_restored_note(resumed), refresh=False)
        for name, v in norms.items():
            all_norms[(i, name)] = v
        layer_seconds[i] = time.perf_counter() - t0
        if not done:
            p._finish_layer(i, [], layer_seconds[i], kind="norms", tensors=norms)
        bar.update(1)
        t0 = time.perf_counter()
    if p.num_layers in p.groups:  # lm_head: its input is the final norm of the last hidden state
        st = calib.head_stats(last)
        all_norms[(p.num_layers, LM_HEAD)] = st[LM_HEAD].norm().cpu()
        bar.update(1)
    bar.close()
    return all_norms


def _restored_note(resumed: list[int]) -> str:
    from gradprobe.pipeline.layerwise import restored_note

    return restored_note(sorted(set(resumed)))


def _keys(p: LayerwisePruner) -> list[tuple[int, str]]:
    """(group, name) of every prunable tensor in group order: decoder layers 0.., then lm_head."""
    return [(i, n) for i, g in p.groups.items() for n in g]


def _prune_in_memory(p: LayerwisePruner, norms) -> list[TensorRow]:
    """Every weight is in memory: one :func:`gradprobe.global_prune_` (the fused op of the weights' device)."""
    from gradprobe.pipeline.layerwise import _row

    keys = _keys(p)
    weights = [p.groups[i][n].weight.data for i, n in keys]
    ns = [norms[k].to(w.device) for k, w in zip(keys, weights, strict=True)] if norms is not None else None
    t0 = time.perf_counter()
    masks = global_prune_(weights, p.config.sparsity, norms=ns)
    secs = time.perf_counter() - t0
    if distributed.active():
        distributed.agree("global masks", distributed.masks_digest(masks))
    total = sum(w.numel() for w in weights)
    return [
        _row(i, n, w, m, p.config.sparsity, secs * w.numel() / total)
        for (i, n), w, m in zip(keys, weights, masks, strict=True)
    ]


def _prune_streamed(
    p: LayerwisePruner, norms, layer_seconds: dict[int, float], resumed: list[int]
) -> list[TensorRow]:
    """The weights come from ``p.provider`` one group at a time: two selection passes (under
    torch.distributed each rank scores a contiguous share of the groups), then the mask pass over every
    group in order (every rank, so the per-layer mask digests can be compared; rank 0 checkpoints the
    pruned layer, which the streamed writer copies into the output)."""
    from gradprobe.pipeline.layerwise import _row
    from gradprobe.stream import trim_heap

    keys = _keys(p)
    index = {key: j for j, key in enumerate(keys)}
    groups = list(p.groups)
    a, b = distributed.sample_range(len(groups))  # (0, len) without a process group
    share = groups[a:b]

    def norm_of(i: int, name: str) -> torch.Tensor | None:
        return None if norms is None else norms[(i, name)]

    def visit(what: str):
        bar = p._progress(len(share), f"global select: {what}")
        try:
            for i in share:
                p._materialize(i)
                try:
                    for name, lin in p.groups[i].items():
                        yield index[(i, name)], lin.weight.data, norm_of(i, name)
                        trim_heap()  # the tensor's score temporaries
                finally:
                    p._release(i)
                bar.update(1)
        finally:
            bar.close()

    passes = iter(("scores, high digits", "scores, low digits"))
    t0 = time.perf_counter()
    sel = select_global(
        lambda: visit(next(passes)),
        [p.groups[i][n].weight.numel() for i, n in keys],
        p.config.sparsity,
        split=True,
        names=[f"layer {i} {n}" for i, n in keys],
    )
    select_secs = time.perf_counter() - t0
    total = sum(sel.numels)

    rows: list[TensorRow] = []
    bar = p._progress(len(groups), "global select: masks")
    for i in groups:
        t0 = time.perf_counter()
        done = distributed.all_true(_kind(p, i) == "layer" and p.resume.finished(i))
        if done:
            rows += p.resume.rows(i)
            if i not in resumed:
                resumed.append(i)
            bar.set_postfix_str(_restored_note(resumed), refresh=False)
            layer_seconds[i] = p.resume.seconds(i)
            bar.update(1)
            continue
        p._materialize(i)
        layer_rows, masks = [], []
        share_secs = 0.0
        for name, lin in p.groups[i].items():
            j = index[(i, name)]
            t1 = time.perf_counter()
            m = sel.prune_(j, lin.weight.data, norm_of(i, name))
            secs = time.perf_counter() - t1 + select_secs * sel.numels[j] / total
            share_secs += secs
            layer_rows.append(_row(i, name, lin.weight, m, p.config.sparsity, secs))
            masks.append(m)
            trim_heap()
        if distributed.active():  # every rank selected the same masks, before anything is written
            distributed.agree(f"global masks of group {i}", distributed.masks_digest(masks))
        tensors = {n: lin.weight for n, lin in p.groups[i].items()}
        if norms is not None:
            tensors |= {NORM_PREFIX + n: norms[(i, n)] for n in p.groups[i]}
        layer_seconds[i] = layer_seconds.get(i, 0.0) + time.perf_counter() - t0
        p._finish_layer(i, layer_rows, layer_seconds[i], kind="layer", tensors=tensors)
        p._release(i)
        rows += layer_rows
        bar.update(1)
    bar.close()
    return rows
