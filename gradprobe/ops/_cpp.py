"""Registers the C++ CPU backend: each ``gradprobe::op`` that ``gradprobe._C`` implements as
``gradprobe_cpp::op`` (same schema, CPU tensors) becomes the ``cpp`` backend of that op."""

from __future__ import annotations

import torch

from gradprobe import _extension
from gradprobe._backend import impl
from gradprobe.ops._schemas import SCHEMAS

_extension.load()  # ImportError here marks the cpp backend unavailable, with the reason

for _op in SCHEMAS:
    if hasattr(torch.ops.gradprobe_cpp, _op):
        impl(_op, "cpp")(getattr(torch.ops.gradprobe_cpp, _op))
