"""The calibration engine: the only code that walks decoder layers over calibration windows.

* :func:`capture_calibration` embeds the windows once: the inputs of decoder layer 0,
  (nsamples, seqlen, hidden) in the model's dtype on the run's device.
* :meth:`Calibration.run_layer` runs one decoder layer over every window (dense statistics pass or
  pruned propagation) with the forward kwargs (position embeddings, causal mask) built once per
  (attention kind, batch size) and reused by every layer of that kind.
* :meth:`Calibration.layer_stats` collects the input statistics of a layer's linears
  (:mod:`gradprobe.stats` is the only collector); :meth:`Calibration.head_stats` those of lm_head.
* :func:`on_device` holds one layer on the device while it runs.
* :class:`LayerProvider` supplies weights group by group when the model is not all in memory.

Under ``torch.distributed`` each rank embeds and propagates only its contiguous share of the windows
(:func:`gradprobe.distributed.sample_range`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from gradprobe import distributed
from gradprobe.config import PruneConfig
from gradprobe.models import ModelAdapter, get_adapter
from gradprobe.stats import ChannelStats, HessianStats, LayerStats

LM_HEAD = "lm_head"


# --------------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Inputs of decoder layer 0 for all calibration windows, and the per-layer forward kwargs.

    Attributes:
        inputs: (nsamples, seqlen, hidden) in the model's dtype, on ``config.device``.
    """

    model: nn.Module
    adapter: ModelAdapter
    inputs: torch.Tensor
    batch_size: int
    _kwargs: dict[tuple[Any, int], dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def nsamples(self) -> int:
        return self.inputs.shape[0]

    @property
    def seqlen(self) -> int:
        return self.inputs.shape[1]

    def kwargs_for(self, layer_idx: int, bsz: int) -> dict[str, Any]:
        """Forward kwargs of decoder layer ``layer_idx`` for a batch of ``bsz`` windows (cached; layers
        with the same :meth:`ModelAdapter.kwargs_key` share one build, as the model's own forward does)."""
        key = (self.adapter.kwargs_key(self.model, layer_idx), bsz)
        if key not in self._kwargs:
            self._kwargs[key] = self.adapter.layer_forward_kwargs(
                self.model, self.inputs[:bsz], None, None, layer_idx=layer_idx
            )
        return self._kwargs[key]

    def run_layer(
        self, layer: nn.Module, layer_idx: int, src: torch.Tensor, dst: torch.Tensor | None
    ) -> None:
        """dst[b] = layer(src[b]) for every batch of windows; ``dst=None`` discards outputs."""
        for b0 in range(0, src.shape[0], self.batch_size):
            x = src[b0 : b0 + self.batch_size]
            out = self.adapter.layer_output(layer(x, **self.kwargs_for(layer_idx, x.shape[0])))
            if dst is not None:
                dst[b0 : b0 + x.shape[0]].copy_(out)

    def layer_stats(
        self,
        layer: nn.Module,
        layer_idx: int,
        linears: dict[str, nn.Linear],
        src: torch.Tensor,
        dst: torch.Tensor | None = None,
        *,
        hessian: bool = False,
    ) -> LayerStats:
        """Run ``layer`` over ``src`` (outputs into ``dst`` unless None) collecting the fp32 input
        statistics of ``linears`` (and their Hessians when ``hessian``), reduced across ranks."""
        with LayerStats(linears, hessian=hessian) as st:
            self.run_layer(layer, layer_idx, src, dst)
        return st

    def head_stats(self, hidden: torch.Tensor, *, hessian: bool = False) -> dict[str, ChannelStats]:
        """lm_head input statistics = final_norm(last decoder layer output ``hidden`` (n, L, H)),
        without running lm_head itself (vocab-wide); the final norm visits ``hidden``'s device."""
        fnorm = self.adapter.final_norm(self.model)
        st = ChannelStats(hidden.shape[-1], hidden.device)
        if hessian:
            st.hessian = HessianStats(hidden.shape[-1], hidden.device)
        with on_device(fnorm, hidden.device):
            for b0 in range(0, hidden.shape[0], self.batch_size):
                x = fnorm(hidden[b0 : b0 + self.batch_size])
                st.add(x)
                if st.hessian is not None:
                    st.hessian.add(x)
        st.all_reduce()
        return {LM_HEAD: st}


def check_batches(batches: Any, vocab_size: int | None) -> torch.Tensor:
    """Validate calibration token ids: an integer tensor (nsamples, seqlen), non-empty, ids in range."""
    if not isinstance(batches, torch.Tensor):
        raise TypeError(
            f"calibration batches must be an int64 tensor (nsamples, seqlen) or a tokenizer, got {type(batches).__name__}"
        )
    if batches.dtype.is_floating_point or batches.dtype.is_complex or batches.dtype == torch.bool:
        raise TypeError(f"calibration batches must hold integer token ids (int64), got {batches.dtype}")
    if batches.dim() != 2:
        raise ValueError(
            f"calibration batches must be 2-D (nsamples, seqlen), got shape {tuple(batches.shape)}"
        )
    if batches.numel() == 0:
        raise ValueError(
            f"calibration batches are empty (shape {tuple(batches.shape)}); give at least one window of >= 1 token"
        )
    check_token_ids(batches, vocab_size, "calibration token ids")
    return batches.to(torch.int64)


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, name: str = "token ids") -> None:
    """ValueError naming ``name`` unless every id of the integer tensor ``ids`` is in [0, vocab_size)
    (an out-of-range id would otherwise surface as a bare IndexError inside the embedding)."""
    if ids.numel() == 0 or ids.device.type == "meta":
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise ValueError(f"{name} must be in [0, vocab_size={vocab_size}), got range [{lo}, {hi}]")


@torch.no_grad()
def capture_calibration(
    model: nn.Module, batches: torch.Tensor, config: PruneConfig, adapter: ModelAdapter | None = None
) -> Calibration:
    """Embed ``batches`` (nsamples, seqlen) int64 into the layer-0 inputs on ``config.device``.

    Only the embedding runs (on its own device); the result is (nsamples, seqlen, hidden) in the
    embedding's dtype. Under ``torch.distributed`` only this rank's samples
    (:func:`gradprobe.distributed.sample_range`) are embedded: nsamples is then the local count.
    """
    batches = distributed.local_slice(batches)
    adapter = adapter or get_adapter(model)
    embed = adapter.embed(model)
    dev = torch.device(config.device)
    n, seqlen = batches.shape
    inputs = torch.empty((n, seqlen, embed.embedding_dim), dtype=embed.weight.dtype, device=dev)
    for b0 in range(0, n, config.batch_size):
        ids = batches[b0 : b0 + config.batch_size].to(embed.weight.device)
        inputs[b0 : b0 + ids.shape[0]].copy_(embed(ids))
    return Calibration(model=model, adapter=adapter, inputs=inputs, batch_size=config.batch_size)




@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` for the block and back to where it was (its first parameter's
    device) afterwards, also on error."""
    orig = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(orig)


EMBEDDINGS = -1  # LayerProvider group of the input embeddings (needed only by the calibration capture)


class LayerProvider(Protocol):
    """Supplies weights on demand, so the whole model need not be in memory (:mod:`gradprobe.stream`).

    The model given to :class:`LayerwisePruner` may then hold its decoder layers, lm_head and input
    embeddings on the meta device. Group ``i`` is decoder layer ``i`` for ``0 <= i < num_layers``,
    lm_head for ``i == num_layers`` (only when pruned) and the input embeddings for
    ``i == EMBEDDINGS`` (only around the calibration capture). The driver calls ``materialize(i)``
    before it touches group ``i`` (its dense weights must then be real CPU tensors) and ``release(i)``
    once the group is finished and its pruned weights are in the resume checkpoint.
    ``fingerprint`` identifies the source weights in the resume identity (it replaces the dense
    weights' checksums, which would need every weight in memory).
    """

    fingerprint: str

    def materialize(self, i: int) -> None: ...

    def release(self, i: int) -> None: ...




def dense_norm_pass(
    calib: Calibration,
    layers: Sequence[nn.Module],
    linears: Callable[[int], dict[str, nn.Linear]],
    device: torch.device | str,
    *,
    restored: Callable[[int], dict[str, torch.Tensor] | None] = lambda i: None,
    materialize: Callable[[int], None] = lambda i: None,
    release: Callable[[int], None] = lambda i: None,
) -> Iterator[tuple[int, dict[str, torch.Tensor], bool, torch.Tensor]]:
    """One walk over the *dense* model: for each decoder layer ``i`` in turn (held on ``device``; its
    weights supplied by ``materialize(i)`` / dropped by ``release(i)`` when streamed), yields
    ``(i, norms, was_restored, hidden)``: {name: fp32 (in_features,) CPU input norm} of ``linears(i)``
    over the calibration windows, or ``restored(i)`` when a checkpoint has them (the layer then only
    runs), and the layer's dense outputs (n, seqlen, hidden), which feed layer ``i + 1`` (the last
    one: the input of the final norm)."""
    inps, outs = calib.inputs, torch.empty_like(calib.inputs)
    for i, layer in enumerate(layers):
        saved = restored(i)
        materialize(i)
        with on_device(layer, device):
            if saved is not None:
                calib.run_layer(layer, i, inps, outs)
                norms = saved
            else:
                st = calib.layer_stats(layer, i, linears(i), inps, outs)
                norms = {k: v.cpu() for k, v in st.norms().items()}
        release(i)
        inps, outs = outs, inps
        yield i, norms, saved is not None, inps


@torch.no_grad()
def dense_norms(
    model: nn.Module, batches: torch.Tensor, config: PruneConfig | None = None
) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, name) -> fp32 (in_features,) input norms of every prunable linear of the *dense* model, CPU.

    Calibration ``batches`` (nsamples, seqlen) int64 flow through the unpruned layers (OWL's first
    pass); ``config`` gives the device and batch size (default ``PruneConfig()``).
    """
    from tqdm.auto import tqdm

    config = config or PruneConfig(progress=False)
    ad = get_adapter(model)
    batches = check_batches(batches, getattr(model.config, "vocab_size", None))
    calib = capture_calibration(model, batches, config, ad)
    layers = ad.decoder_layers(model)
    out: dict[tuple[int, str], torch.Tensor] = {}
    walk = dense_norm_pass(calib, layers, lambda i: ad.prunable_linears(layers[i]), config.device)
    for i, norms, _, _ in tqdm(walk, total=len(layers), desc="dense norms", unit="layer", disable=not config.progress):
        for name, v in norms.items():
            out[(i, name)] = v
    return out
