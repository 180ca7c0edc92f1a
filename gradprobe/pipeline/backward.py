"""Streamed forward/backward through decoder layers: the autograd graph of one layer at a time.

A gradient of a loss at the top of the model (the causal-LM loss after lm_head) with respect to the
weights of the decoder layers normally keeps the whole model's autograd graph alive (every layer's
saved activations) and needs every layer on the device. :class:`StreamedBackward` splits it:

1. forward, no grad: ``h_{j+1} = layer_j(h_j)`` for ``j = start .. stop-1``, keeping only the
   boundary activations ``h_j`` (batch, seqlen, hidden) — each layer visits the device once;
2. the head: ``loss = head_loss(h_stop)`` with ``h_stop`` a leaf that requires grad; ``loss.backward()``
   gives ``dL/dh_stop`` (only the head's graph is alive);
3. backward, ``j = stop-1 .. start``: move layer j to the device, recompute ``out = layer_j(h_j)`` from
   its stored input (a leaf requiring grad, except at ``start``), ``out.backward(dL/dh_{j+1})``; the
   weights' gradients arrive in their ``.grad`` / post-accumulate-grad hooks as in a whole-model
   backward, and ``h_j.grad`` is the next ``dL/dh_j``.

The recomputation runs exactly the ops (and kwargs) of the forward, and each layer's backward graph is
the whole-model graph's sub-graph of that layer, so on a deterministic device (the CPU) every gradient
equals the whole-model ``loss.backward()`` bit for bit (tests/test_probe_stream.py). Peak memory: one
layer's weights and autograd graph, the boundary activations of one batch (``stop - start + 1`` tensors
of (batch, seqlen, hidden)) and the head (final norm, lm_head, the logits and their gradient).
Costs one extra forward per layer (the recomputation), as activation checkpointing does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

LayerFn = Callable[[int, torch.Tensor], torch.Tensor]


class StreamedBackward:
    """Gradients of a head loss through decoder layers ``start .. stop-1``, one layer's graph at a time.

    Args:
        run_layer: ``run_layer(j, h)`` -> decoder layer j's output for its input ``h``
            (batch, seqlen, hidden), with the model's own forward kwargs; called with layer j on the device.
        place: ``place(j)`` -> a context manager that holds layer j on the compute device (default: none).
        place_head: ``place_head()`` -> a context manager that holds the head (final norm, lm_head) there.
        store: device for the boundary activations between the forward and the backward (default: where
            they are computed). ``"cpu"`` keeps them on the host (a device transfer per layer and batch).

    Attributes:
        recomputing: True while the backward recomputes a layer's forward (forward hooks that collect
            statistics check it, so every token is counted once).
    """

    def __init__(self, run_layer: LayerFn, place: Callable[[int], contextlib.AbstractContextManager] | None = None,
                 place_head: Callable[[], contextlib.AbstractContextManager] | None = None,
                 store: torch.device | str | None = None):
        self.run_layer = run_layer
        self.place = place if place is not None else (lambda j: contextlib.nullcontext())
        self.place_head = place_head if place_head is not None else contextlib.nullcontext
        self.store = None if store is None else torch.device(store)
        self.recomputing = False

    def forward(self, hidden: torch.Tensor, start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """No-grad forward of layers ``start .. stop-1``; returns (their inputs, the last output)."""
        inputs = []
        h = hidden
        with torch.no_grad():
            for j in range(start, stop):
                inputs.append(h if self.store is None else h.to(self.store))
                with self.place(j):
                    h = self.run_layer(j, h)
        return inputs, h

    def __call__(self, hidden: torch.Tensor, start: int, stop: int,
                 head_loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Backward of ``head_loss(layers start..stop-1 (hidden))`` into the layers' weights.

        Args:
            hidden: (batch, seqlen, hidden) input of layer ``start`` (no grad), on the compute device.
            head_loss: ``head_loss(h)`` -> 0-dim loss of the last layer's output ``h``.

        Returns:
            the loss, detached. The weights that require grad get their gradients (hooks / ``.grad``)
            exactly as from the whole graph's ``loss.backward()``; ``hidden`` gets none.
        """
        device = hidden.device
        inputs, top = self.forward(hidden, start, stop)
        top = top.detach().requires_grad_(True)
        with self.place_head(), torch.enable_grad():
            loss = head_loss(top)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("loss must return a scalar (0-dim) tensor")
            loss.backward()
        grad = top.grad
        del top
        for j in reversed(range(start, stop)):
            x = inputs.pop().to(device).detach()
            if j > start:  # the first layer's input needs no gradient (as in the whole graph)
                x.requires_grad_(True)
            with self.place(j), torch.enable_grad():
                self.recomputing = True
                try:
                    out = self.run_layer(j, x)
                finally:
                    self.recomputing = False
                out.backward(grad)
            del out
            grad = x.grad if j > start else None
            del x
        return loss.detach()


@contextlib.contextmanager
def held_on(device: torch.device, *modules: nn.Module | None) -> Iterator[None]:
    """Hold ``modules`` on ``device`` for the block, each moved back to where it was afterwards (also on
    error); a module already there is left alone (nested holds are free)."""
    moved = []
    try:
        for m in modules:
            if m is None:
                continue
            p = next(m.parameters(), None)
            if p is None or p.device == device:
                continue
            moved.append((m, p.device))
            m.to(device)
        yield
    finally:
        for m, home in reversed(moved):
            m.to(home)
