"""Sequential layerwise pruning (Wanda / magnitude) of a Hugging Face decoder-only LM.

Algorithm (as the Wanda reference, https://github.com/locuslab/wanda/blob/main/lib/prune.py):

1. :func:`capture_calibration` embeds the calibration windows once: ``inputs`` (N, L, H) in the
   model's dtype on ``config.device`` = the inputs of decoder layer 0.
2. For each decoder layer: move it to the device; run it on all windows collecting the statistics
   the method's selector needs (:mod:`gradprobe.methods`: none, fp32 per-input-channel sums of
   squares, or Hessians); the selector prunes every prunable linear in place to its target in the
   plan (:mod:`gradprobe.plan`, fixed before the loop: fractions, exact counts or N:M); re-run the
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

import torch
from torch import nn

from gradprobe import distributed
from gradprobe._checkpoint import STATE_VERSION, ResumeState, batches_digest, sample_checksum
from gradprobe.config import PruneConfig
from gradprobe.methods import selector_for
from gradprobe.models import get_adapter
from gradprobe.pipeline.calibration import (
    EMBEDDINGS,
    LM_HEAD,
    LayerProvider,
    capture_calibration,
    check_batches,
    on_device,
)
from gradprobe.pipeline.gradients import block_gradients
from gradprobe.plan import build_plan
from gradprobe.report import PruneReport, TensorRow
from gradprobe.stats import ChannelStats


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
        self.plan = build_plan(config, self.groups, self.num_layers)  # validated before anything runs
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
        self.selector = selector_for(config)
        self.gradients = bool(getattr(self.selector, "gradients", False))  # it asks for a gradient callback
        if self.gradients and (config.include_lm_head or config.scope == "global"):
            raise ValueError(
                "a gradient selector (e.g. ProbeSelector) prunes decoder layers one at a time with their block-local "
                "loss; it cannot take lm_head (include_lm_head=False) or scope='global'"
            )
        self.hessian = self.selector.needs == "hessian"
        if self.hessian and distributed.active():
            raise ValueError(
                "method='sparsegpt' is not supported with several processes (torch.distributed): its "
                "in_features^2 Hessian sum depends on the summation order, so masks would differ between "
                "world sizes; run it in one process"
            )
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
        self, i: int, stats: dict[str, ChannelStats] | None, gradients: Callable | None = None
    ) -> list[TensorRow]:
        """The selector prunes group ``i`` to the plan (``gradients``: the block-local gradient callback,
        for a selector that asks for one); the ranks agree on the masks before anything is written."""
        linears = self.groups[i]
        targets = {name: self.plan[(i, name)] for name in linears}
        t0 = time.perf_counter()
        if gradients is not None:
            masks = self.selector.select_(i, linears, stats, targets, gradients=gradients)
        else:
            masks = self.selector.select_(i, linears, stats, targets)
        secs = time.perf_counter() - t0
        total = sum(lin.weight.numel() for lin in linears.values()) or 1
        rows = [
            _row(i, name, lin.weight, masks[name], targets[name].fraction, secs * lin.weight.numel() / total)
            for name, lin in linears.items()
        ]
        if distributed.active():  # before anything is written
            distributed.agree(f"masks of layer {i}", distributed.masks_digest(list(masks.values())))
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
                    stats = grads = None
                    if calib is not None and self.selector.needs != "weights":
                        stats = calib.layer_stats(layer, i, self.groups[i], inps, hessian=self.hessian).stats
                    if self.gradients:
                        grads = block_gradients(calib, layer, i, inps)
                    layer_rows = self._prune_group(i, stats, grads)
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
                head_rows = self._prune_group(i, stats)
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
