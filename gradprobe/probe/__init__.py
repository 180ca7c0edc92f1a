"""The gradient probe: keep a pruning candidate only if shrinking it does not raise its gradient.

For a set of prunable tensors W (the linears of the decoder layers):

1. G0 = element-wise max over the B calibration batches of |dL/dW| (L = the model's causal-LM loss
   ``model(input_ids=b, labels=b).loss``, or ``loss(logits, b)``);
2. candidates T = the ``sparsity`` smallest scores (magnitude |W| or Wanda |W| * ||X_j||_2; scope
   row, layer or global) — selected by the exact ``gradprobe::`` selection ops;
3. W[T] *= r (``reduction_factor``); G1 = the same statistic on the *same* batches;
4. prune F = T & (G1 <= G0 * (1 + tau)) (``gradient_threshold`` tau, computed in fp32); every other
   candidate gets its original value back bit for bit (from a backup of the candidate values only,
   never by dividing by r).

Targets (``target``):

* ``"candidates"`` (default): step 4 as written; the achieved sparsity is <= ``sparsity`` (every
  restored candidate lowers it).
* ``"exact"``: the achieved count equals the requested one exactly — floor(s * in) per row for
  ``scope="row"``, floor(s * numel) per tensor for ``"layer"``, floor(s * total) over the probed model
  for ``"global"`` (each tensor gets the count the global score selection at s gives it). Candidates T
  are chosen at ``candidate_sparsity`` s' >= s (default s + 0.2 (1 - s)); steps 1 and 3 as above; then
  each group prunes exactly its count of T: first the candidates whose gradient did not grow
  (G1 <= G0 (1 + tau), or already zero), then the grown ones, each in score order, ties by lower flat
  index (:func:`exact_key` then score, :func:`select_by_key`: two passes of the exact selection ops).
  With s' = s it is the plain score selection. Measured alternatives (README): ranking the candidates
  by the growth G1 / G0 itself was far worse (the ratio carries no per-weight information); a per-row
  tau tuned to hit the count is that same ratio ranking.

Modes:

* ``mode="model"``: one G0 and one G1 pass for all tensors at once (all probed weights need grads).
* ``mode="layerwise"`` (default): one decoder layer at a time, ``order="reverse"`` (last layer first)
  or ``"forward"``. Only that layer's linears require grad; its decisions are applied before the next
  layer is probed. Forward and backward start from cached boundary activations (the input of the
  layer), since everything before the layer is unchanged: in reverse order the dense inputs of all
  layers come from one no-grad pass; in forward order the next layer's input is the pruned layer's
  output, computed once with no grad.
* ``mode="regional"``: as ``"layerwise"``, but the loss is block-local (as Wanda++'s regional
  gradients): L = ||layer_i(h)||_2^2 (fp32) of the decoder layer's output for its cached input h,
  so each gradient pass runs only that one block forward and backward (no tail, no LM head, no labels).

Memory (``streamed=True``, the default): the model-loss gradients of ``"model"`` and ``"layerwise"``
go through :class:`gradprobe.pipeline.backward.StreamedBackward`, one decoder layer's autograd graph
at a time (no-grad forward keeping each layer's input, then per layer a recomputed forward and its
backward; the gradients equal the whole graph's bit for bit on the CPU). With ``device`` set to other
than where the model lives, each decoder layer (and the embedding, the head) is moved to the device
only while it runs, so the device holds about one layer + the boundary activations of one batch +
lm_head and its logits (``bench/bench_probe_memory.py``). ``resume_dir`` checkpoints every finished
layer (model mode: the G0 pass, then the result) so that an interrupted run continues where it stopped.

Gradient statistics are accumulated on the device as gradients arrive (a post-accumulate-grad hook
calling ``gradprobe::probe_accumulate_``; the ``.grad`` is dropped at once), so at most one gradient
per probed tensor lives at a time and nothing is copied to the CPU per batch. The decision, restore
and zeroing are one op, ``gradprobe::probe_apply_``. The cache kept per tensor (for threshold tuning,
:meth:`ProbeResult.apply_`) holds only candidate entries: original values, G0 and G1 (fp32).

Wanda norms: ||X_j||_2 over all calibration tokens of each linear's input, collected during the G0
pass (so with the earlier part of the model exactly as it is when the layer is probed) by
:class:`gradprobe.stats.ChannelStats` (per-window fp32 partials summed in window order, as every
collector; a streamed backward's recomputed forward is not counted again); with
``scope="global"`` all candidates are chosen up front, from one dense no-grad pass (as the driver's
global scope does). Pass ``norms`` to use your own.

N:M structure is not supported with the probe: restoring a candidate would leave its group with fewer
than N zeros. Prune N:M with :func:`gradprobe.prune` (no probe) instead; a ``structure`` argument
raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from gradprobe import distributed
from gradprobe._checkpoint import batches_digest
from gradprobe.pipeline.backward import StreamedBackward, held_on
from gradprobe.report import PruneReport
from gradprobe.select import check_sparsity, global_prune_masks, num_pruned, prune_mask
from gradprobe.stats import ChannelStats

METHODS = ("wanda", "magnitude")
SCOPES = ("row", "layer", "global")
MODES = ("layerwise", "model", "regional")
ORDERS = ("reverse", "forward")
TARGETS = ("candidates", "exact")
OVERSELECT = 0.2  # default s' = s + OVERSELECT * (1 - s) for target="exact"
# Keys of the exact rule (fp32): non-candidates get KEY_MAX (never selected, the ops reject inf);
# candidate keys are clamped to RATIO_MAX < KEY_MAX.
KEY_MAX = torch.finfo(torch.float32).max
RATIO_MAX = 1e38


def exact_key(backup: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """fp32 (k,) ranking key of the exact rule: 0 for a candidate whose gradient did not grow
    (G1 <= G0 * (1 + tau) in fp32, as ``probe_apply_`` decides) or that is already zero (``backup == 0``,
    e.g. pruned by an earlier step: pruning it changes nothing), 1 for one whose gradient grew.
    """
    grew = g1.to(torch.float32) > g0.to(torch.float32) * torch.tensor(1.0 + tau, dtype=torch.float32)
    return (grew & (backup != 0)).to(torch.float32)


def select_by_key(candidates: torch.Tensor, key: torch.Tensor, score: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """Exactly ``k`` candidates with the smallest ``key``; ties by smaller ``score``, then lower flat index.

    Args:
        candidates: bool (out, in); at least ``k`` True per row (per_row) or in total.
        key, score: fp32 (c,), >= 0 and finite, in row-major candidate order (c = candidates.sum()).
        k: count per row (``per_row``) or for the whole tensor.

    Returns:
        bool (out, in) mask. Two passes of the exact selection ops: the k-th smallest key (value and
        how many of its ties to take); then one key that puts the keys below it first (0) and the
        tied ones by score (``nextafter(score)`` > 0, order preserved), so the same op picks the
        tied ones by score then index.
    """
    full = torch.full(candidates.shape, KEY_MAX, dtype=torch.float32, device=candidates.device)
    full[candidates] = key
    if per_row:
        thr = torch.ops.gradprobe.row_threshold(full, None, k)[0].reshape(-1, 1)
    else:
        thr = torch.ops.gradprobe.global_threshold([full], [], k)[0]
    tied = torch.full_like(full, KEY_MAX)
    tied[candidates] = torch.nextafter(score.to(torch.float32).clamp(max=RATIO_MAX), torch.tensor(KEY_MAX))
    second = torch.where(full < thr, torch.zeros_like(full), torch.where(full == thr, tied, KEY_MAX))
    if per_row:
        return torch.ops.gradprobe.row_mask(second, None, k)
    t, take, _ = torch.ops.gradprobe.global_threshold([second], [], k)
    return torch.ops.gradprobe.global_mask([second], [], t, take)[0]


@dataclass(frozen=True)
class SizeAdaptive:
    """Size-adaptive threshold: tensor t gets tau_t = tau * sqrt(numel_t / n_ref).

    Attributes:
        tau: base threshold >= 0.
        n_ref: reference size; None = numel of the largest probed tensor (so tau_t <= tau).
    """

    tau: float
    n_ref: int | None = None

    def __post_init__(self) -> None:
        _check_tau(self.tau, "SizeAdaptive.tau")
        if self.n_ref is not None and (isinstance(self.n_ref, bool) or not isinstance(self.n_ref, int) or self.n_ref < 1):
            raise ValueError(f"SizeAdaptive.n_ref must be None or a positive int (a tensor size), got {self.n_ref!r}")


GradientThreshold = Union[float, Mapping[Any, float], SizeAdaptive]  # noqa: UP007  (runtime alias)
"""The gradient probe's tolerance tau: one float, a mapping (parameter name, layer index, linear name or
"default" -> tau) or :class:`SizeAdaptive`. (Not :class:`gradprobe.Threshold`, the exact k-th score of a group.)"""


def _check_tau(tau: Any, name: str) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(tau).__name__}")
    tau = float(tau)
    if not (tau >= 0.0 and math.isfinite(tau)):
        raise ValueError(f"{name} must be a finite float >= 0 (prune if G1 <= G0 * (1 + tau)), got {tau}")
    return tau


def check_threshold(spec: Any) -> GradientThreshold:
    """Validate ``gradient_threshold``: a float >= 0, a mapping, or :class:`SizeAdaptive`."""
    if isinstance(spec, SizeAdaptive):
        return spec
    if isinstance(spec, Mapping):
        for k, v in spec.items():
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise TypeError(
                    f"gradient_threshold mapping keys must be layer indices (int), parameter names or linear "
                    f"names like 'mlp.down_proj' (str), or 'default'; got {k!r}"
                )
            _check_tau(v, f"gradient_threshold[{k!r}]")
        return dict(spec)
    return _check_tau(spec, "gradient_threshold")


def scale_threshold(spec: GradientThreshold, factor: float) -> GradientThreshold:
    """The threshold spec with every tau multiplied by ``factor`` (used by the threshold search)."""
    if isinstance(spec, SizeAdaptive):
        return SizeAdaptive(spec.tau * factor, spec.n_ref)
    if isinstance(spec, Mapping):
        return {k: v * factor for k, v in spec.items()}
    return spec * factor


def threshold_is_zero(spec: GradientThreshold) -> bool:
    if isinstance(spec, SizeAdaptive):
        return spec.tau == 0.0
    if isinstance(spec, Mapping):
        return all(v == 0.0 for v in spec.values())
    return spec == 0.0


def resolve_threshold(spec: GradientThreshold, name: str, layer: int, linear: str, numel: int, n_max: int) -> float:
    """tau of one tensor. Mapping lookup order: full parameter name, layer index, linear name, "default" (else 0)."""
    if isinstance(spec, SizeAdaptive):
        n_ref = spec.n_ref if spec.n_ref is not None else n_max
        return spec.tau * math.sqrt(numel / n_ref)
    if isinstance(spec, Mapping):
        for key in (name, layer, linear, "default"):
            if key in spec:
                return float(spec[key])
        return 0.0
    return float(spec)


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


# ---- validation ----------------------------------------------------------------------------------


def _check_batches(batches: Any) -> list[torch.Tensor]:
    """A 2-D (n, seqlen) tensor is n batches of one row; a 3-D (B, b, seqlen) tensor or a sequence of
    (b, seqlen) / (seqlen,) tensors is B batches."""
    if isinstance(batches, torch.Tensor):
        if batches.dim() == 2:
            out = [batches[i : i + 1] for i in range(batches.shape[0])]
        elif batches.dim() == 3:
            out = list(batches.unbind(0))
        else:
            raise ValueError(f"batches as a tensor must be (n, seqlen) or (B, batch, seqlen) token ids, got shape {tuple(batches.shape)}")
    elif isinstance(batches, Sequence) and not isinstance(batches, str):
        out = []
        for i, b in enumerate(batches):
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"batches[{i}] must be a tensor of token ids, got {type(b).__name__}")
            if b.dim() == 1:
                b = b.unsqueeze(0)
            if b.dim() != 2:
                raise ValueError(f"batches[{i}] must be (batch, seqlen) or (seqlen,) token ids, got shape {tuple(b.shape)}")
            out.append(b)
    else:
        raise TypeError(f"batches must be a tensor or a list of tensors of token ids, got {type(batches).__name__}")
    if not out:
        raise ValueError("batches is empty; the probe needs at least one calibration batch of token ids")
    for i, b in enumerate(out):
        if b.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"batches[{i}] must hold integer token ids (int64), got {b.dtype}")
        if b.shape[-1] < 2 or b.shape[0] < 1:
            raise ValueError(f"batches[{i}] needs >= 1 row of >= 2 tokens for a next-token loss, got shape {tuple(b.shape)}")
    return out


def _check_norms(norms: Mapping[str, torch.Tensor] | None, targets: Sequence[_Target]) -> None:
    """Every probed weight's norm: a finite, >= 0 float tensor of shape (in_features,); the error names the key."""
    if norms is None:
        return
    from gradprobe.select import check_norm

    for t in targets:
        n = norms[t.name]
        if not n.dtype.is_floating_point:
            raise TypeError(f"norms[{t.name!r}] must be a float32 tensor (activation norms), got {n.dtype}")
        check_norm(n.detach().to(device=t.param.device, dtype=torch.float32), t.param, f"norms[{t.name!r}]", t.name)


def _check_args(sparsity, method, scope, mode, order, reduction_factor, gradient_threshold, structure, loss, norms):
    if structure not in (None, "unstructured"):
        raise ValueError(
            f"structure={structure!r}: N:M structure cannot be combined with the gradient probe (restoring a "
            "candidate would leave its group of M with fewer than N zeros); prune N:M with gradprobe.prune "
            "without the probe, or pass structure=None"
        )
    sparsity = check_sparsity(sparsity)
    for name, value, allowed in (("method", method, METHODS), ("scope", scope, SCOPES), ("mode", mode, MODES),
                                 ("order", order, ORDERS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)):
        raise TypeError(f"reduction_factor must be a float in (0, 1), got {type(reduction_factor).__name__}")
    if not (0.0 < float(reduction_factor) < 1.0):
        raise ValueError(
            f"reduction_factor must be in (0, 1) exclusive (candidates are scaled by it; 0.1 is the default), got {reduction_factor}"
        )
    gradient_threshold = check_threshold(gradient_threshold)
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be None or a callable (logits, input_ids) -> scalar tensor, got {type(loss).__name__}")
    if norms is not None:
        if method != "wanda":
            raise ValueError('norms are Wanda activation norms; pass them only with method="wanda"')
        if not isinstance(norms, Mapping):
            raise TypeError("norms must be a mapping parameter name -> (in_features,) float32 tensor")
    return sparsity, float(reduction_factor), gradient_threshold


# ---- the model side --------------------------------------------------------------------------------


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


def _default_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size)

    return loss


def _as_device(device: torch.device | str) -> torch.device:
    """torch.device, with a bare "cuda" resolved to the current CUDA device (so it compares equal to
    where a tensor actually is)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class _Runner:
    """Forward/backward over the whole model or from a layer's cached input.

    ``home``: where the decoder layers' weights live; ``device``: where the probe computes. When they
    differ, each layer (and the embedding, the head) is held on the device only while it runs
    (:func:`gradprobe.pipeline.backward.held_on`); cached layer inputs stay on the host. With
    ``streamed`` the model-loss gradients go through :class:`StreamedBackward` (one layer's autograd
    graph at a time); without, through one graph of the whole model (or tail) on ``home``.
    """

    def __init__(self, model: nn.Module, adapter, batches: list[torch.Tensor], loss, device=None, streamed=True):
        self.model, self.adapter = model, adapter
        self.layers = adapter.decoder_layers(model)
        self.home = next(self.layers[0].parameters()).device
        self.device = self.home if device is None else _as_device(device)
        self.moves = self.device != self.home
        self.streamed = streamed
        self.batches = batches
        self.user_loss = loss
        self.loss = loss if loss is not None else _default_loss(model)
        self._kwargs: dict[tuple, dict] = {}
        self.passes = 0
        self.progress = False  # a bar per gradient pass (model mode: the only long loop)
        self.changed: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, candidates, originals)
        self.park: torch.device | None = None  # where |grad| statistics wait between a layer's backward passes
        self.streamer = StreamedBackward(self.run_layer, self.hold_layer, self.hold_head)

    def hold_layer(self, j: int):
        """Context: decoder layer ``j`` on the device."""
        return held_on(self.device, self.layers[j]) if self.moves else contextlib.nullcontext()

    def hold_head(self):
        """Context: the final norm and lm_head on the device."""
        if not self.moves:
            return contextlib.nullcontext()
        return held_on(self.device, self.adapter.final_norm(self.model), self.adapter.lm_head(self.model))

    def layer_kwargs(self, j: int, hidden: torch.Tensor) -> dict:
        key = (j, tuple(hidden.shape), hidden.dtype, hidden.device)
        if key not in self._kwargs:
            with torch.no_grad():
                self._kwargs[key] = self.adapter.layer_forward_kwargs(self.model, hidden, None, None, j)
        return self._kwargs[key]

    def run_layer(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``j`` on ``hidden`` (batch, seqlen, hidden); the layer must be where ``hidden`` is."""
        return self.adapter.layer_output(self.layers[j](hidden, **self.layer_kwargs(j, hidden)))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input of decoder layer 0 (batch, seqlen, hidden) on the device, no grad."""
        emb = self.adapter.embed(self.model)
        with torch.no_grad(), (held_on(self.device, emb) if self.moves else contextlib.nullcontext()):
            return emb(ids.to(self.device))

    def head_loss(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The model's loss of the last decoder layer's output ``hidden`` (final norm, lm_head, loss)."""
        x = self.adapter.final_norm(self.model)(hidden)
        return self.loss(self.adapter.lm_head(self.model)(x), ids)

    def full_loss(self, ids: torch.Tensor) -> torch.Tensor:
        if self.user_loss is None:
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss
        return self.loss(self.model(input_ids=ids, use_cache=False).logits, ids)

    def block_loss(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        """Regional loss: squared L2 norm (fp32) of decoder layer ``j``'s output for its input ``hidden``."""
        return self.run_layer(j, hidden).to(torch.float32).pow(2).sum()

    def tail_loss(self, start: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Loss of the model run from the input ``hidden`` (batch, seqlen, hidden) of layer ``start``."""
        x = hidden
        for j in range(start, len(self.layers)):
            x = self.run_layer(j, x)
        return self.head_loss(x, ids)

    # --- one batch's backward into the probed weights (the gradients arrive in grad_pass's hooks) ----
    def model_backward(self, b: int, lowest: int = 0) -> None:
        """Model mode: backward of the full model loss of batch ``b``; ``lowest`` = the lowest layer with
        probed weights (the layers below it only run forward)."""
        ids = self.batches[b]
        if not self.streamed:
            _backward(self.full_loss(ids))
            return
        h = self.embed(ids)
        with torch.no_grad():
            for j in range(lowest):
                with self.hold_layer(j):
                    h = self.run_layer(j, h)
        self.streamer(h, lowest, len(self.layers), lambda x: self.head_loss(x, self.batches[b]))

    def tail_backward(self, start: int, hidden: torch.Tensor, b: int) -> None:
        """Layerwise mode: backward of the model loss of batch ``b`` run from layer ``start``'s input."""
        hidden = hidden.to(self.device)
        if self.streamed:
            self.streamer(hidden, start, len(self.layers), lambda x: self.head_loss(x, self.batches[b]))
        else:
            _backward(self.tail_loss(start, hidden, self.batches[b]))

    def block_backward(self, j: int, hidden: torch.Tensor) -> None:
        """Regional mode: backward of ||layer_j(hidden)||^2 (layer j already on the device)."""
        _backward(self.block_loss(j, hidden.to(self.device)))

    def grad_pass(self, params: Sequence[nn.Parameter], backward_of_batch: Callable[[int], None]) -> list[torch.Tensor]:
        """max over batches of |dL/dp| for each of ``params`` (same dtype/shape), accumulated in a hook;
        ``backward_of_batch(i)`` runs batch i's backward. With ``park`` set the running max of a tensor
        waits there between its layer's visits to the device (model mode, layers on the host)."""
        acc: dict[int, torch.Tensor] = {}

        def hook(p: torch.Tensor) -> None:
            g = p.grad
            p.grad = None  # only this batch's gradient of this tensor is ever alive
            a = acc.get(id(p))
            if a is None:
                a = g.abs()
            else:
                a = a.to(g.device)
                torch.ops.gradprobe.probe_accumulate_(a, g)
            acc[id(p)] = a if self.park is None else a.to(self.park)

        handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
        try:
            from tqdm.auto import tqdm

            desc = "probe G0" if self.passes % 2 == 0 else "probe G1"
            for i in tqdm(range(len(self.batches)), desc=desc, unit="batch", disable=not self.progress):
                with torch.enable_grad():
                    backward_of_batch(i)
        finally:
            for h in handles:
                h.remove()
            for p in params:
                p.grad = None
        self.passes += 1
        missing = [i for i, p in enumerate(params) if id(p) not in acc]
        if missing:
            raise RuntimeError(f"{len(missing)} probed tensors received no gradient; does the loss depend on them?")
        return [distributed.all_max_(acc[id(p)]) for p in params]  # the max over every rank's batches


def _backward(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("loss must return a scalar (0-dim) tensor")
    loss.backward()


@dataclass(frozen=True)
class _Exact:
    """The exact rule's plan for one tensor: prune ``count`` (per row, or for the tensor) of its
    candidates; ``score`` (c,) fp32 = the candidates' method scores (the tie-break)."""

    count: int
    per_row: bool
    score: torch.Tensor


def _candidates(targets: Sequence[_Target], sparsity: float, method: str, scope: str,
                norms: Mapping[str, torch.Tensor] | None,
                exact: float | None = None) -> list[tuple[torch.Tensor, _Exact | None]]:
    """Candidate masks at ``sparsity`` (for target="exact": the candidate sparsity s') and, when
    ``exact`` (the requested sparsity s) is given, each tensor's :class:`_Exact` plan: count
    floor(s * in) per row, floor(s * numel) per tensor, or for "global" the number the global
    score selection at s puts in the tensor (the counts sum to floor(s * total))."""
    ns = None
    if method == "wanda":
        if norms is None or any(t.name not in norms for t in targets):
            missing = [t.name for t in targets if norms is None or t.name not in norms]
            raise ValueError(f"Wanda norms missing for {missing[:3]}...; pass norms for every probed tensor or none")
        ns = [norms[t.name].to(device=t.param.device, dtype=torch.float32).contiguous() for t in targets]
    ws = [t.param.data for t in targets]
    with torch.no_grad():
        if scope == "global":
            masks = global_prune_masks(ws, sparsity, norms=ns)
        else:
            masks = [prune_mask(w, sparsity, norm=None if ns is None else ns[i], scope=scope) for i, w in enumerate(ws)]
        if exact is None:
            return [(m, None) for m in masks]
        if scope == "global":
            counts = [int(m.sum()) for m in global_prune_masks(ws, exact, norms=ns)]
        else:
            counts = [num_pruned(w.shape[1] if scope == "row" else w.numel(), exact) for w in ws]
        plans = []
        for i, (w, m) in enumerate(zip(ws, masks, strict=True)):
            score = w.abs().to(torch.float32)
            if ns is not None:
                score = score * ns[i].abs()  # as the selection ops score: |W| * |norm|
            plans.append(_Exact(counts[i], scope == "row", score[m]))
    return list(zip(masks, plans, strict=True))


def _probe_group(runner: _Runner, targets: Sequence[_Target], backward_of_batch: Callable[[int], None],
                 cands: Callable[[], list[tuple[torch.Tensor, _Exact | None]]],
                 r: float, threshold: GradientThreshold, n_max: int,
                 after_g0: Callable[[list, list[torch.Tensor]], None] | None = None,
                 g0_state: tuple[list, list[torch.Tensor]] | None = None) -> dict[str, TensorProbe]:
    """G0 pass, candidates (``cands`` is called after G0, so norm hooks of that pass are complete),
    scale by r, G1 pass, decide + restore + zero. Only ``targets`` require grad meanwhile.

    ``after_g0(chosen, g0c)`` sees the candidates and their fp32 G0 (a checkpoint); ``g0_state`` = such a
    (chosen, g0c) pair skips the G0 pass (a resumed run)."""
    params = [t.param for t in targets]
    for p in params:
        p.requires_grad_(True)
    try:
        if g0_state is None:
            g0 = runner.grad_pass(params, backward_of_batch)
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
                runner.changed.append((p, m, b))  # before the write: an error inside it is undone too
                p.data.masked_scatter_(m, b * r)
        g1 = runner.grad_pass(params, backward_of_batch)
    finally:
        for p in params:
            p.requires_grad_(False)
    out = {}
    with torch.no_grad():
        for t, (m, plan), b, a, g in zip(targets, chosen, backups, g0c, g1, strict=True):
            tp = TensorProbe(t.name, t.layer, t.linear, t.param, m, b, a, g[m].to(torch.float32))
            if plan is not None:
                tp.count, tp.per_row, tp.score = plan.count, plan.per_row, plan.score
            tp.apply_(resolve_threshold(threshold, t.name, t.layer, t.linear, t.param.numel(), n_max))
            out[t.name] = tp
    return out


def probe(model: nn.Module, batches: torch.Tensor | Sequence[torch.Tensor], sparsity: float, **options: Any) -> ProbeResult:
    """Run the gradient probe and prune in place; returns the :class:`ProbeResult` (masks + cache).

    Arguments, defaults and errors: exactly those of :func:`probe_prune_` (``options`` are its keywords).
    Under ``torch.distributed`` the batches are split over the ranks (contiguous shares), G0 / G1 are
    max-reduced and the norms summed in batch order across ranks: every rank gets the masks one process
    gets, checked by a digest before returning.
    """
    with distributed.guard():
        result = _probe(model, batches, sparsity, **options)
        if distributed.active():
            masks = result.masks
            distributed.agree("probe masks", distributed.masks_digest(masks[k] for k in sorted(masks)))
        distributed.barrier()
    return result


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
        _undo(runner)
        raise
    finally:
        for p in model.parameters():
            p.requires_grad_(grad_flags[id(p)])
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    return ProbeResult(tensors, threshold, mode, time.perf_counter() - start, runner.passes, info, restored)


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
        return _probe_group(runner, all_targets, lambda b: runner.model_backward(b, min(live)), cands, r, threshold,
                            n_max, after_g0, g0_state)
    finally:
        runner.park = None
        if collector is not None:
            collector.close()


def _norms_digest(norms: Mapping[str, torch.Tensor], targets: Sequence[_Target]) -> str:
    from gradprobe._checkpoint import tensors_digest

    return tensors_digest({t.name: norms[t.name].detach().to("cpu", torch.float32) for t in targets})


class _Resume:
    """The probe's resume checkpoint (:class:`gradprobe._checkpoint.ResumeState`): step ``pos`` of the probe
    order (one decoder layer; model mode: one step of every tensor) saved as its pruned weights and masks.

    A rerun with the same identity restores the longest verified prefix of steps; the model it is given
    must be the dense one the checkpoint was started on (per-tensor checksums).
    """

    def __init__(self, directory, identity: dict, targets: Sequence[_Target], sparsity: float):
        from gradprobe._checkpoint import ResumeState, sample_checksum

        checksums = {t.name: sample_checksum(t.param) for t in targets}
        self.state = ResumeState(directory, identity, checksums)
        self.sparsity = sparsity
        saved = self.state.state["checksums"]
        bad = [n for n, c in checksums.items() if saved.get(n) != c]
        if bad:
            raise ValueError(f"resume_dir {str(directory)!r}: the weights of {bad[:3]} differ from the dense model "
                             "the checkpoint was started on; pass that (unpruned) model, or a new resume_dir")

    def done(self, steps: Sequence[Sequence[_Target]]) -> int:
        """How many leading steps are finished with a checkpoint that verifies."""
        n = 0
        while n < len(steps) and self.state.finished(n):
            n += 1
        return n

    def restore(self, steps: Sequence[Sequence[_Target]], runner: _Runner, final: int = 0) -> dict[str, torch.Tensor]:
        """Copy the pruned weights of ``steps[final:]`` (finished ones) into the model; returns their masks.
        The dense values they replace go to ``runner.changed`` (undone on an error)."""
        masks: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for pos, targets in enumerate(steps):
                if not self.state.finished(pos):
                    raise ValueError(f"resume_dir {str(self.state.dir)!r}: step {pos} has no verified checkpoint")
                if pos < final:
                    continue
                saved = self.state.tensors("layer", pos)
                for t in targets:
                    m = saved[t.name + ".mask"].to(t.param.device)
                    runner.changed.append((t.param, m, t.param.data[m]))
                    t.param.data.copy_(saved[t.name])
                    masks[t.name] = m
        return masks

    def save_g0(self, targets: Sequence[_Target], chosen: list, g0c: list[torch.Tensor]) -> None:
        """Model mode, step 0: each tensor's candidates (bool), their fp32 G0 and, for target="exact",
        the plan (scores; count and per-row flag as an int64 pair)."""
        from gradprobe.report import TensorRow

        tensors, rows = {}, []
        for t, (m, plan), g in zip(targets, chosen, g0c, strict=True):
            tensors[t.name + ".candidates"] = m
            tensors[t.name + ".g0"] = g
            if plan is not None:
                tensors[t.name + ".score"] = plan.score
                tensors[t.name + ".plan"] = torch.tensor([plan.count, int(plan.per_row)], dtype=torch.int64)
            rows.append(TensorRow(layer=t.layer, name=t.name, shape=tuple(t.param.shape), numel=t.param.numel(),
                                  pruned=int(m.sum()), target=self.sparsity, seconds=0.0))
        self.state.mark("layer", 0, tensors, rows, 0.0)

    def g0_state(self, targets: Sequence[_Target], device: torch.device) -> tuple[list, list[torch.Tensor]]:
        """What :meth:`save_g0` saved, as ``_probe_group``'s (chosen, g0c) on ``device``."""
        saved = self.state.tensors("layer", 0)
        chosen, g0c = [], []
        for t in targets:
            plan = None
            if t.name + ".plan" in saved:
                count, per_row = (int(v) for v in saved[t.name + ".plan"])
                plan = _Exact(count, bool(per_row), saved[t.name + ".score"].to(device))
            chosen.append((saved[t.name + ".candidates"].to(device), plan))
            g0c.append(saved[t.name + ".g0"].to(device))
        return chosen, g0c

    def save(self, pos: int, targets: Sequence[_Target], masks: Mapping[str, torch.Tensor], seconds: float) -> None:
        """Checkpoint step ``pos``: the pruned weights (as they are in the model now) and masks."""
        from gradprobe.report import TensorRow

        tensors, rows = {}, []
        for t in targets:
            tensors[t.name] = t.param.data
            tensors[t.name + ".mask"] = masks[t.name]
            rows.append(TensorRow(layer=t.layer, name=t.name, shape=tuple(t.param.shape), numel=t.param.numel(),
                                  pruned=int(masks[t.name].sum()), target=self.sparsity, seconds=seconds))
        self.state.mark("layer", pos, tensors, rows, seconds)


def _capture_inputs(runner: _Runner, batch_list, layer_ids: set[int], collect_norms_for: Sequence[_Target]):
    """One no-grad pass of the embedding and the decoder layers (each held on the device once, for all
    batches): the inputs of the decoder layers in ``layer_ids`` per batch (on the host when the layers
    live there), and (optionally) the Wanda norms of ``collect_norms_for``."""
    last = max(layer_ids, default=-1)
    if collect_norms_for:
        last = max(last, max(t.layer for t in collect_norms_for) + 1)  # run the last such layer itself
    store: dict[int, list[torch.Tensor]] = {}
    collector = _Norms(collect_norms_for, runner.device) if collect_norms_for else None
    try:
        with torch.no_grad():
            hs = [runner.embed(b) for b in batch_list]
            for j in range(last + 1):
                if j in layer_ids:
                    store[j] = [h.to(runner.home) for h in hs]
                if j == last:
                    break
                with runner.hold_layer(j):
                    hs = [runner.run_layer(j, h) for h in hs]
    finally:
        if collector is not None:
            collector.close()
    return store, collector.remove() if collector is not None else {}


def _undo(runner: _Runner) -> None:
    """Put every candidate the run changed back to its original value (newest first)."""
    with torch.no_grad():
        for p, m, b in reversed(runner.changed):
            p.data.masked_scatter_(m.to(p.device), b.to(p.device))
    runner.changed.clear()


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
        h = inputs.pop(seq[0])
        with torch.no_grad():
            for j in range(seq[0], todo[0]):
                with runner.hold_layer(j):
                    h = [runner.run_layer(j, x.to(runner.device)).to(runner.home) for x in h]
        inputs[todo[0]] = h
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
                got = _probe_group(runner, targets, backward_of_batch, cands, r, threshold, n_max)
        finally:
            runner.park = None
            if collector is not None:
                collector.close()
        tensors.update({n: _to_home(tp) for n, tp in got.items()})
        if resume is not None:
            resume.save(pos, targets, {t.name: tensors[t.name].mask for t in targets}, time.perf_counter() - t0)
        if order == "forward" and pos + 1 < len(seq):
            nxt = seq[pos + 1]
            with torch.no_grad():
                h = hidden
                for j in range(i, nxt):
                    with runner.hold_layer(j):
                        h = [runner.run_layer(j, x.to(runner.device)).to(runner.home) for x in h]
            inputs[nxt] = h
        del hidden
        bar.update(1)
    bar.close()
    return tensors, restored


def probe_prune_(
    model: nn.Module,
    batches: torch.Tensor | Sequence[torch.Tensor],
    sparsity: float,
    *,
    method: str = "wanda",
    scope: str = "row",
    reduction_factor: float = 0.1,
    gradient_threshold: GradientThreshold = 0.0,
    mode: str = "layerwise",
    order: str = "reverse",
    target: str = "candidates",
    candidate_sparsity: float | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    norms: Mapping[str, torch.Tensor] | None = None,
    structure: str | None = None,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    streamed: bool = True,
    resume_dir: str | os.PathLike | None = None,
) -> PruneReport:
    """Prune the decoder linears of ``model`` in place with the gradient probe (module docstring).

    Args:
        model: a Hugging Face causal LM of a supported family (``gradprobe.models``); any dtype/device.
        batches: calibration token ids: a (n, seqlen) int64 tensor (n batches of one row), a
            (B, batch, seqlen) tensor, or a list of (batch, seqlen) / (seqlen,) tensors. The same
            batches are used for G0 and G1.
        sparsity: fraction in [0, 1): the candidate fraction with ``target="candidates"`` (achieved <= it,
            restored candidates); exactly the pruned fraction with ``target="exact"``.
        method: "wanda" (|W| * ||X_j||_2) or "magnitude" (|W|) candidate scores.
        scope: "row", "layer" (each tensor) or "global" (one group over all probed tensors).
        reduction_factor: r in (0, 1); candidates are scaled by r for the G1 pass.
        gradient_threshold: tau >= 0: a float, a mapping (keys: full parameter name, decoder layer
            index, linear name such as "mlp.down_proj", or "default"; lookup in that order, else 0),
            or :class:`SizeAdaptive` (tau * sqrt(numel / n_ref)).
        mode: "layerwise" (one decoder layer at a time), "model" (all tensors in one probe) or
            "regional" (one layer at a time, loss = squared norm of that layer's output).
        order: "reverse" (last layer first) or "forward"; layerwise / regional only.
        target: "candidates" (prune the candidates whose gradient did not grow) or "exact" (prune
            exactly the requested count, the least-grown of candidates at ``candidate_sparsity``).
        candidate_sparsity: s' in [sparsity, 1) for ``target="exact"`` (default s + 0.2 (1 - s));
            must be None with ``target="candidates"``.
        loss: optional ``loss(logits (batch, seqlen, vocab), input_ids (batch, seqlen)) -> 0-dim``;
            default the model's causal-LM loss ``model(input_ids=b, labels=b).loss``.
        norms: optional Wanda norms, parameter name -> (in_features,) float32.
        structure: must be None / "unstructured" (N:M raises ValueError, see the module docstring).
        layers: probe only these decoder layer indices (default all).
        progress: tqdm bar over layers.
        device: where the probe computes (default: where the decoder layers are). When the model lives
            elsewhere (e.g. on the host), each decoder layer, the embedding and the head visit the device
            only while they run; cached layer inputs and (model mode) the |grad| statistics wait on the host.
        streamed: model-loss gradients (``mode="model"``, ``"layerwise"``) by a streamed forward/backward,
            one decoder layer's autograd graph at a time (:mod:`gradprobe.pipeline.backward`; same
            gradients as the whole graph, bit for bit on the CPU; peak memory about one layer + the
            boundary activations of one batch + the head). False: one graph of the whole model (or tail),
            which needs ``device`` None or the model's device.
        resume_dir: checkpoint directory: each finished step is saved there, checksummed (layerwise /
            regional: each decoder layer's pruned weights and masks; model mode: the candidates and their
            G0 after the G0 pass, then the pruned weights and masks), and a rerun with the same arguments
            on the same dense model restores the finished steps and continues; the result equals an
            uninterrupted run's.

    Returns:
        :class:`gradprobe.report.PruneReport`: ``masks`` = {parameter name: bool mask of the weight's
        shape, True = pruned}; ``rows`` = one per probed tensor; ``resumed_layers``, ``seconds``.
        :func:`probe` returns the :class:`ProbeResult` with the cache for threshold tuning.

    Raises:
        ValueError / TypeError for bad arguments, before the model is touched.
    """
    return probe(**locals()).report(model)  # locals() here: exactly the arguments


_SIGNATURE = inspect.signature(probe_prune_)  # bound by probe(): the arguments, whoever replaces the name
probe.__signature__ = _SIGNATURE.replace(return_annotation="ProbeResult")


def _probe_arguments(model, batches, sparsity, options: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`probe_prune_`'s arguments by name with defaults filled in, checked before the model is
    touched: sparsity, reduction_factor (float) and gradient_threshold normalised, batches as a list."""
    try:
        bound = _SIGNATURE.bind(model, batches, sparsity, **options)
    except TypeError as exc:
        raise TypeError(f"{exc} (the probe takes the arguments of gradprobe.probe_prune_)") from None
    bound.apply_defaults()
    a = bound.arguments
    a["sparsity"], a["reduction_factor"], a["gradient_threshold"] = _check_args(
        a["sparsity"], a["method"], a["scope"], a["mode"], a["order"], a["reduction_factor"], a["gradient_threshold"],
        a["structure"], a["loss"], a["norms"])
    a["batches"] = _check_batches(batches)
    if a["norms"] is not None:
        for k, v in a["norms"].items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"norms[{k!r}] must be a (in_features,) float32 tensor, got {type(v).__name__}")
    a["candidate_sparsity"] = _check_target(a["target"], a["candidate_sparsity"], a["sparsity"])
    if a["device"] is not None:
        try:
            a["device"] = _as_device(a["device"])
        except (RuntimeError, TypeError, AssertionError) as exc:
            raise ValueError(f"device must be None or a torch device such as 'cpu' or 'cuda:0', got {a['device']!r} "
                             f"({exc})") from None
    if not isinstance(a["streamed"], bool):
        raise TypeError(f"streamed must be True or False, got {type(a['streamed']).__name__}")
    if a["resume_dir"] is not None and not isinstance(a["resume_dir"], (str, os.PathLike)):
        raise TypeError(f"resume_dir must be None or a directory path, got {type(a['resume_dir']).__name__}")
    return a


def default_candidate_sparsity(sparsity: float) -> float:
    """s' for ``target="exact"`` when none is given: s + OVERSELECT * (1 - s)."""
    return sparsity + OVERSELECT * (1.0 - sparsity)


def _check_target(target: Any, candidate_sparsity: Any, sparsity: float) -> float | None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "candidates":
        if candidate_sparsity is not None:
            raise ValueError('candidate_sparsity is used only with target="exact"; drop it or pass target="exact"')
        return None
    if candidate_sparsity is None:
        return default_candidate_sparsity(sparsity)
    cs = check_sparsity(candidate_sparsity, "candidate_sparsity")
    if cs < sparsity:
        raise ValueError(f"candidate_sparsity must be >= sparsity ({sparsity}) so that every row has enough "
                         f"candidates for the exact count, got {cs}")
    return cs
