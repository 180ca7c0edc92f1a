"""2:4 packing: dense 2:4-sparse weights <-> the CUTLASS layout or the compressed-tensors bitmask layout.

:func:`pack_24` / :func:`unpack_24` validate, then run ``torch.ops.gradprobe.pack_24_*`` /
``unpack_24_*`` (schemas and layouts: ``gradprobe/ops/_schemas.py``). The backend registry picks the
implementation by device (``gradprobe/_backend.py``): the compiled ``cpp`` backend — C++ on CPU, the
CUDA kernels of ``csrc/pack_24.cu`` on CUDA when the extension was built with CUDA — else the
plain-PyTorch reference.
"""

from __future__ import annotations

import torch

FORMATS = ("cutlass", "bitmask")


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def _check_same_device(tensors: dict[str, torch.Tensor]) -> None:
    """All named tensors on one device (a meta tensor beside a real one would yield uninitialised output)."""
    first, *rest = tensors.items()
    for name, t in rest:
        if t.device != first[1].device:
            raise ValueError(
                f"{name} is on {t.device} but {first[0]} is on {first[1].device}; move both to one device"
            )


def _check_tensor(value, name: str, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(value).__name__}")


def pack_24(weight: torch.Tensor, format: str = "cutlass", *, scores: torch.Tensor | None = None) -> tuple:
    """Pack a 2:4-sparse weight (or a dense one plus scores) into a storage layout.

    Args:
        weight: (rows, cols) float16 / bfloat16 / float32. Not modified. Without ``scores`` it must be
            2:4 sparse (at most 2 nonzeros in every 4 consecutive elements of a row; for
            ``format="cutlass"`` and float32, at most 1 in every 2 — the tf32 1:2 layout); the first
            group with more raises ValueError naming it.
        format: ``"cutlass"``: the layout of torch's ``SparseSemiStructuredTensorCUTLASS``, bit for bit
            ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``
            (rows % 32 == 0; cols % 32 == 0 for fp16/bf16, % 16 for fp32).
            ``"bitmask"``: compressed-tensors ``sparse-24-bitmask`` (cols % 4 == 0).
        scores: optional (rows, cols) float32: the 2 smallest scores of every group of 4 are pruned
            first (ties: lower index), in the same pass — ``pack_24(w, scores=s)`` equals
            ``pack_24(w.masked_fill(mask, 0))`` for that 2:4 mask. Not for float32 CUTLASS.

    Returns:
        ``"cutlass"``: ``(packed, meta)``: packed (rows, cols/2) in weight's dtype, meta int16 of shape
        (rows, cols/16) (fp16/bf16) or (rows, cols/8) (fp32).
        ``"bitmask"``: ``(values, bitmask, shape)``: values (rows, cols/2) in weight's dtype (kept values,
        row-major), bitmask (rows, ceil(cols/8)) uint8 packed least-significant bit first, shape
        ``[rows, cols]`` (a list, as ``Sparse24BitMaskTensor`` stores it).
    """
    _check_format(format)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape (rows, cols), got {type(weight).__name__}")
    if scores is not None and not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a float32 tensor of weight's shape or None, got {type(scores).__name__}")
    if scores is not None:
        _check_same_device({"weight": weight, "scores": scores})
    w = weight.contiguous()
    s = None if scores is None else scores.contiguous()
    if format == "cutlass":
        return tuple(torch.ops.gradprobe.pack_24_cutlass(w, s))
    values, bitmask = torch.ops.gradprobe.pack_24_bitmask(w, s)
    return values, bitmask, [int(w.shape[0]), int(w.shape[1])]


def _check_shape(shape) -> list[int]:
    """``[rows, cols]`` as a list, tuple, torch.Size or integer tensor -> list of two ints."""
    if isinstance(shape, torch.Tensor):
        if shape.dtype.is_floating_point or shape.dtype.is_complex or shape.device.type == "meta":
            raise TypeError(f"shape must be [rows, cols] of ints, got a {shape.dtype} tensor on {shape.device}")
        shape = shape.flatten().tolist()
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (list, tuple)):
        raise TypeError(f"shape must be [rows, cols] (a list of two ints, as pack_24 returns), got {shape!r}")
    if any(isinstance(x, bool) or not hasattr(type(x), "__index__") for x in shape):
        raise TypeError(f"shape must be [rows, cols] of ints, got {shape!r}")
    return [int(x) for x in shape]


def unpack_24(*parts, format: str | None = None) -> torch.Tensor:
    """Restore the dense weight from :func:`pack_24`'s output, exactly (``-0.0`` may come back as ``0.0``).

    Args:
        parts: ``packed, meta`` (CUTLASS) or ``values, bitmask, shape`` (bitmask), or the tuple
            :func:`pack_24` returned as a single argument.
        format: ``"cutlass"`` / ``"bitmask"``; None infers it from the number of parts (2 or 3).

    Returns:
        (rows, cols) dense tensor in the packed values' dtype, zeros where nothing was kept.
    """
    if len(parts) == 1 and isinstance(parts[0], (tuple, list)):
        parts = tuple(parts[0])
    if format is None:
        if len(parts) not in (2, 3):
            raise ValueError(
                f"unpack_24 takes (packed, meta) or (values, bitmask, shape), got {len(parts)} arguments"
            )
        format = "cutlass" if len(parts) == 2 else "bitmask"
    _check_format(format)
    if format == "cutlass":
        if len(parts) != 2:
            raise ValueError(f'unpack_24(format="cutlass") takes (packed, meta), got {len(parts)} arguments')
        packed, meta = parts
        _check_tensor(packed, "packed", "pack_24's first output, (rows, cols/2)")
        _check_tensor(meta, "meta", "pack_24's int16 metadata")
        _check_same_device({"packed": packed, "meta": meta})
        return torch.ops.gradprobe.unpack_24_cutlass(packed, meta)
    if len(parts) != 3:
        raise ValueError(f'unpack_24(format="bitmask") takes (values, bitmask, shape), got {len(parts)} arguments')
    values, bitmask, shape = parts
    _check_tensor(values, "values", "pack_24's kept values, (rows, cols/2)")
    _check_tensor(bitmask, "bitmask", "pack_24's uint8 bitmask, (rows, ceil(cols/8))")
    _check_same_device({"values": values, "bitmask": bitmask})
    shape = _check_shape(shape)
    if len(shape) != 2 or values.dim() != 2 or shape[0] != values.shape[0]:
        raise ValueError(
            f"unpack_24(bitmask): shape must be [rows, cols] with rows = values.shape[0] = "
            f"{values.shape[0] if values.dim() else '?'}, got {shape}"
        )
    return torch.ops.gradprobe.unpack_24_bitmask(values, bitmask, shape[1])
