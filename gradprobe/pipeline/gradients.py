"""Losses and gradients through the decoder layers, for a method that asks for them (the gradient
probe): forward / backward of one batch over the whole model, from a decoder layer's cached input (the
tail) or of one block (regional loss); a gradient pass: max over batches of |dL/dW| accumulated in
hooks as the gradients arrive; and the no-grad walks that feed them (the decoder layers' inputs
captured in one pass, cached inputs carried through a run of layers), one layer on the device at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradprobe import distributed
from gradprobe.pipeline.backward import StreamedBackward, held_on


def as_device(device: torch.device | str) -> torch.device:
    """torch.device, with a bare "cuda" resolved to the current CUDA device (so it compares equal to
    where a tensor actually is)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def default_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's causal-LM loss of (logits (batch, seqlen, vocab), input_ids (batch, seqlen)) -> 0-dim."""

    def loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size)

    return loss


class GradientRunner:
    """Forward/backward over the whole model or from a layer's cached input.

    ``batches``: token ids (batch, seqlen) int64 per calibration batch; ``loss``: a user's
    ``loss(logits, ids)`` or None (the model's own causal-LM loss).
    ``home``: where the decoder layers' weights live; ``device``: where the runner computes. When they
    differ, each layer (and the embedding, the head) is held on the device only while it runs
    (:func:`gradprobe.pipeline.backward.held_on`); cached layer inputs stay on the host. With
    ``streamed`` the model-loss gradients go through :class:`StreamedBackward` (one layer's autograd
    graph at a time); without, through one graph of the whole model (or tail) on ``home``.
    """

    def __init__(self, model: nn.Module, adapter, batches: list[torch.Tensor], loss, device=None, streamed=True):
        self.model, self.adapter = model, adapter
        self.layers = adapter.decoder_layers(model)
        self.home = next(self.layers[0].parameters()).device
        self.device = self.home if device is None else as_device(device)
        self.moves = self.device != self.home
        self.streamed = streamed
        self.batches = batches
        self.user_loss = loss
        self.loss = loss if loss is not None else default_loss(model)
        self._kwargs: dict[tuple, dict] = {}
        self.passes = 0
        self.progress = False  # a bar per gradient pass (model mode: the only long loop)
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

    def capture_inputs(self, batches: Sequence[torch.Tensor], layer_ids: set[int], last: int) -> dict[int, list[torch.Tensor]]:
        """One no-grad pass of the embedding and decoder layers ``0 .. last - 1`` (each held on the device
        once, for all batches): {j: the input (batch, seqlen, hidden) of decoder layer j per batch} for
        the ``j <= last`` in ``layer_ids``, on ``home`` (the host when the layers live there). Layer
        ``last`` itself does not run; forward hooks on the layers that do see every batch."""
        store: dict[int, list[torch.Tensor]] = {}
        with torch.no_grad():
            hs = [self.embed(b) for b in batches]
            for j in range(last + 1):
                if j in layer_ids:
                    store[j] = [h.to(self.home) for h in hs]
                if j == last:
                    break
                with self.hold_layer(j):
                    hs = [self.run_layer(j, h) for h in hs]
        return store

    def propagate(self, hidden: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
        """No grad: the inputs of decoder layer ``stop`` from those of layer ``start`` (one (batch, seqlen,
        hidden) tensor per batch), each layer held on the device once for all batches; on ``home``."""
        h = hidden
        with torch.no_grad():
            for j in range(start, stop):
                with self.hold_layer(j):
                    h = [self.run_layer(j, x.to(self.device)).to(self.home) for x in h]
        return h

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
        return regional_loss(self.run_layer(j, hidden))

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
            scalar_backward(self.full_loss(ids))
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
            scalar_backward(self.tail_loss(start, hidden, self.batches[b]))

    def block_backward(self, j: int, hidden: torch.Tensor) -> None:
        """Regional mode: backward of ||layer_j(hidden)||^2 (layer j already on the device)."""
        scalar_backward(self.block_loss(j, hidden.to(self.device)))

    def grad_pass(self, params: Sequence[nn.Parameter], backward_of_batch: Callable[[int], None]) -> list[torch.Tensor]:
        """max over batches of |dL/dp| for each of ``params`` (same dtype/shape), accumulated in a hook;
        ``backward_of_batch(i)`` runs batch i's backward. With ``park`` set the running max of a tensor
        waits there between its layer's visits to the device (model mode, layers on the host)."""
        desc = "probe G0" if self.passes % 2 == 0 else "probe G1"
        out = max_abs_grads(params, backward_of_batch, len(self.batches), park=self.park,
                            progress=self.progress, desc=desc)
        self.passes += 1
        return out


def max_abs_grads(
    params: Sequence[nn.Parameter],
    backward_of_batch: Callable[[int], None],
    n_batches: int,
    *,
    park: torch.device | None = None,
    progress: bool = False,
    desc: str = "gradients",
) -> list[torch.Tensor]:
    """max over ``n_batches`` batches of |dL/dp| for each of ``params`` (each of its parameter's dtype and
    shape), reduced with MAX over the ranks; ``backward_of_batch(i)`` runs batch i's backward (with grad
    enabled). Accumulated in a post-accumulate-grad hook (``gradprobe::probe_accumulate_``), so only one
    batch's gradient of a tensor is ever alive; ``park`` = where a running max waits between batches."""
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
        acc[id(p)] = a if park is None else a.to(park)

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
    try:
        from tqdm.auto import tqdm

        for i in tqdm(range(n_batches), desc=desc, unit="batch", disable=not progress):
            with torch.enable_grad():
                backward_of_batch(i)
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.grad = None
    missing = [i for i, p in enumerate(params) if id(p) not in acc]
    if missing:
        raise RuntimeError(f"{len(missing)} probed tensors received no gradient; does the loss depend on them?")
    return [distributed.all_max_(acc[id(p)]) for p in params]  # the max over every rank's batches


def block_gradients(calib: Any, layer: nn.Module, layer_idx: int, src: torch.Tensor) -> Callable[[Sequence[nn.Parameter]], list[torch.Tensor]]:
    """The gradient callback the layerwise pipeline gives a selector that asks for one: for ``params`` of
    decoder layer ``layer_idx`` (on the device with it), the max over the calibration windows ``src``
    (n, seqlen, hidden) of |dL/dp| with the block-local loss L = ||layer(x)||_2^2 (fp32) of each window
    x alone — the probe's regional loss, from the layer's pipeline inputs. One backward per window, so
    the statistic is the same for every batch size and world size (MAX is exact in any order)."""
    n = src.shape[0]

    def backward_of_batch(b: int) -> None:
        x = src[b : b + 1]
        out = calib.adapter.layer_output(layer(x, **calib.kwargs_for(layer_idx, 1)))
        scalar_backward(regional_loss(out))

    def grads(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        flags = {id(q): q.requires_grad for q in layer.parameters()}
        wanted = {id(q) for q in params}
        try:
            for q in layer.parameters():  # only the asked-for weights get (and hold) gradients
                q.requires_grad_(id(q) in wanted)
            return max_abs_grads(params, backward_of_batch, n)
        finally:
            for q in layer.parameters():
                q.requires_grad_(flags[id(q)])

    return grads


def regional_loss(out: torch.Tensor) -> torch.Tensor:
    """The block-local loss of a decoder layer's output ``out`` (batch, seqlen, hidden): ||out||_2^2 in fp32."""
    return out.to(torch.float32).pow(2).sum()


def scalar_backward(loss: Any) -> None:
    """``loss.backward()`` of a 0-dim tensor; anything else is a ValueError (a user's ``loss``)."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("loss must return a scalar (0-dim) tensor")
    loss.backward()
