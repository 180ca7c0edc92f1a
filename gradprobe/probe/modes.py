"""Running the probe: the arguments checked and the run set up (``_probe``), one probe step of a group
of tensors (``_probe_group``: G0 pass, candidates, scale by r, G1 pass, decide), and the modes that
order the steps: ``"model"`` (one step of every tensor) and ``"layerwise"`` / ``"regional"`` (one
decoder layer at a time), each resumable; on any error the model gets its values back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradprobe import distributed
from gradprobe._checkpoint import batches_digest
from gradprobe.pipeline.gradients import GradientRunner
from gradprobe.probe.args import _check_norms, _probe_arguments
from gradprobe.probe.resume import _norms_digest, _Resume
from gradprobe.probe.rule import _candidates, _Exact
from gradprobe.probe.state import ProbeResult, TensorProbe
from gradprobe.probe.targets import _Norms, _Target, _targets
from gradprobe.probe.tolerance import GradientThreshold, resolve_threshold


class _Runner(GradientRunner):
    """The pipeline's :class:`~gradprobe.pipeline.gradients.GradientRunner` with the probe's undo log:
    ``changed`` = (param, candidate mask, original candidate values) of every write the run made."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.changed: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []


def _probe(model: nn.Module, batches: torch.Tensor | Sequence[torch.Tensor], sparsity: float,
           **options: Any) -> ProbeResult:
    a = _probe_arguments(model, batches, sparsity, options)
    sparsity, r, threshold, batch_list = a["sparsity"], a["reduction_factor"], a["gradient_threshold"], a["batches"]
    method, scope, mode, order, norms, layers = a["method"], a["scope"], a["mode"], a["order"], a["norms"], a["layers"]
    from gradprobe.models import get_adapter

    adapter = get_adapter(model)
    groups = _targets(model, adapter)
    if layers is not None:
        bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < len(groups))]
        if bad or not layers:
            raise ValueError(f"layers must be a non-empty list of decoder layer indices in [0, {len(groups)}), got {list(layers)}")
        groups = [g if i in set(layers) else [] for i, g in enumerate(groups)]
    all_targets = [t for g in groups for t in g]
    if norms is not None:
        missing = [t.name for t in all_targets if t.name not in norms]
        if missing:
            raise ValueError(f"norms has no entry for {missing[:3]} (and {max(0, len(missing) - 3)} more); give one per probed weight")
    _check_norms(norms, all_targets)
    from gradprobe.pipeline.calibration import check_token_ids

    for i, b in enumerate(batch_list):
        check_token_ids(b, getattr(model.config, "vocab_size", None), f"batches[{i}]")
    n_max = max(t.param.numel() for t in all_targets)
    home = all_targets[0].param.device
    device = home if a["device"] is None else a["device"]
    if not a["streamed"] and device != home:
        raise ValueError(f"device={device}: streamed=False runs the whole model's autograd graph where the model is "
                         f"({home}); pass device=None, or streamed=True to hold one layer at a time on {device}")
    if len(batch_list) < distributed.world_size():
        raise ValueError(f"batches: {len(batch_list)} batches for {distributed.world_size()} processes; give at least "
                         "one batch per process (torch.distributed rank)")
    batch_list = [b.to(device=device, dtype=torch.int64) for b in distributed.local_items(batch_list)]

    # target="exact": candidates at s' = candidate_sparsity, exactly floor(s * n) of them pruned
    exact = sparsity if a["target"] == "exact" else None
    cand_s = a["candidate_sparsity"] if exact is not None else sparsity
    info = {"sparsity": sparsity, "method": method, "scope": scope, "order": order, "reduction_factor": r,
            "target": a["target"], "candidate_sparsity": cand_s}
    # the steps, in probe order: model mode is one step of every tensor; layerwise / regional one per layer
    live = [i for i, g in enumerate(groups) if g]
    seq = [-1] if mode == "model" else (live[::-1] if order == "reverse" else live)
    steps = [all_targets, all_targets] if mode == "model" else [groups[i] for i in seq]
    resume = None
    if a["resume_dir"] is not None:
        identity = {"probe": {k: repr(v) for k, v in info.items()} | {"mode": mode, "threshold": repr(threshold),
                    "layers": live, "loss": None if a["loss"] is None else getattr(a["loss"], "__qualname__", "?"),
                    "norms": None if norms is None else _norms_digest(norms, all_targets)},
                    "batches": [batches_digest(b.cpu()) for b in batch_list],
                    "model_type": getattr(model.config, "model_type", None),
                    "shapes": {t.name: list(t.param.shape) for t in all_targets}}
        resume = _Resume(a["resume_dir"], identity, all_targets, sparsity)

    start = time.perf_counter()
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    runner = _Runner(model, adapter, batch_list, a["loss"], device, a["streamed"])
    runner.progress = bool(a["progress"]) and mode == "model"
    tensors: dict[str, TensorProbe] = {}
    restored: dict[str, torch.Tensor] = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        done = resume.done(steps) if resume is not None else 0
        info["resumed_layers"] = sorted({t.layer for st in steps[:done] for t in st})
        if mode == "model":  # steps: 0 = candidates and G0 (after the G0 pass), 1 = the pruned weights
            if done == 2:
                restored = resume.restore(steps[:2], runner, final=1)
            else:
                info["resumed_layers"] = []
                info["resumed_g0"] = done == 1
                tensors = _probe_model(runner, all_targets, live, cand_s, method, scope, norms, r, threshold, n_max,
                                       exact, resume, done)
                if resume is not None:
                    resume.save(1, all_targets, {n: t.mask for n, t in tensors.items()}, time.perf_counter() - start)
        else:
            tensors, restored = _probe_layerwise(runner, groups, seq, done, batch_list, cand_s, method, scope, order,
                                                 norms, r, threshold, n_max, a["progress"], exact=exact,
                                                 regional=mode == "regional", resume=resume)
    except BaseException:  # any error or interrupt: the model gets back every value the run changed
        _undo(runner.changed)
        raise
    finally:
        for p in model.parameters():
            p.requires_grad_(grad_flags[id(p)])
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    return ProbeResult(tensors, threshold, mode, time.perf_counter() - start, runner.passes, info, restored)


def _probe_group(grad_pass: Callable[[list[nn.Parameter]], list[torch.Tensor]],
                 changed: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]], targets: Sequence[_Target],
                 cands: Callable[[], list[tuple[torch.Tensor, _Exact | None]]],
                 r: float, threshold: GradientThreshold, n_max: int,
                 after_g0: Callable[[list, list[torch.Tensor]], None] | None = None,
                 g0_state: tuple[list, list[torch.Tensor]] | None = None) -> dict[str, TensorProbe]:
    """G0 pass, candidates (``cands`` is called after G0, so norm hooks of that pass are complete),
    scale by r, G1 pass, decide + restore + zero. ``grad_pass(params)`` = each param's max |grad| over
    the batches; ``targets`` require grad meanwhile (their flags are restored afterwards). Every write
    is logged in ``changed`` (param, candidates, original values) before it happens, for an undo.

    ``after_g0(chosen, g0c)`` sees the candidates and their fp32 G0 (a checkpoint); ``g0_state`` = such a
    (chosen, g0c) pair skips the G0 pass (a resumed run)."""
    params = [t.param for t in targets]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        if g0_state is None:
            g0 = grad_pass(params)
            chosen = cands()
            with torch.no_grad():
                g0c = [g[m].to(torch.float32) for g, (m, _) in zip(g0, chosen, strict=True)]
            del g0
            if after_g0 is not None:
                after_g0(chosen, g0c)
        else:
            chosen, g0c = g0_state
        backups = []
        with torch.no_grad():
            for p, (m, _) in zip(params, chosen, strict=True):
                b = p.data[m]  # the only copy the probe keeps: original candidate values
                backups.append(b)
                changed.append((p, m, b))  # before the write: an error inside it is undone too
                p.data.masked_scatter_(m, b * r)
        g1 = grad_pass(params)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    out = {}
    with torch.no_grad():
        for t, (m, plan), b, a, g in zip(targets, chosen, backups, g0c, g1, strict=True):
            tp = TensorProbe(t.name, t.layer, t.linear, t.param, m, b, a, g[m].to(torch.float32))
            if plan is not None:
                tp.count, tp.per_row, tp.score = plan.count, plan.per_row, plan.score
            tp.apply_(resolve_threshold(threshold, t.name, t.layer, t.linear, t.param.numel(), n_max))
            out[t.name] = tp
    return out


def _probe_model(runner: _Runner, all_targets, live, cand_s, method, scope, norms, r, threshold, n_max, exact,
                 resume=None, done=0):
    """Model mode: one G0 and one G1 pass of the full model loss for every probed tensor. Streamed with
    the layers away from the device: the running |grad| maxima wait on the host between batches.
    ``resume``: step 0 (candidates + G0) is checkpointed after the G0 pass; ``done == 1`` resumes from it."""
    g0_state = resume.g0_state(all_targets, runner.home) if done else None
    after_g0 = None
    if resume is not None and not done:
        def after_g0(chosen, g0c):
            resume.save_g0(all_targets, chosen, g0c)
    collector = (_Norms(all_targets, runner.device, lambda: not runner.streamer.recomputing)
                 if (method == "wanda" and norms is None and g0_state is None) else None)
    got: dict[str, torch.Tensor] = {}

    def cands():
        nonlocal got
        if collector is not None:
            got = collector.remove()
        return _candidates(all_targets, cand_s, method, scope, norms if norms is not None else got, exact)

    if runner.moves:
        runner.park = runner.home
    try:
        return _probe_group(lambda ps: runner.grad_pass(ps, lambda b: runner.model_backward(b, min(live))),
                            runner.changed, all_targets, cands, r, threshold, n_max, after_g0, g0_state)
    finally:
        runner.park = None
        if collector is not None:
            collector.close()


def _capture_inputs(runner: _Runner, batch_list, layer_ids: set[int], collect_norms_for: Sequence[_Target]):
    """The inputs of the decoder layers in ``layer_ids`` per batch from one no-grad pass
    (:meth:`GradientRunner.capture_inputs`; on the host when the layers live there), and (optionally)
    the Wanda norms of ``collect_norms_for`` collected by forward hooks during that pass."""
    last = max(layer_ids, default=-1)
    if collect_norms_for:
        last = max(last, max(t.layer for t in collect_norms_for) + 1)  # run the last such layer itself
    collector = _Norms(collect_norms_for, runner.device) if collect_norms_for else None
    try:
        store = runner.capture_inputs(batch_list, layer_ids, last)
    finally:
        if collector is not None:
            collector.close()
    return store, collector.remove() if collector is not None else {}


def _undo(changed: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]) -> None:
    """Put every candidate of the undo log ``changed`` back to its original value (newest first)."""
    with torch.no_grad():
        for p, m, b in reversed(changed):
            p.data.masked_scatter_(m.to(p.device), b.to(p.device))
    changed.clear()


def _to_home(tp: TensorProbe) -> TensorProbe:
    """The cached probe state moved to where its weight lives (after its layer left the device)."""
    dev = tp.param.device
    for f in ("candidates", "backup", "g0", "g1", "mask", "score"):
        v = getattr(tp, f)
        if v is not None:
            setattr(tp, f, v.to(dev))
    return tp


def _probe_layerwise(runner, groups, seq, done, batch_list, sparsity, method, scope, order, norms, r, threshold, n_max,
                     progress, exact=None, regional=False, resume=None):
    """Layerwise / regional: the layers of ``seq`` in order, the first ``done`` already restored; each one
    is probed (one decoder layer on the device at a time), then checkpointed (``resume``)."""
    from tqdm.auto import tqdm

    all_targets = [t for g in groups for t in g]
    need_dense_norms = method == "wanda" and norms is None and scope == "global"
    todo = seq[done:]
    steps = [groups[i] for i in seq]
    if not todo:
        return {}, resume.restore(steps, runner)
    # reverse: every probed layer's input is the dense model's (earlier layers unchanged) -> one pass;
    # forward: only the first layer's input; later ones are propagated through the pruned layers.
    # Both passes, and the global candidates, see the dense model: restored layers come back after them.
    capture_ids = set(todo) if order == "reverse" else {seq[0]}
    inputs, dense_norms = _capture_inputs(runner, batch_list, capture_ids, all_targets if need_dense_norms else [])
    global_cands = None
    if scope == "global":
        global_cands = dict(zip((t.name for t in all_targets),
                                _candidates(all_targets, sparsity, method, scope, norms if norms is not None else dense_norms,
                                            exact),
                                strict=True))
    restored = resume.restore(steps[:done], runner) if done else {}
    if order == "forward" and done:  # through the restored layers: the forwards of the uninterrupted run
        inputs[todo[0]] = runner.propagate(inputs.pop(seq[0]), seq[0], todo[0])
    tensors: dict[str, TensorProbe] = {}
    bar = tqdm(seq, desc="probe", disable=not progress, initial=done, total=len(seq))
    for pos, i in zip(range(done, len(seq)), todo, strict=True):
        t0 = time.perf_counter()
        targets = groups[i]
        hidden = inputs.pop(i)
        collector = None
        if method == "wanda" and norms is None and scope != "global":
            collector = _Norms(targets, runner.device, lambda: not runner.streamer.recomputing)

        def cands(targets=targets, collector=collector):
            if global_cands is not None:  # to where the weights are now
                return [(m.to(t.param.device), None if e is None else _Exact(e.count, e.per_row, e.score.to(t.param.device)))
                        for t, (m, e) in ((t, global_cands[t.name]) for t in targets)]
            got = collector.remove() if collector is not None else {}
            return _candidates(targets, sparsity, method, scope, norms if norms is not None else got, exact)

        if regional:
            def backward_of_batch(b, i=i, hidden=hidden):
                runner.block_backward(i, hidden[b])
        else:
            def backward_of_batch(b, i=i, hidden=hidden):
                runner.tail_backward(i, hidden[b], b)
        # regional: the layer stays on the device for its whole probe (it is the only one that runs);
        # layerwise: the tail's layers take turns on the device, so this one's |grad| maxima, candidates
        # and decisions stay with its weights on the host between its backward passes.
        if not regional and runner.moves:
            runner.park = runner.home
        try:
            with runner.hold_layer(i) if regional else contextlib.nullcontext():
                got = _probe_group(lambda ps, bb=backward_of_batch: runner.grad_pass(ps, bb), runner.changed, targets,
                                   cands, r, threshold, n_max)
        finally:
            runner.park = None
            if collector is not None:
                collector.close()
        tensors.update({n: _to_home(tp) for n, tp in got.items()})
        if resume is not None:
            resume.save(pos, targets, {t.name: tensors[t.name].mask for t in targets}, time.perf_counter() - t0)
        if order == "forward" and pos + 1 < len(seq):
            inputs[seq[pos + 1]] = runner.propagate(hidden, i, seq[pos + 1])
        del hidden
        bar.update(1)
    bar.close()
    return tensors, restored
