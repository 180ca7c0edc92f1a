"""Shared test helpers: devices, backend parameters, verbose mask asserts, weight factories and
op-registration skips."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from gradprobe import _backend, _extension

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_id(d: torch.dtype) -> str:
    return f"dtype={DTYPE_IDS.get(d, str(d))}"


def get_available_devices() -> list[str]:
    """'cpu' always, plus 'cuda' when present; GRADPROBE_TEST_DEVICE=cpu|cuda restricts to one."""
    forced = os.environ.get("GRADPROBE_TEST_DEVICE")
    if forced:
        return [forced]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_cpp = pytest.mark.skipif(not _extension.available(), reason="gradprobe._C not built")


def _backend_skip(backend: str, device: str, cpp_cuda_op: str | None = None) -> str | None:
    if backend == "cpp":
        if device == "cuda" and cpp_cuda_op is not None:
            if not (_extension.available() and torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"gradprobe_cpp::{cpp_cuda_op}", "CUDA")):
                return "gradprobe._C was built without its CUDA kernels (torch without CUDA or no nvcc at install)"
            return None
        if device != "cpu":
            return "C++ backend is CPU only"
        if not _extension.available():
            if os.environ.get("GRADPROBE_REQUIRE_CPP") == "1":
                return None  # let the test fail loudly: CI must have built gradprobe._C
            return f"gradprobe._C not built: {_extension.diagnosis()}"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton not installed"
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton on CPU needs TRITON_INTERPRET=1"
    return None


def backend_params(backends=("reference", "cpp", "triton"), cpp_cuda_op: str | None = None) -> list:
    """pytest params (backend, device) for every backend x available device it can run on.

    ``cpp_cuda_op``: an op that ``gradprobe._C`` also implements for CUDA (the 2:4 packer); with it,
    the cpp backend is tested on CUDA too (skipped, with the reason, where the extension has no CUDA kernel).
    """
    params = []
    for device in get_available_devices():
        for b in backends:
            if b == "cpp" and device != "cpu" and cpp_cuda_op is None:
                continue
            reason = _backend_skip(b, device, cpp_cuda_op)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            if device == "cuda":
                marks.append(pytest.mark.gpu)
            params.append(pytest.param(b, device, id=f"{b}-{device}", marks=marks))
    return params


def is_interpreted(backend: str, device: str) -> bool:
    """True when this backend runs under the (slow) Triton interpreter: keep shapes small."""
    return backend == "triton" and device == "cpu"


def make_weight(shape, dtype=torch.float32, kind="randn", device="cpu", levels=7) -> torch.Tensor:
    """Test weights. kind: randn | ties (few distinct values) | const | zeros | signed_zero."""
    if kind == "randn":
        w = torch.randn(shape)
    elif kind == "ties":
        w = torch.randint(-levels, levels + 1, shape).float() * 0.125
    elif kind == "const":
        w = torch.full(shape, 0.5)
    elif kind == "zeros":
        w = torch.zeros(shape)
    elif kind == "signed_zero":
        w = torch.where(torch.rand(shape) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    else:
        raise ValueError(kind)
    return w.to(dtype=dtype, device=device)


def make_norm(n: int, kind="rand", device="cpu") -> torch.Tensor:
    if kind == "rand":
        return (torch.rand(n) * 3).to(device)
    if kind == "ties":
        return torch.randint(0, 4, (n,)).float().to(device)
    raise ValueError(kind)


def assert_masks_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "mask") -> None:
    """Bit-exact mask comparison that prints the first mismatching positions."""
    assert actual.dtype == torch.bool, f"{what} dtype {actual.dtype}, expected torch.bool"
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.cpu() != expected.cpu()).nonzero()
    if diff.numel():
        first = [tuple(r) for r in diff[:10].tolist()]
        raise AssertionError(f"{what}: {diff.shape[0]} of {actual.numel()} entries differ; first at {first}")


def with_backend(backend: str):
    """Context manager forcing ``backend`` for gradprobe ops."""
    return _backend.use_backend(backend)


def require_ops(backend: str, device: str, ops) -> None:
    """Skip when ``backend`` has not registered these ops (e.g. Triton work in progress)."""
    with with_backend(backend):
        try:
            for op in ops:
                _backend.resolve(op, device)
        except _backend.BackendUnavailableError as exc:
            if "has no" not in str(exc):
                raise
            pytest.skip(str(exc))


def require_ops_fixture(ops):
    """An autouse fixture for a test module: skip (with the reason) every test whose ``backend``
    param has not registered ``ops`` yet. Use as ``_require = require_ops_fixture(("row_mask", ...))``."""

    @pytest.fixture(autouse=True)
    def _require_ops(request):
        if "backend" in request.fixturenames:
            require_ops(request.getfixturevalue("backend"), request.getfixturevalue("device"), ops)

    return _require_ops


def order_key(s: torch.Tensor) -> torch.Tensor:
    """Order-preserving uint32 key of fp32 ``s``, as int64 in [0, 2^32): x >= 0: bits | 2^31, x < 0: ~bits
    (-0.0 keyed as +0.0). The Triton selection kernels' transform (``gradprobe/kernels/_score.py``)."""
    s = torch.where(s == 0, torch.zeros_like(s), s)
    bits = s.contiguous().view(torch.int32)
    return (bits ^ ((bits >> 31) | -(2**31))).to(torch.int64) & 0xFFFFFFFF
