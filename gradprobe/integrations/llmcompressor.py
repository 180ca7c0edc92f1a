"""``GradprobeModifier``: gradprobe's exact masks as an llm-compressor modifier.

Use it where llm-compressor's ``WandaPruningModifier`` would go::

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from gradprobe.integrations.llmcompressor import GradprobeModifier

    oneshot(model=model, dataset=ds, recipe=[
        GradprobeModifier(method="wanda", sparsity=0.5),
        GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
    ])

It subclasses llm-compressor's ``SparsityModifierBase`` (the base of its Wanda and SparseGPT
modifiers) and runs inside its sequential pipeline the same way: a forward hook on every target
linear accumulates the fp32 per-input-channel sum of squares while the pipeline calibrates one
decoder layer (its onloading, offloading and activation cache); at the end of the layer's
calibration pass (``on_sequential_epoch_end``) every target is pruned in place with the op
:func:`gradprobe.prune` uses (``gradprobe::`` exact selection; ties -> lower flat index; counts
exactly ``floor(s * n)``); the pipeline then propagates the *pruned* layer's outputs to the next
layer, as the Wanda reference and :func:`gradprobe.prune` do.

Options (llm-compressor names where they exist):

* ``method``: "wanda" (|W| * ||X_j||_2) or "magnitude" (|W|, no calibration data; pruned at
  initialisation). ``scope``: "row" (Wanda) or "layer". ``mask_structure``: "0:0" (unstructured) or
  "N:M" (N pruned of every M inputs; ``sparsity`` must then be N/M or None).
* ``sparsity``: one fraction, or one per decoder layer (list).
* ``sparsity_profile="owl"`` with ``owl_m`` / ``owl_lmbda``: OWL layer ratios computed by
  :func:`gradprobe.allocation.owl_from_model` (the published mapping, exact integer counts) from a dense
  pass over the calibration set at initialisation, as llm-compressor's own OWL does.
* ``targets``: by default the decoder-layer linears of gradprobe's model adapters (q, k, v, o, gate,
  up, down), never ``lm_head``. llm-compressor's own modifiers default to every ``Linear``, which
  includes ``lm_head`` (tied to the embeddings in SmolLM2, so pruning it prunes the embeddings too);
  there ``ignore=["lm_head"]`` does not exclude it because the name they match against carries a
  trailing dot (``"lm_head."``): only ``"re:.*lm_head"`` does. Here ``targets`` / ``ignore`` use
  llm-compressor's matching on the plain module name, so ``ignore=["lm_head"]`` works; a target that
  is neither a decoder linear nor ``lm_head`` raises ``ValueError``.
* ``preserve_sparsity`` (default True): llm-compressor 0.14's ``GPTQModifier`` has no
  sparsity-preserving option (its column updates move pruned zeros), so the modifier keeps a bit-packed
  copy of every mask (1 bit per weight) and re-zeroes the pruned weights after later modifiers changed
  them: right before the layer's next forward (the pipeline's propagation pass, which runs after
  every modifier has compressed the layer) and once more at finalisation. Zero is exactly
  representable by llm-compressor's integer and float quantisation schemes, so the quantised model
  keeps the mask. ``False`` leaves exactly what ``WandaPruningModifier`` leaves.

The gradient probe (``method="probe"``) is refused with ``ValueError``: its statistic is the gradient
of the causal-LM loss, which needs a forward and backward pass through every later layer and
``lm_head`` with grad enabled, while this pipeline runs one decoder layer at a time under
``torch.no_grad`` with only that layer onloaded. Prune with :func:`gradprobe.probe_prune_` and then
run the quantisation recipe on the pruned model.

Where masks equal :func:`gradprobe.prune`: with the same calibration windows (the ``input_ids`` of a
``datasets.Dataset`` given to ``oneshot`` with ``batch_size=1``, ``PruneConfig(batch_size=1)``), fp32
model, the masks are bit-identical (tested on the embedded SmolLM2-135M). The statistics are summed in
the same order (one window at a time); the layer inputs are the same because both run the embedding,
the decoder layers and the pruned-output propagation with the same kwargs. They can differ when the
activations do: ``oneshot`` with ``batch_size > 1`` pads to the longest sample (padding tokens then
enter the statistics, and per-batch fp32 partial sums change the rounding), or a model whose
attention path differs between a traced full-model forward (the pipeline) and gradprobe's per-layer
call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    from compressed_tensors.utils import (
        align_module_device,
        get_execution_device,
        match_named_modules,
        match_targets,
        update_offload_parameter,
    )
    from llmcompressor.core import Event, State
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from loguru import logger
    from pydantic import PrivateAttr, model_validator
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gradprobe.integrations.llmcompressor needs llm-compressor: "
        'pip install "gradprobe[llmcompressor]" (best in its own virtual environment, see README)'
    ) from exc

from gradprobe.config import PruneConfig
from gradprobe.methods import prune_to_target_
from gradprobe.models import get_adapter
from gradprobe.pipeline.calibration import LM_HEAD
from gradprobe.plan import Target, build_plan
from gradprobe.report import TensorRow
from gradprobe.stats import ChannelStats, sum_of_squares

__all__ = ["GradprobeModifier", "pack_mask", "unpack_mask"]

METHODS = ("wanda", "magnitude")
SCOPES = ("row", "layer")
_SHIFTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool mask (any shape) -> uint8 (ceil(numel / 8),) on the CPU, 8 flags per byte (LSB first)."""
    flat = mask.reshape(-1).to("cpu", torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...], device: Any = None) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: bool tensor of ``shape`` on ``device``."""
    n = 1
    for d in shape:
        n *= int(d)
    bits = (packed.to(device)[:, None] & _SHIFTS.to(device)) != 0
    return bits.reshape(-1)[:n].reshape(shape)


def _structure(mask_structure: str) -> str | None:
    n, m = (int(p) for p in mask_structure.split(":"))
    return None if (n, m) == (0, 0) else f"{n}:{m}"


class GradprobeModifier(SparsityModifierBase):
    """llm-compressor modifier pruning with gradprobe's exact ops (see the module docstring).

    Attributes (recipe arguments):
        method: "wanda" or "magnitude". scope: "row" or "layer".
        sparsity: fraction in [0, 1), a list with one fraction per decoder layer (+1 for lm_head),
            or None under an N:M ``mask_structure``.
        mask_structure: "0:0" (unstructured) or "N:M".
        sparsity_profile: None or "owl" (with ``owl_m``, ``owl_lmbda``).
        targets: None = the decoder-layer linears; else llm-compressor target strings restricted to
            decoder linears and ``lm_head``. ignore: target strings to skip (plain module names).
        preserve_sparsity: re-zero pruned weights after later modifiers (GPTQ) changed them.

    After ``oneshot``, :attr:`rows` holds one :class:`gradprobe.report.TensorRow` per pruned tensor
    and :attr:`rezeroed` the number of pruned weights later modifiers had moved off zero (per name).
    """

    method: str = "wanda"
    sparsity: float | list[float] | None = 0.5
    scope: str = "row"
    targets: str | list[str] | None = None
    preserve_sparsity: bool = True

    _config: PruneConfig | None = PrivateAttr(default=None)
    _where: dict[nn.Module, tuple[int, str, str]] = PrivateAttr(default_factory=dict)
    _targets: dict[tuple[int, str], Target] = PrivateAttr(default_factory=dict)
    _stats: dict[nn.Module, ChannelStats] = PrivateAttr(default_factory=dict)
    _last: tuple[torch.Tensor, torch.Tensor] | None = PrivateAttr(default=None)
    _masks: dict[nn.Module, tuple[torch.Tensor, torch.Size]] = PrivateAttr(default_factory=dict)
    _remask_handles: dict[nn.Module, Any] = PrivateAttr(default_factory=dict)
    _rows: list[TensorRow] = PrivateAttr(default_factory=list)
    _rezeroed: dict[str, int] = PrivateAttr(default_factory=dict)
    _done: set[str] = PrivateAttr(default_factory=set)

    # -- validation (on construction, before any model is touched) --------------------------------
    @model_validator(mode="after")
    def _check_gradprobe_args(self) -> GradprobeModifier:
        if self.method == "probe":
            raise ValueError(
                "GradprobeModifier(method='probe') cannot run in llm-compressor's sequential pipeline: the "
                "probe needs the gradient of the causal-LM loss through every later layer and lm_head, while "
                "the pipeline calibrates one decoder layer at a time under torch.no_grad. Prune with "
                "gradprobe.probe_prune_ first, then run the quantisation recipe on the pruned model"
            )
        if self.method not in METHODS:
            raise ValueError(f"GradprobeModifier.method must be one of {METHODS} (or see 'probe'), got {self.method!r}")
        if self.scope not in SCOPES:
            raise ValueError(
                f"GradprobeModifier.scope must be one of {SCOPES}, got {self.scope!r} (scope 'global' needs every "
                "layer's norms before any layer is pruned; use gradprobe.prune(scope='global') instead)"
            )
        structure = _structure(self.mask_structure)
        sparsity = self.sparsity
        if isinstance(sparsity, list) and self.sparsity_profile == "owl":
            raise ValueError("GradprobeModifier: sparsity_profile='owl' needs one float sparsity (the model-wide target)")
        if self.sparsity_profile == "owl" and (structure is not None or self.scope != "row"):
            raise ValueError("GradprobeModifier: sparsity_profile='owl' needs mask_structure='0:0' and scope='row'")
        if self.sparsity_profile == "owl":
            from gradprobe.allocation import check_owl

            check_owl(sparsity, self.owl_m, self.owl_lmbda)
        try:
            self._config = PruneConfig(
                method=self.method,
                sparsity=tuple(sparsity) if isinstance(sparsity, list) else sparsity,
                scope=self.scope,
                structure=structure,
                batch_size=1,
                progress=False,
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"GradprobeModifier: {exc}".replace("PruneConfig.", "")) from None
        # magnitude reads no activations: no calibration pass is needed for it
        object.__setattr__(self, "requires_calibration_data", self.method != "magnitude")
        return self

    # -- lifecycle ---------------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        model: nn.Module = state.model
        adapter = get_adapter(model)  # unsupported family -> ValueError naming the supported ones
        layers = adapter.decoder_layers(model)
        candidates: dict[nn.Module, tuple[int, str]] = {}
        for i, layer in enumerate(layers):
            for name, lin in adapter.prunable_linears(layer).items():
                candidates[lin] = (i, name)
        head = adapter.lm_head(model)
        fullnames = {m: n for n, m in model.named_modules()}
        if self.targets is None:
            chosen = [m for m in candidates]
        else:
            targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
            chosen = []
            for fullname, module in match_named_modules(model, targets):
                if not isinstance(module, nn.Linear):
                    continue
                if module is head:
                    candidates[module] = (len(layers), LM_HEAD)
                elif module not in candidates:
                    raise ValueError(
                        f"GradprobeModifier.targets matched {fullname!r}, which is neither a decoder-layer linear "
                        f"({', '.join(sorted({n for _, n in candidates.values()}))}) nor lm_head"
                    )
                chosen.append(module)
        chosen = [m for m in chosen if not match_targets(fullnames[m], m, self.ignore)]
        if not chosen:
            raise ValueError("GradprobeModifier: targets/ignore leave no module to prune")
        if head is not None and head in chosen and adapter.lm_head_tied(model):
            raise ValueError(
                "GradprobeModifier: lm_head is tied to the input embeddings (pruning it prunes embed_tokens "
                "too); drop it from targets or untie the weights"
            )
        self._where = {m: (*candidates[m], fullnames[m]) for m in chosen}
        config = self._config.replace(include_lm_head=any(n == LM_HEAD for _, n, _ in self._where.values()))
        names = [(i, n) for i, n, _ in self._where.values()]
        if self.sparsity_profile == "owl":
            if config.include_lm_head:
                raise ValueError("GradprobeModifier: sparsity_profile='owl' covers the decoder layers only; drop lm_head")
            alloc = self._owl(model, state)
            config = alloc.config(batch_size=1, progress=False)
            missing = sorted(set(names) - set(alloc.counts))
            if missing:
                raise ValueError(f"GradprobeModifier: OWL plan lacks {missing[:3]}")
        self._config = config
        groups: dict[int, dict[str, nn.Module]] = {}
        for module, (i, n, _) in self._where.items():
            groups.setdefault(i, {})[n] = module
        self._targets = build_plan(config, groups, len(layers))
        if self.method == "magnitude":
            for module in self._where:
                self._prune(module, None)
        return True

    def _owl(self, model: nn.Module, state: State):
        """OWL plan from a dense pass over the calibration set (gradprobe's own layer loop)."""
        from gradprobe.allocation import owl_from_model

        loader = getattr(getattr(state, "data", None), "calib", None)
        if loader is None:
            raise ValueError("GradprobeModifier: sparsity_profile='owl' needs calibration data (oneshot(dataset=...))")
        rows = [row for batch in loader for row in batch["input_ids"]]
        if len({r.numel() for r in rows}) != 1:
            raise ValueError("GradprobeModifier: OWL needs calibration samples of equal length (set max_seq_length)")
        batches = torch.stack(rows).to(torch.int64).cpu()
        device = str(get_execution_device(model))
        return owl_from_model(
            model, batches, float(self.sparsity), m=float(self.owl_m), lam=float(self.owl_lmbda),
            config=PruneConfig(batch_size=1, progress=False, device=device),
        )

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        if self.method == "magnitude":
            return
        for module in self._where:
            self.register_hook(module, self.calibrate_module, "forward")

    def calibrate_module(self, module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        """Forward hook: accumulate the fp32 per-input-channel sum of squares of ``args[0]``.

        Linears fed the same tensor (q/k/v, gate/up) compute it once, as gradprobe's LayerStats does.
        """
        x = args[0]
        st = self._stats.get(module)
        if st is None:
            st = self._stats[module] = ChannelStats(x.shape[-1], x.device)
        if self._last is not None and self._last[0] is x:
            sq = self._last[1]
        else:
            sq = sum_of_squares(x)
            self._last = (x, sq)
        st.add(x, sq.to(st.sumsq.device))

    def compress_modules(self) -> None:
        """Prune every calibrated module (called at the end of a layer's calibration pass)."""
        self._last = None
        for module in list(self._stats):
            self._prune(module, self._stats.pop(module))

    def _prune(self, module: nn.Module, st: ChannelStats | None) -> None:
        i, name, fullname = self._where[module]
        target = self._targets[(i, name)]
        with torch.no_grad(), align_module_device(module):
            weight = module.weight.data.clone()
            norm = None if st is None else st.norm().to(weight.device)
            mask = prune_to_target_(weight, target, norm)
        update_offload_parameter(module, "weight", weight)
        pruned = int(mask.sum())
        self._done.add(fullname)
        self._rows.append(
            TensorRow(layer=i, name=name, shape=tuple(weight.shape), numel=weight.numel(), pruned=pruned,
                      target=target.fraction, seconds=0.0)
        )
        logger.info(f"gradprobe {self.method}: pruned {pruned}/{weight.numel()} of {fullname}")
        if self.preserve_sparsity:
            self._masks[module] = (pack_mask(mask), mask.shape)
            self._remask_handles[module] = module.register_forward_pre_hook(self._remask_hook)

    def _remask_hook(self, module: nn.Module, _args: Any) -> None:
        handle = self._remask_handles.pop(module, None)
        if handle is not None:
            handle.remove()
        self._remask(module)

    def _remask(self, module: nn.Module) -> None:
        """Zero the pruned weights of ``module`` again if a later modifier changed them."""
        packed, shape = self._masks[module]
        with torch.no_grad(), align_module_device(module):
            weight = module.weight.data
            mask = unpack_mask(packed, shape, weight.device)
            moved = int((weight[mask] != 0).sum())
            if moved:
                weight = weight.masked_fill(mask, 0)
        if moved:
            update_offload_parameter(module, "weight", weight)
            name = self._where[module][2]
            self._rezeroed[name] = self._rezeroed.get(name, 0) + moved

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs: Any) -> None:
        self.compress_modules()

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        if not self.ended_:
            self.on_end(state, None)  # removes the calibration hooks
        if self._stats:
            names = [self._where[m][2] for m in self._stats]
            raise ValueError(f"GradprobeModifier: {len(names)} modules were calibrated but never pruned: {names[:3]}")
        unreached = [n for _, _, n in self._where.values() if n not in self._done]
        for module in list(self._masks):
            self._remask(module)
        for handle in self._remask_handles.values():
            handle.remove()
        self._remask_handles.clear()
        self._masks.clear()
        if self._rezeroed:
            logger.info(
                f"gradprobe: re-zeroed {sum(self._rezeroed.values())} pruned weights that later modifiers had changed"
            )
        if unreached:
            raise ValueError(f"GradprobeModifier: {len(unreached)} target modules were never pruned: {unreached[:3]}")
        return True

    # -- results -----------------------------------------------------------------------------------
    @property
    def rows(self) -> list[TensorRow]:
        """One row per pruned tensor (layer index, name, shape, pruned count, target)."""
        return list(self._rows)

    @property
    def rezeroed(self) -> dict[str, int]:
        """Per module name: pruned weights that later modifiers had moved off zero (re-zeroed)."""
        return dict(self._rezeroed)
