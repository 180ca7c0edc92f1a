"""2:4 packing on every backend: bit-exact parity with torch's CUTLASS converter and with the
compressed-tensors sparse-24-bitmask compressor, exact round trips, the scores path, bad inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

import gradprobe
from gradprobe import _extension
from gradprobe.ops import reference as ref
from tests.helpers import backend_params, dtype_id, with_backend

BACKENDS = backend_params(("reference", "cpp"), cpp_cuda_op="pack_24_cutlass")  # cpp on CUDA = csrc/pack_24.cu
DTYPES16 = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CUTLASS_SHAPES = [(32, 32), (64, 96), (96, 160), (32, 4096), (32, 11008)]  # + Llama in_features
BITMASK_SHAPES = [(1, 4), (3, 12), (5, 20), (7, 36), (33, 4096), (16, 11008)]
CT_BITMASK = ("compressors", "sparse_compressors", "sparse_24_bitmask.py")


def _has_ct_bitmask() -> bool:
    """Whether the installed compressed-tensors ships the 2:4 bitmask compressor module (found on
    disk without importing the package; releases after 0.14.0, e.g. llm-compressor's pin 0.19.0, drop it)."""
    spec = importlib.util.find_spec("compressed_tensors")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(Path(loc).joinpath(*CT_BITMASK).is_file() for loc in spec.submodule_search_locations)


needs_ct = pytest.mark.skipif(
    not _has_ct_bitmask(),
    reason="compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask not available "
    "(compressed-tensors==0.14.0 ships it: pip install --no-deps compressed-tensors==0.14.0)",
)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that -0.0 != 0.0 and NaN == NaN in comparisons."""
    return t.view({2: torch.int16, 4: torch.int32, 1: torch.uint8}[t.element_size()])


def sparse_24(shape, dtype, device="cpu", awkward=True) -> torch.Tensor:
    """Random 2:4-sparse weight; the first rows hold groups with 0 and 1 nonzeros and -0.0."""
    w = torch.randn(shape)
    w = w.masked_fill(ref.nm_rank_mask(torch.rand(shape), 2, 4), 0)
    if awkward:
        special = [[0, 0, 0, 0], [0, 1.5, 0, 0], [-0.0, 0, 0, 3], [-0.0, -0.0, -0.0, -0.0], [0, 0, 2, -0.0]]
        for i, g in enumerate(special[: shape[0]]):
            w[i, :4] = torch.tensor(g)
    return w.to(dtype=dtype, device=device)


def sparse_12(shape, device="cpu") -> torch.Tensor:
    """Random fp32 weight with at most 1 nonzero in every pair (the fp32 CUTLASS layout)."""
    w = torch.randn(shape)
    keep_first = torch.rand(shape[0], shape[1] // 2, 1) < 0.5
    w = w * torch.cat((keep_first, ~keep_first), -1).reshape(shape)
    w[0, :2] = 0
    w[min(1, shape[0] - 1), :2] = torch.tensor([-0.0, 0.0])
    return w.to(device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", CUTLASS_SHAPES, ids=lambda s: f"shape={s[0]}x{s[1]}")
def test_cutlass_matches_torch_and_round_trips(backend, device, dtype, shape):
    w = sparse_12(shape, device) if dtype == torch.float32 else sparse_24(shape, dtype, device)
    exp_packed, exp_meta = sparse_semi_structured_from_dense_cutlass(w)
    with with_backend(backend):
        packed, meta = gradprobe.pack_24(w)
        dense = gradprobe.unpack_24(packed, meta)
    assert packed.dtype == w.dtype and meta.dtype == torch.int16
    assert torch.equal(bits(packed), bits(exp_packed)), "packed differs from torch's converter"
    assert torch.equal(meta, exp_meta), "meta differs from torch's converter"
    assert torch.equal(dense, w), "unpack(pack(w)) != w"
    if dtype != torch.float32:  # torch's fp32 to_dense perturbs low mantissa bits in some pairs
        assert torch.equal(bits(dense), bits(sparse_semi_structured_to_dense_cutlass(exp_packed, exp_meta)))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", BITMASK_SHAPES, ids=lambda s: f"shape={s[0]}x{s[1]}")
def test_bitmask_round_trip(backend, device, dtype, shape):
    w = sparse_24(shape, dtype, device)
    with with_backend(backend):
        values, bitmask, shp = gradprobe.pack_24(w, "bitmask")
        dense = gradprobe.unpack_24(values, bitmask, shp)
    assert shp == list(shape)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert bitmask.shape == (shape[0], (shape[1] + 7) // 8) and bitmask.dtype == torch.uint8
    assert torch.equal(dense, w)
    keep = ref.bitmask_keep(w)
    assert torch.equal(bits(values), bits(w[keep].reshape(values.shape))), "values are not the kept ones in row-major order"
    assert torch.equal(bitmask, ref.pack_24_bitmask(w, None)[1])


@needs_ct
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", BITMASK_SHAPES, ids=lambda s: f"shape={s[0]}x{s[1]}")
def test_bitmask_parity_with_compressed_tensors(backend, device, dtype, shape):
    from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import (
        Sparse24BitMaskTensor,
        sparse24_bitmask_compress,
    )

    exact = sparse_24(shape, dtype, device, awkward=False)  # exactly 2 nonzeros per group: their topk is unambiguous
    with with_backend(backend):
        values, bitmask, shp = gradprobe.pack_24(exact, "bitmask")
    ct_values, ct_bitmask = sparse24_bitmask_compress(exact.cpu())
    assert torch.equal(bits(values.cpu()), bits(ct_values)) and torch.equal(bitmask.cpu(), ct_bitmask)

    w = sparse_24(shape, dtype, device)  # with 0/1-nonzero groups and -0.0: their decompressor must read ours
    with with_backend(backend):
        values, bitmask, shp = gradprobe.pack_24(w, "bitmask")
        ours = gradprobe.unpack_24(values, bitmask, shp)
    theirs = Sparse24BitMaskTensor.from_compressed_data(shape=shp, compressed=values.cpu(), bitmask=bitmask.cpu()).decompress()
    assert torch.equal(bits(theirs), bits(ours.cpu()))
    assert torch.equal(theirs, w.cpu())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fmt", ["cutlass", "bitmask"])
@pytest.mark.parametrize("dtype", DTYPES16, ids=dtype_id)
def test_scores_path_equals_prune_then_pack(backend, device, fmt, dtype):
    w = torch.randn(64, 128).to(dtype=dtype, device=device)
    w[0, :8] = 0  # zeros among the kept positions
    scores = torch.randint(0, 4, (64, 128)).float().to(device)  # heavy ties: lower index pruned first
    pruned = w.masked_fill(ref.nm_rank_mask(scores, 2, 4), 0)
    with with_backend(backend):
        got = gradprobe.pack_24(w, fmt, scores=scores)
        expected = gradprobe.pack_24(pruned, fmt)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(bits(a), bits(b)) if isinstance(a, torch.Tensor) else a == b
    # Wanda scores: the same as nm_mask's 2:4 selection
    norm = torch.rand(128, device=device)
    with with_backend(backend):
        got = gradprobe.pack_24(w, fmt, scores=ref.score(w, norm))
        w2 = w.clone()
        gradprobe.prune_(w2, None, norm=norm, structure="2:4")
        expected = gradprobe.pack_24(w2, fmt)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(bits(a), bits(b)) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fmt", ["cutlass", "bitmask"])
def test_not_24_sparse_names_first_bad_group(backend, device, fmt):
    w = sparse_24((64, 64), torch.float16, device, awkward=False)
    w[5, 20:24] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    w[9, 0:4] = 1.0
    with with_backend(backend), pytest.raises(ValueError, match=r"not 2:4 sparse: group at row 5, columns 20\.\.23 has 3 nonzeros"):
        gradprobe.pack_24(w, fmt)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fp32_cutlass_needs_1_of_2(backend, device):
    w = sparse_12((32, 32), device)
    w[3, 6:8] = torch.tensor([1.0, 2.0])
    with with_backend(backend):
        with pytest.raises(ValueError, match=r"not 1:2 .* sparse: group at row 3, columns 6\.\.7 has 2 nonzeros"):
            gradprobe.pack_24(w)
        with pytest.raises(ValueError, match="float32 CUTLASS layout is 1:2"):
            gradprobe.pack_24(w, scores=torch.rand(32, 32, device=device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_shapes_and_dtypes(backend, device):
    with with_backend(backend):
        with pytest.raises(ValueError, match=r"rows % 32 == 0 and cols % 32 == 0"):
            gradprobe.pack_24(torch.zeros(16, 64, dtype=torch.float16, device=device))
        with pytest.raises(ValueError, match=r"cols % 32 == 0"):
            gradprobe.pack_24(torch.zeros(32, 48, dtype=torch.bfloat16, device=device))
        with pytest.raises(ValueError, match=r"cols % 4 == 0"):
            gradprobe.pack_24(torch.zeros(3, 10, dtype=torch.float16, device=device), "bitmask")
        with pytest.raises(ValueError, match="2-D"):
            gradprobe.pack_24(torch.zeros(32, 32, 1, device=device))
        for dtype in (torch.int8, torch.float64):
            with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
                gradprobe.pack_24(torch.zeros(32, 32, dtype=dtype, device=device))
        with pytest.raises(TypeError, match="scores must be float32"):
            gradprobe.pack_24(torch.zeros(32, 32, dtype=torch.float16, device=device), scores=torch.zeros(32, 32, dtype=torch.float16))
        with pytest.raises(ValueError, match="scores must have weight's shape"):
            gradprobe.pack_24(torch.zeros(32, 32, dtype=torch.float16, device=device), scores=torch.zeros(32, 16))
        with pytest.raises(ValueError, match="NaN or Inf"):
            gradprobe.pack_24(torch.zeros(32, 32, dtype=torch.float16), "bitmask", scores=torch.full((32, 32), float("nan")))
    with pytest.raises(ValueError, match="format must be one of"):
        gradprobe.pack_24(torch.zeros(32, 32), "csr")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unpack_rejects_corrupt_inputs(backend, device):
    w = sparse_24((32, 64), torch.float16, device)
    with with_backend(backend):
        packed, meta = gradprobe.pack_24(w)
        bad_meta = meta.clone()
        bad_meta.view(-1)[0] = 0  # nibble 0 = index pair (0, 0): impossible
        with pytest.raises(ValueError, match="meta is not valid CUTLASS 2:4 metadata: group at row 0, columns 0..3"):
            gradprobe.unpack_24(packed, bad_meta)
        with pytest.raises(ValueError, match="meta of shape"):
            gradprobe.unpack_24(packed, meta[:, :2])
        with pytest.raises(TypeError, match="meta must be int16"):
            gradprobe.unpack_24(packed, meta.int())
        values, bitmask, shp = gradprobe.pack_24(w, "bitmask")
        bad_bits = bitmask.clone()
        bad_bits[2, 1] = 0x7F  # group (2, 8..11) keeps 4, group (2, 12..15) keeps 3
        with pytest.raises(ValueError, match=r"bitmask group at row 2, columns 8\.\.11 has 4 bits set"):
            gradprobe.unpack_24(values, bad_bits, shp)
        with pytest.raises(ValueError, match="values must be"):
            gradprobe.unpack_24(values[:, :-2], bitmask, shp)
    with pytest.raises(ValueError, match=r"takes \(packed, meta\) or \(values, bitmask, shape\)"):
        gradprobe.unpack_24(values)


def test_unpack_accepts_pack_output_tuple():
    w = sparse_24((32, 64), torch.bfloat16)
    assert torch.equal(gradprobe.unpack_24(gradprobe.pack_24(w)), w)
    assert torch.equal(gradprobe.unpack_24(gradprobe.pack_24(w, "bitmask")), w)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pack_opcheck(backend, device):
    w = sparse_24((32, 32), torch.float16, device)
    scores = torch.rand(32, 32, device=device)
    ops = torch.ops.gradprobe
    with with_backend(backend):
        packed, meta = ops.pack_24_cutlass(w, None)
        values, bitmask = ops.pack_24_bitmask(w, None)
        torch.library.opcheck(ops.pack_24_cutlass.default, (w, None))
        torch.library.opcheck(ops.pack_24_cutlass.default, (w, scores))
        torch.library.opcheck(ops.pack_24_cutlass.default, (sparse_12((32, 32), device), None))
        torch.library.opcheck(ops.unpack_24_cutlass.default, (packed, meta))
        torch.library.opcheck(ops.pack_24_bitmask.default, (w, scores))
        torch.library.opcheck(ops.unpack_24_bitmask.default, (values, bitmask, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (SparseSemiStructuredTensor matmul)")
def test_cuda_semi_structured_matmul():
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    w = sparse_24((128, 128), torch.float16, "cuda", awkward=False)
    packed, meta = gradprobe.pack_24(w)
    exp_packed, exp_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(bits(packed), bits(exp_packed)) and torch.equal(meta, exp_meta)
    sparse = SparseSemiStructuredTensorCUTLASS(w.shape, packed=packed, meta=meta, packed_t=None, meta_t=None,
                                               compressed_swizzled_bitmask=None, requires_grad=False)
    x = torch.randn(128, 64, dtype=torch.float16, device="cuda")
    torch.testing.assert_close(torch.mm(sparse, x), torch.mm(w, x))


@pytest.mark.parametrize("isa", ["dispatch", "portable"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_cpp_isa_paths_bit_exact(monkeypatch, isa, dtype):
    """The C++ ops pick AVX2 loops at run time; GRADPROBE_CPP_DISABLE_AVX2=1 (read on every call) forces the
    portable ones. Both: bit-exact vs the reference, with scores (heavy ties), column tails, and errors."""
    if not _extension.available():
        pytest.skip(f"gradprobe._C not built: {_extension.diagnosis()}")
    _extension.load()
    if isa == "portable":
        monkeypatch.setenv("GRADPROBE_CPP_DISABLE_AVX2", "1")
    ops = torch.ops.gradprobe_cpp
    for shape in [(32, 32), (64, 160)]:
        w = sparse_12(shape) if dtype == torch.float32 else sparse_24(shape, dtype)
        packed, meta = ops.pack_24_cutlass(w, None)
        exp_packed, exp_meta = sparse_semi_structured_from_dense_cutlass(w)
        assert torch.equal(bits(packed), bits(exp_packed)) and torch.equal(meta, exp_meta), shape
        assert torch.equal(ops.unpack_24_cutlass(packed, meta), w)
    for shape in [(1, 4), (5, 52), (32, 64)]:  # 52: 3 blocks of 16 + one group
        w = sparse_24(shape, dtype)
        values, bitmask = ops.pack_24_bitmask(w, None)
        exp = ref.pack_24_bitmask(w, None)
        assert torch.equal(bits(values), bits(exp[0])) and torch.equal(bitmask, exp[1]), shape
        assert torch.equal(bits(ops.unpack_24_bitmask(values, bitmask, shape[1])), bits(ref.unpack_24_bitmask(*exp, shape[1])))
        dense = torch.randn(shape).to(dtype)
        scores = torch.randint(0, 4, shape).float()
        for fmt, op, rop in (("bitmask", ops.pack_24_bitmask, ref.pack_24_bitmask),
                             ("cutlass", ops.pack_24_cutlass, ref.pack_24_cutlass)):
            if fmt == "cutlass" and (dtype == torch.float32 or shape[0] % 32):
                continue
            got, exp = op(dense, scores), rop(dense, scores)
            assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, exp, strict=True)), (fmt, shape)
            with pytest.raises(ValueError, match="NaN or Inf"):
                op(dense, scores.index_put((torch.tensor(0), torch.tensor(shape[1] - 1)), torch.tensor(float("-inf"))))
    w = sparse_24((64, 96), torch.float16 if dtype == torch.float32 else dtype, awkward=False)
    w[33, 68:72] = 1.0
    w[40, 0:4] = torch.tensor([1.0, 0.0, 2.0, 3.0])
    for op in (ops.pack_24_cutlass, ops.pack_24_bitmask):
        with pytest.raises(ValueError, match=r"group at row 33, columns 68\.\.71 has 4 nonzeros"):
            op(w, None)
    packed, meta = ops.pack_24_cutlass(torch.zeros(64, 64, dtype=w.dtype), None)
    meta.view(-1)[87] = 0x4E5E  # nibble 1 of some metadata word: index pair (1, 1)
    with pytest.raises(ValueError, match="meta is not valid CUTLASS 2:4 metadata"):
        ops.unpack_24_cutlass(packed, meta)
