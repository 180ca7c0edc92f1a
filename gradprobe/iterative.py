"""Iterative gradient-probe pruning with a sparsity schedule, evaluation, threshold tuning and resume.

:func:`iterative_prune_` raises the target sparsity step by step (``SparsitySchedule``). Each step runs
the probe on the current (already pruned) model; weights pruned by earlier steps stay pruned. After
the step the model is evaluated (perplexity by default, any ``evaluate(model) -> float``); if the
metric degrades by more than ``max_metric_drop`` relative to the dense model, the step failed:

* with ``tune=ThresholdSearch(...)`` the threshold tau is searched multiplicatively
  (tau * f, tau * f^2, ..., then 0; f in (0, 1): fewer candidates are pruned at each trial). Each trial
  re-decides the step from its *cached* G0 / G1 (:meth:`gradprobe.probe.ProbeResult.apply_`): G0 of
  the previous-step model does not depend on tau, and G1 depends only on the candidates and r, so a
  trial costs one decision op per tensor and one evaluation, no gradient pass. For
  ``mode="model"`` this is exact; for ``"layerwise"`` it reuses each layer's statistics (see
  ``ProbeResult.apply_``).
* with ``ThresholdSearch(reprune_previous=True)`` a trial re-prunes the previous step and the current
  step together with the new tau: the previous step is re-decided from its cached G0 / G1 (free), the
  current step is probed again (its G0 changed, since the model it starts from changed).

The first trial that passes is accepted (the largest passing tau of the search, hence the sparsest).
A step that still fails is undone exactly (candidates restored from the backup) and the run stops:
the model ends at the sparsest accepted step. Each accepted step is checkpointed to
``checkpoint_dir`` (``step_XX.safetensors`` with the cumulative bool masks, ``state.json``); calling
again with the same directory, model and settings loads the last accepted masks and goes on.
A zero threshold cannot be lowered, so tuning needs tau > 0 (otherwise a failed step just stops).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradprobe._checkpoint import (
    ResumeStateWarning,
    atomic_write_text,
    json_digest,
    save_tensors_atomic,
    tensors_digest,
)
from gradprobe.probe import (
    GradientThreshold,
    ProbeResult,
    SizeAdaptive,
    check_threshold,
    probe,
    scale_threshold,
    threshold_is_zero,
)
from gradprobe.report import PruneReport


@dataclass(frozen=True)
class SparsitySchedule:
    """Targets initial, initial + step, ... up to ``max`` (inclusive, within 1e-9)."""

    initial: float = 0.3
    step: float = 0.1
    max: float = 0.7

    def __post_init__(self) -> None:
        for name in ("initial", "step", "max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"SparsitySchedule.{name} must be a float, got {v!r}")
        if not (0.0 < self.initial < 1.0 and 0.0 < self.max < 1.0):
            raise ValueError(f"SparsitySchedule initial and max must be in (0, 1), got {self.initial}, {self.max}")
        if self.step <= 0.0:
            raise ValueError(f"SparsitySchedule.step must be > 0, got {self.step}")
        if self.max < self.initial:
            raise ValueError(f"SparsitySchedule.max ({self.max}) must be >= initial ({self.initial})")

    def targets(self) -> list[float]:
        n = int(math.floor((self.max - self.initial) / self.step + 1e-9))
        return [round(self.initial + i * self.step, 12) for i in range(n + 1)]


@dataclass(frozen=True)
class ThresholdSearch:
    """Multiplicative search of tau on a failed step: trials tau*f, tau*f^2, ..., tau*f^(n-1), 0."""

    factor: float = 0.5
    max_trials: int = 6
    reprune_previous: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not (0.0 < self.factor < 1.0):
            raise ValueError(f"ThresholdSearch.factor must be in (0, 1) (tau shrinks each trial), got {self.factor!r}")
        if isinstance(self.max_trials, bool) or not isinstance(self.max_trials, int) or self.max_trials < 1:
            raise ValueError(f"ThresholdSearch.max_trials must be an int >= 1, got {self.max_trials!r}")

    def trials(self, spec: GradientThreshold) -> list[GradientThreshold]:
        if threshold_is_zero(spec):
            return []
        out = [scale_threshold(spec, self.factor ** j) for j in range(1, self.max_trials)]
        return out + [scale_threshold(spec, 0.0)]


@dataclass
class StepRecord:
    """One schedule step. ``metric`` is after the final decision of the step (tuned or not)."""

    target: float
    achieved: float
    metric: float
    tau: str
    accepted: bool
    probe_seconds: float
    tune_seconds: float = 0.0
    trials: int = 0


@dataclass(kw_only=True)
class IterativeResult(PruneReport):
    """A :class:`gradprobe.report.PruneReport` of the sparsest accepted step (``masks``: its cumulative
    {param name: bool mask}, empty if none; ``rows``: one per probed tensor) and the schedule's record."""

    steps: list[StepRecord]
    baseline: float
    threshold: GradientThreshold
    resumed_from: int = -1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        accepted = [s for s in self.steps if s.accepted]
        return accepted[-1].achieved if accepted else 0.0


def _result(model, params, masks, steps, baseline, threshold, resumed_from, probe_kwargs, t_run) -> IterativeResult:
    """The run's :class:`IterativeResult`: the report rows of ``masks`` (every probed tensor) plus the record."""
    from gradprobe.config import PruneConfig

    full = {n: masks.get(n, torch.zeros(p.shape, dtype=torch.bool)) for n, p in params.items()}
    accepted = [s for s in steps if s.accepted]
    target = accepted[-1].target if accepted else 0.0
    config = PruneConfig(method=probe_kwargs.get("method", "wanda"), sparsity=target,
                         scope=probe_kwargs.get("scope", "row"), progress=False)
    res = IterativeResult.from_masks(model, full, config, target=target, seconds=time.perf_counter() - t_run,
                                     steps=steps, baseline=baseline, threshold=threshold, resumed_from=resumed_from,
                                     run={"method": "iterative probe"})
    res.masks = masks  # the accepted steps' masks only (empty if none); the rows cover every probed tensor
    return res


def _describe(spec: GradientThreshold) -> str:
    if isinstance(spec, SizeAdaptive):
        return f"adaptive({spec.tau:g}, n_ref={spec.n_ref})"
    if isinstance(spec, dict):
        return json.dumps({str(k): v for k, v in spec.items()}, sort_keys=True)
    return f"{spec:g}"


def _probed_params(model: nn.Module) -> dict[str, nn.Parameter]:
    from gradprobe.models import get_adapter

    adapter = get_adapter(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(lin.weight)]: lin.weight for layer in adapter.decoder_layers(model)
            for lin in adapter.prunable_linears(layer).values()}


def _achieved(masks: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> float:
    total = sum(p.numel() for p in params.values())
    return sum(int(m.sum()) for m in masks.values()) / total


def _union(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(a)
    for k, m in b.items():
        out[k] = m if k not in out else out[k] | m
    return out


def _degradation(metric: float, base: float, higher_is_better: bool) -> float:
    delta = (base - metric) if higher_is_better else (metric - base)
    return delta / abs(base) if base != 0 else delta


def iterative_prune_(
    model: nn.Module,
    batches: torch.Tensor | Sequence[torch.Tensor],
    *,
    schedule: SparsitySchedule = SparsitySchedule(),
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_ids: torch.Tensor | None = None,
    max_metric_drop: float = 0.1,
    higher_is_better: bool = False,
    gradient_threshold: GradientThreshold = 0.0,
    tune: ThresholdSearch | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    **probe_kwargs: Any,
) -> IterativeResult:
    """Prune ``model`` in place along ``schedule`` with the gradient probe (module docstring).

    Args:
        model, batches: as :func:`gradprobe.probe_prune_` (the same batches for every step).
        schedule: the target sparsities.
        evaluate: ``evaluate(model) -> float``; default perplexity of ``eval_ids`` (context 256).
        eval_ids: (n_tokens,) int64, needed when ``evaluate`` is None.
        max_metric_drop: allowed relative degradation vs the dense model (0.1 = perplexity may rise 10 %).
        higher_is_better: the metric's direction (False for perplexity / loss).
        gradient_threshold: initial tau (float, mapping or :class:`SizeAdaptive`).
        tune: :class:`ThresholdSearch` or None (no tuning: the first failed step stops the run).
        checkpoint_dir: where accepted steps are saved and resumed from; None = no checkpoints.
        **probe_kwargs: method, scope, reduction_factor, mode, order, loss, norms, layers for the probe.

    Returns:
        :class:`IterativeResult`; the model holds its sparsest accepted state.
    """
    bad = sorted(set(probe_kwargs) & {"sparsity", "gradient_threshold", "structure"})
    if bad:
        raise TypeError(f"{bad} cannot be passed to iterative_prune_ (the schedule sets the sparsity; N:M is not supported)")
    threshold = check_threshold(gradient_threshold)
    if not isinstance(schedule, SparsitySchedule):
        raise TypeError("schedule must be a gradprobe.iterative.SparsitySchedule")
    if tune is not None and not isinstance(tune, ThresholdSearch):
        raise TypeError("tune must be None or a gradprobe.iterative.ThresholdSearch")
    if isinstance(max_metric_drop, bool) or not isinstance(max_metric_drop, (int, float)) or not max_metric_drop >= 0:
        raise ValueError(f"max_metric_drop must be a float >= 0 (relative degradation), got {max_metric_drop!r}")
    if evaluate is None:
        if eval_ids is None:
            raise ValueError("pass evaluate=callable(model) -> float, or eval_ids (token ids) for the default perplexity")
        from gradprobe.eval import perplexity

        ids = eval_ids
        evaluate = lambda m: perplexity(m, ids, context=256, progress=False).value  # noqa: E731
    elif not callable(evaluate):
        raise TypeError(f"evaluate must be callable(model) -> float, got {type(evaluate).__name__}")
    # validate everything the probe would reject before touching the model
    from gradprobe.probe import _probe_arguments

    _probe_arguments(model, batches, schedule.initial, {**probe_kwargs, "gradient_threshold": threshold})

    params = _probed_params(model)
    t_run = time.perf_counter()
    ckpt = _Checkpoint(checkpoint_dir, schedule, probe_kwargs, threshold, params) if checkpoint_dir is not None else None
    masks: dict[str, torch.Tensor] = {}
    steps: list[StepRecord] = []
    start_step = 0
    resumed_from = -1
    if ckpt is not None and ckpt.exists():
        state = ckpt.load()
        baseline = state["baseline"]
        steps = [StepRecord(**s) for s in state["steps"]]
        threshold = ckpt.decode_threshold(state["threshold"])
        if state["last_accepted"] >= 0:
            masks = ckpt.load_masks(state["last_accepted"], params)
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].data.masked_fill_(m, 0)
        resumed_from = state["last_accepted"]
        if state["stopped"]:
            return _result(model, params, masks, steps, baseline, threshold, resumed_from, probe_kwargs, t_run)
        start_step = len(steps)
    else:
        baseline = float(evaluate(model))
    passes = lambda m: _degradation(m, baseline, higher_is_better) <= max_metric_drop  # noqa: E731

    targets = schedule.targets()
    prev: tuple[ProbeResult, dict[str, torch.Tensor]] | None = None  # previous step's probe and masks before it
    for si in range(start_step, len(targets)):
        target = targets[si]
        res = probe(model, batches, target, gradient_threshold=threshold, **probe_kwargs)
        cum = _union(masks, res.masks)
        metric = float(evaluate(model))
        ok = passes(metric)
        rec = StepRecord(target, _achieved(cum, params), metric, _describe(threshold), ok, res.seconds)
        reprune_used = False
        if not ok and tune is not None:
            t0 = time.perf_counter()
            for trial in tune.trials(threshold):
                rec.trials += 1
                if tune.reprune_previous and prev is not None:
                    reprune_used = True
                    prev_res, before_prev = prev
                    res.restore_()  # model = after the previous step
                    prev_res.apply_(trial)  # previous step re-decided from its cached G0/G1
                    base = _union(before_prev, prev_res.masks)
                    res = probe(model, batches, target, gradient_threshold=trial, **probe_kwargs)
                    cum = _union(base, res.masks)
                    metric = float(evaluate(model))
                    ok = passes(metric)
                    if ok:
                        steps[-1].tau = _describe(trial)
                        steps[-1].achieved = _achieved(base, params)
                        masks = base
                else:
                    res.apply_(trial)  # re-decided from this step's cached G0/G1
                    cum = _union(masks, res.masks)
                    metric = float(evaluate(model))
                    ok = passes(metric)
                if ok:
                    threshold = trial
                    break
            rec.tune_seconds = time.perf_counter() - t0
            rec.metric, rec.tau, rec.accepted = metric, _describe(threshold), ok
            rec.achieved = _achieved(cum, params)
        steps.append(rec)
        if not ok:
            res.restore_()  # back to the last accepted state, bit for bit
            if reprune_used:
                prev[0].apply_(threshold)
            if ckpt is not None:
                ckpt.save(baseline, steps, threshold, si, masks, stopped=True, last_accepted=_last_accepted(steps))
            break
        prev = (res, masks)
        masks = cum
        if ckpt is not None:
            ckpt.save(baseline, steps, threshold, si, masks, stopped=False, last_accepted=si)
    return _result(model, params, masks, steps, baseline, threshold, resumed_from, probe_kwargs, t_run)


def _last_accepted(steps: list[StepRecord]) -> int:
    idx = [i for i, s in enumerate(steps) if s.accepted]
    return idx[-1] if idx else -1


class _Checkpoint:
    """``state.json`` + ``step_XX.safetensors`` (cumulative bool masks) in one directory."""

    def __init__(self, directory, schedule, probe_kwargs, threshold, params):
        self.dir = Path(directory)
        self.identity = {
            "schedule": asdict(schedule),
            "probe": {k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(type(v)))
                      for k, v in sorted(probe_kwargs.items())},
            "initial_threshold": _describe(threshold),
            "params": {n: list(p.shape) for n, p in params.items()},
        }
        self.digests: dict[str, str] = {}  # step -> sha256 of its masks (as state.json records them)

    def exists(self) -> bool:
        """True if ``state.json`` and the masks it resumes from pass their checksums; a corrupted or
        truncated checkpoint is reported (ResumeStateWarning) and the run starts over."""
        if not (self.dir / "state.json").is_file():
            return False
        problem = self._verify()
        if problem is None:
            return True
        warnings.warn(f"checkpoint_dir {str(self.dir)!r}: {problem}; starting over", ResumeStateWarning, stacklevel=3)
        self.digests = {}
        return False

    def _verify(self) -> str | None:
        try:
            state = json.loads((self.dir / "state.json").read_text())
            body = {k: v for k, v in state.items() if k != "sha256"}
            if state.get("sha256") != json_digest(body):
                return "state.json fails its checksum"
            self.digests = dict(state.get("masks_sha256", {}))
            last = state["last_accepted"]
            if last >= 0:
                from safetensors.torch import load_file

                masks = load_file(str(self.dir / f"step_{last:02d}.safetensors"))
                if tensors_digest(masks) != self.digests.get(str(last)):
                    return f"step_{last:02d}.safetensors fails its checksum"
        except Exception as exc:  # unreadable JSON, a truncated safetensors header, missing keys
            return f"unreadable ({type(exc).__name__}: {exc})"
        return None

    def load(self) -> dict:
        state = json.loads((self.dir / "state.json").read_text())
        if state.get("identity") != self.identity:
            raise ValueError(
                f"checkpoint_dir {self.dir} holds a run with other settings or another model; "
                "use a new directory or delete it"
            )
        return state

    @staticmethod
    def encode_threshold(spec: GradientThreshold) -> Any:
        if isinstance(spec, SizeAdaptive):
            return {"adaptive": [spec.tau, spec.n_ref]}
        if isinstance(spec, dict):
            return {"mapping": [[k, v] for k, v in spec.items()]}
        return spec

    @staticmethod
    def decode_threshold(obj: Any) -> GradientThreshold:
        if isinstance(obj, dict) and "adaptive" in obj:
            return SizeAdaptive(*obj["adaptive"])
        if isinstance(obj, dict):
            return {k: v for k, v in obj["mapping"]}
        return obj

    def load_masks(self, step: int, params) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        masks = load_file(str(self.dir / f"step_{step:02d}.safetensors"))
        return {n: m.to(params[n].device) for n, m in masks.items()}

    def save(self, baseline, steps, threshold, step, masks, *, stopped, last_accepted) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not stopped:
            cpu = {n: m.contiguous().cpu() for n, m in masks.items()}
            save_tensors_atomic(self.dir / f"step_{step:02d}.safetensors", cpu)
            self.digests[str(step)] = tensors_digest(cpu)
        state = {"identity": self.identity, "baseline": baseline, "steps": [asdict(s) for s in steps],
                 "threshold": self.encode_threshold(threshold), "last_accepted": last_accepted, "stopped": stopped,
                 "masks_sha256": dict(self.digests)}
        state["sha256"] = json_digest(state)
        atomic_write_text(self.dir / "state.json", json.dumps(state, indent=1))
