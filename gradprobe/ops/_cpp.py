"""Registers the compiled backend: each ``gradprobe::op`` that ``gradprobe._C`` implements as
``gradprobe_cpp::op`` (same schema) becomes the ``cpp`` backend of that op, for the device types the
extension registered kernels for (CPU always; CUDA for the ops of ``csrc/*.cu`` when built with CUDA)."""

from __future__ import annotations

import torch

from gradprobe import _extension
from gradprobe._backend import impl
from gradprobe.ops._schemas import SCHEMAS

_extension.load()  # ImportError here marks the cpp backend unavailable, with the reason

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

for _op in SCHEMAS:
    if hasattr(torch.ops.gradprobe_cpp, _op):
        _devices = tuple(d for d, key in _DISPATCH_KEYS.items()
                         if torch._C._dispatch_has_kernel_for_dispatch_key(f"gradprobe_cpp::{_op}", key))
        impl(_op, "cpp", devices=_devices)(getattr(torch.ops.gradprobe_cpp, _op))
