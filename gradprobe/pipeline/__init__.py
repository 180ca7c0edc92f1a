"""The layerwise pipeline: the only code that walks a model's decoder layers.

* :mod:`~gradprobe.pipeline.calibration` — capture layer 0's inputs, run one layer over the
  calibration windows on the device, collect the input statistics of its linears.
* :mod:`~gradprobe.pipeline.layerwise` — the pruning loop: per layer, statistics -> the method's
  selection (the plan's exact counts) -> masks in place -> propagation of the pruned outputs; resume.
* :mod:`~gradprobe.pipeline.gradients` — losses and gradients for a method that asks for them (the
  gradient probe): model / tail / one-block losses, gradient passes (streamed by
  :mod:`~gradprobe.pipeline.backward`), the layers' inputs captured and carried forward.
"""

from gradprobe.pipeline.calibration import (
    EMBEDDINGS,
    LM_HEAD,
    Calibration,
    LayerProvider,
    capture_calibration,
    check_batches,
    check_token_ids,
    dense_norms,
    on_device,
)

__all__ = [
    "EMBEDDINGS",
    "LM_HEAD",
    "Calibration",
    "LayerProvider",
    "capture_calibration",
    "check_batches",
    "check_token_ids",
    "dense_norms",
    "on_device",
]
