"""Sequential layerwise pruning (Wanda / magnitude) of a Hugging Face decoder-only LM.

Algorithm (as the Wanda reference, https://github.com/locuslab/wanda/blob/main/lib/prune.py):

1. :func:`capture_calibration` embeds the calibration windows once: ``inputs`` (N, L, H) in the
   model's dtype on ``config.device`` = the inputs of decoder layer 0.
2. For each decoder layer: move it to the device; run it on all windows with
   :class:`gradprobe.stats.LayerStats` hooks (fp32 per-input-channel sum of squares); select and
   prune every prunable linear in place (``config.mask_fn`` or :func:`gradprobe.prune_`); re-run the
   *pruned* layer to produce the next layer's inputs into the second buffer; swap buffers; move the
   layer back.
3. Scope "global" (:mod:`gradprobe.pipeline.global_scope`): one pass over the dense model collects
   all norms, then one selection over every prunable tensor: :func:`gradprobe.global_prune_` in
   memory, or, streamed (a layer provider), two histogram passes and a mask pass, a layer at a time.

Resume: after every finished layer the pruned linears are saved (safetensors) with a JSON state.
A rerun restores finished layers and *recomputes* their outputs from the layer-0 inputs with the
restored (pruned) weights instead of storing activations (N*L*H per boundary: 2 GiB at 128x2048x4096
bf16). The recomputation repeats exactly the forwards of the uninterrupted run, so the result is
bit-identical on a deterministic device.

Under ``torch.distributed`` (:mod:`gradprobe.distributed`) each rank embeds and propagates only its
contiguous share of the windows; the statistics are combined in global sample order, so every rank
selects the masks one process selects (checked by a digest per layer before the checkpoint is written,
by rank 0 only).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradprobe import distributed
from gradprobe._checkpoint import STATE_VERSION, ResumeState, batches_digest, sample_checksum
from gradprobe.config import PruneConfig
from gradprobe.models import get_adapter
from gradprobe.pipeline.calibration import (
    EMBEDDINGS,
    LM_HEAD,
    LayerProvider,
    capture_calibration,
    check_batches,
    on_device,
)
from gradprobe.report import PruneReport, TensorRow
from gradprobe.select import prune_
from gradprobe.stats import ChannelStats


# --------------------------------------------------------------------------------------------------
# pluggable steps
# --------------------------------------------------------------------------------------------------
@dataclass
class TensorContext:
    """What a ``mask_fn`` / ``sparsity_fn`` may need besides the weight."""

    layer_idx: int
    name: str
    config: PruneConfig
    module: nn.Linear
    stats: ChannelStats | None = None


def default_mask_fn(
    weight: torch.Tensor, norm: torch.Tensor | None, sparsity: float | None, ctx: TensorContext
) -> torch.Tensor:
    """Built-in select-and-prune: :func:`gradprobe.prune_` with the config's scope / structure."""
    if ctx.config.structure is not None:
        return prune_(weight, None, norm=norm, structure=ctx.config.structure)
    return prune_(weight, sparsity, norm=norm, scope=ctx.config.scope)


def resolve_sparsity(
    config: PruneConfig, names: list[tuple[int, str]], num_layers: int
) -> dict[tuple[int, str], float | None]:
    """Target sparsity of every (layer index, tensor name), fixed before the loop.

    lm_head has layer index ``num_layers``. A per-layer list needs ``num_layers`` entries (one more
    when lm_head is pruned); a mapping may omit layers (they stay dense). Under N:M every target is
    None. ``config.sparsity_fn(layer_idx, name, config)`` overrides all of this.
    """
    has_head = any(i == num_layers for i, _ in names)
    n_expected = num_layers + int(has_head)
    s = config.sparsity
    out: dict[tuple[int, str], float | None] = {}
    if isinstance(s, tuple) and len(s) != n_expected:
        raise ValueError(
            f"PruneConfig.sparsity has {len(s)} entries but the model has {num_layers} decoder layers"
            + (" (+1 for lm_head)" if has_head else "")
            + f"; give {n_expected}"
        )
    if isinstance(s, dict):
        bad = [k for k in s if k >= n_expected]
        if bad:
            raise ValueError(
                f"PruneConfig.sparsity has layer indices {bad} but the model has layers 0..{n_expected - 1}"
            )
    for i, name in names:
        if config.structure is not None:
            v: float | None = None
        elif config.sparsity_fn is not None:
            from gradprobe.config import _check_fraction

            v = _check_fraction(config.sparsity_fn(i, name, config), f"sparsity_fn({i}, {name!r})")
        elif isinstance(s, tuple):
            v = s[i]
        elif isinstance(s, dict):
            v = s.get(i, 0.0)
        else:
            v = s
        out[(i, name)] = v
    return out


# --------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------
def _row(
    i: int, name: str, w: torch.Tensor, mask: torch.Tensor, target: float | None, secs: float
) -> TensorRow:
    return TensorRow(
        layer=i,
        name=name,
        shape=(int(w.shape[0]), int(w.shape[1])),
        numel=w.numel(),
        pruned=int(mask.sum()),
        target=target,
        seconds=secs,
    )


def restored_note(layers: list[int]) -> str:
    """``"restored 0-3, 5"``: the layers taken from the resume checkpoint, as ranges (progress bar text)."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return "restored " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class LayerwisePruner:
    """One pruning run. Build with the model, validated config and (for Wanda) calibration ids.

    All validation happens in ``__init__``; :meth:`run` is the only method that modifies the model.
    With a ``layer_provider`` (:class:`LayerProvider`) the model may live on the meta device: the loop
    asks the provider for each layer's weights and hands them back once the layer is checkpointed.
    """

    def __init__(
        self,
        model: nn.Module,
        config: PruneConfig,
        batches: torch.Tensor | None,
        resume_dir: str | os.PathLike | None = None,
        callback: Callable[[int, list[TensorRow]], None] | None = None,
        layer_provider: LayerProvider | None = None,
    ):
        self.model, self.config, self.callback = model, config, callback
        self.provider = layer_provider
        self.adapter = get_adapter(model)
        self.layers = self.adapter.decoder_layers(model)
        self.num_layers = len(self.layers)
        if self.num_layers == 0:
            raise ValueError("the model has no decoder layers to prune")
        self.groups: dict[int, dict[str, nn.Linear]] = {
            i: self.adapter.prunable_linears(layer) for i, layer in enumerate(self.layers)
        }
        if config.include_lm_head:
            head = self.adapter.lm_head(model)
            if head is None:
                raise ValueError("PruneConfig.include_lm_head=True but the model has no lm_head")
            if self.adapter.lm_head_tied(model):
                raise ValueError(
                    "PruneConfig.include_lm_head=True but lm_head is tied to the input embeddings "
                    "(pruning it would prune embed_tokens too); untie it or leave include_lm_head=False"
                )
            self.groups[self.num_layers] = {LM_HEAD: head}
        names = [(i, n) for i, g in self.groups.items() for n in g]
        self.targets = resolve_sparsity(config, names, self.num_layers)
        if config.nm is not None:
            m = config.nm[1]
            for (i, n), lin in ((k, self.groups[k[0]][k[1]]) for k in names):
                if lin.in_features % m:
                    raise ValueError(
                        f"structure={config.structure!r} needs in_features divisible by {m}; "
                        f"layer {i} {n} has in_features={lin.in_features}"
                    )
        if config.scope == "global" and config.mask_fn is not None:
            raise ValueError("PruneConfig.mask_fn is per tensor and cannot be combined with scope='global'")
        self.wanda = config.needs_calibration
        if self.wanda:
            if batches is None:
                raise ValueError(
                    f"method={config.method!r} needs calibration batches (int64 (nsamples, seqlen)) or a tokenizer"
                )
            batches = check_batches(batches, getattr(model.config, "vocab_size", None))
        self.batches = batches if self.wanda else None
        self.mask_fn = config.mask_fn or default_mask_fn
        self.hessian = config.method == "sparsegpt"
        if self.hessian and distributed.active():
            raise ValueError(
                "method='sparsegpt' is not supported with several processes (torch.distributed): its "
                "in_features^2 Hessian sum depends on the summation order, so masks would differ between "
                "world sizes; run it in one process"
            )
        if self.hessian and config.mask_fn is None:
            from gradprobe.sparsegpt import SparseGPTMaskFn

            self.mask_fn = SparseGPTMaskFn()
        self.resume = None
        if resume_dir is not None:
            identity = {
                "version": STATE_VERSION,
                "config": config.fingerprint(),
                "model_type": model.config.model_type,
                "num_layers": self.num_layers,
                "shapes": {
                    f"{i}.{n}": list(lin.weight.shape) for i, g in self.groups.items() for n, lin in g.items()
                },
                "batches_sha256": batches_digest(self.batches),
            }
            if layer_provider is not None:  # weights are loaded dense from the source on every materialize
                identity["source"] = layer_provider.fingerprint
            checksums = {
                f"{i}.{n}": sample_checksum(lin.weight)
                for i, g in self.groups.items()
                for n, lin in g.items()
                if layer_provider is None
            }
            self.resume = ResumeState(resume_dir, identity, checksums)
            if layer_provider is None:
                self.resume.check_model(self.groups)

    # -- helpers --------------------------------------------------------------------------------
    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="layer", disable=not self.config.progress)

    def _prune_group(
        self, i: int, norms: dict[str, torch.Tensor] | None, stats: dict[str, ChannelStats] | None
    ) -> list[TensorRow]:
        rows, masks = [], []
        for name, lin in self.groups[i].items():
            target = self.targets[(i, name)]
            norm = None if norms is None else norms[name].to(lin.weight.device)
            ctx = TensorContext(
                layer_idx=i,
                name=name,
                config=self.config,
                module=lin,
                stats=None if stats is None else stats[name],
            )
            t0 = time.perf_counter()
            mask = self.mask_fn(lin.weight.data, norm, target, ctx)
            rows.append(_row(i, name, lin.weight, mask, target, time.perf_counter() - t0))
            if distributed.active():
                masks.append(mask)
        distributed.agree(f"masks of layer {i}", distributed.masks_digest(masks))  # before anything is written
        return rows

    def _materialize(self, i: int) -> None:
        if self.provider is not None:
            self.provider.materialize(i)

    def _release(self, i: int) -> None:
        if self.provider is not None:
            self.provider.release(i)

    def _restore(self, i: int) -> None:
        saved = self.resume.tensors("layer", i)
        for name, lin in self.groups[i].items():
            lin.weight.data.copy_(saved[name].to(lin.weight.device, lin.weight.dtype))

    def _finish_layer(
        self,
        i: int,
        rows: list[TensorRow],
        secs: float,
        kind: str = "layer",
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if self.resume is not None:
            if tensors is None:
                tensors = {n: lin.weight for n, lin in self.groups[i].items()}
            self.resume.mark(kind, i, tensors, rows, secs)
        if self.callback is not None:
            self.callback(i, rows)

    # -- main -----------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> PruneReport:
        t_start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        rows: list[TensorRow] = []
        layer_seconds: dict[int, float] = {}
        resumed: list[int] = []
        try:
            with distributed.guard():  # an error on one rank stops every rank
                if self.config.scope == "global":
                    rows = self._run_global(layer_seconds, resumed)
                else:
                    rows = self._run_sequential(layer_seconds, resumed)
                distributed.barrier()
        finally:
            self.model.train(was_training)
        n, L = tuple(self.batches.shape) if self.batches is not None else (0, 0)
        return PruneReport(
            rows=rows,
            config=self.config,
            layer_seconds=layer_seconds,
            nsamples=n,
            seqlen=L,
            seconds=time.perf_counter() - t_start,
            model_type=self.model.config.model_type,
            resumed_layers=resumed,
        )

    def _run_sequential(self, layer_seconds: dict[int, float], resumed: list[int]) -> list[TensorRow]:
        dev = torch.device(self.config.device)
        rows: list[TensorRow] = []
        calib = None
        if self.wanda:
            self._materialize(EMBEDDINGS)
            calib = capture_calibration(self.model, self.batches, self.config, self.adapter)
            self._release(EMBEDDINGS)
        inps = calib.inputs if calib is not None else None
        outs = torch.empty_like(inps) if inps is not None else None
        bar = self._progress(
            len(self.groups), f"{self.config.method} {self.config.structure or self.config.scope}"
        )
        for i, layer in enumerate(self.layers):
            t0 = time.perf_counter()
            self._materialize(i)
            done = self.resume is not None and distributed.all_true(self.resume.finished(i))
            with on_device(layer, dev):
                if done:
                    self._restore(i)
                    layer_rows = self.resume.rows(i)
                else:
                    norms = stats = None
                    if calib is not None:
                        st = calib.layer_stats(layer, i, self.groups[i], inps, hessian=self.hessian)
                        norms, stats = st.norms(), st.stats
                    layer_rows = self._prune_group(i, norms, stats)
                if calib is not None:
                    calib.run_layer(layer, i, inps, outs)  # outputs of the pruned layer feed layer i + 1
            if calib is not None:
                inps, outs = outs, inps
            rows += layer_rows
            if done:
                resumed.append(i)
                bar.set_postfix_str(restored_note(resumed), refresh=False)
                layer_seconds[i] = self.resume.seconds(i)
            else:
                layer_seconds[i] = time.perf_counter() - t0
                self._finish_layer(i, layer_rows, layer_seconds[i])
            self._release(i)
            bar.update(1)
        if self.num_layers in self.groups:  # lm_head
            i = self.num_layers
            t0 = time.perf_counter()
            self._materialize(i)
            if self.resume is not None and distributed.all_true(self.resume.finished(i)):
                self._restore(i)
                rows += self.resume.rows(i)
                resumed.append(i)
                bar.set_postfix_str(restored_note(resumed), refresh=False)
                layer_seconds[i] = self.resume.seconds(i)
            else:
                stats = calib.head_stats(inps, hessian=self.hessian) if calib is not None else None
                norms = None if stats is None else {k: s.norm() for k, s in stats.items()}
                head_rows = self._prune_group(i, norms, stats)
                rows += head_rows
                layer_seconds[i] = time.perf_counter() - t0
                self._finish_layer(i, head_rows, layer_seconds[i])
            self._release(i)
            bar.update(1)
        bar.close()
        return rows

    def _run_global(self, layer_seconds: dict[int, float], resumed: list[int]) -> list[TensorRow]:
        from gradprobe.pipeline.global_scope import run_global

        return run_global(self, layer_seconds, resumed)
