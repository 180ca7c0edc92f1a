"""Bad input to the tensor API fails at once, names the argument, and leaves every tensor unchanged;
meta-device dry runs give meta results of the right shape (no value is ever read)."""

from __future__ import annotations

import pytest
import torch

import gradprobe
from gradprobe import pack_24, unpack_24

META = torch.device("meta")


def _sparse_24(rows=32, cols=64, dtype=torch.float16) -> torch.Tensor:
    w = torch.randn(rows, cols)
    return w.masked_fill(gradprobe.prune_mask(w, None, structure="2:4"), 0).to(dtype)


# ---- pack_24 / unpack_24: device mixes and non-tensor arguments ---------------------------------------


def _pack_device_mixes():
    w = _sparse_24()
    cut, bm = pack_24(w), pack_24(w, "bitmask")
    scores = torch.rand(32, 64)
    return [
        ("pack cutlass, meta scores", lambda: pack_24(w, scores=scores.to(META)), ValueError, "scores is on meta"),
        ("pack bitmask, meta scores", lambda: pack_24(w, "bitmask", scores=scores.to(META)), ValueError,
         "scores is on meta"),
        ("pack meta weight, cpu scores", lambda: pack_24(w.to(META), scores=scores), ValueError, "weight is on meta"),
        ("unpack cutlass cpu + meta", lambda: unpack_24(cut[0], cut[1].to(META)), ValueError, "meta is on meta"),
        ("unpack cutlass meta + cpu", lambda: unpack_24(cut[0].to(META), cut[1]), ValueError, "packed is on meta"),
        ("unpack bitmask cpu + meta", lambda: unpack_24(bm[0], bm[1].to(META), bm[2]), ValueError,
         "bitmask is on meta"),
        ("unpack bitmask values list", lambda: unpack_24(bm[0].tolist(), bm[1], bm[2]), TypeError,
         "values must be a torch.Tensor"),
        ("unpack bitmask bitmask None", lambda: unpack_24(bm[0], None, bm[2]), TypeError,
         "bitmask must be a torch.Tensor"),
        ("unpack cutlass packed ndarray", lambda: unpack_24(cut[0].numpy(), cut[1]), TypeError,
         "packed must be a torch.Tensor"),
        ("unpack cutlass meta str", lambda: unpack_24(cut[0], "meta"), TypeError, "meta must be a torch.Tensor"),
        ("unpack string shape", lambda: unpack_24(bm[0], bm[1], "32x64"), TypeError, "shape must be [rows, cols]"),
        ("unpack float shape", lambda: unpack_24(bm[0], bm[1], [32.0, 64.0]), TypeError, "of ints"),
        ("unpack float tensor shape", lambda: unpack_24(bm[0], bm[1], torch.tensor([32.0, 64.0])), TypeError,
         "shape must be [rows, cols] of ints"),
        ("unpack shape None", lambda: unpack_24(bm[0], bm[1], None), TypeError, "shape must be [rows, cols]"),
    ]


PACK_CASES = _pack_device_mixes()


@pytest.mark.parametrize("case", range(len(PACK_CASES)), ids=[c[0] for c in PACK_CASES])
def test_pack_unpack_bad_arguments_name_the_argument(case):
    _, call, exc, match = PACK_CASES[case]
    with pytest.raises(exc, match=match.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_unpack_shape_accepts_sizes_and_int_tensors():
    w = _sparse_24()
    values, bitmask, _ = pack_24(w, "bitmask")
    for shape in ([32, 64], (32, 64), torch.Size([32, 64]), torch.tensor([32, 64])):
        assert torch.equal(unpack_24(values, bitmask, shape), w)


# ---- meta-device dry runs --------------------------------------------------------------------------


@pytest.mark.parametrize("use_norm", [False, True], ids=["magnitude", "wanda"])
def test_meta_dry_runs(use_norm):
    w = torch.empty(8, 16, device=META, dtype=torch.bfloat16)
    norm = torch.empty(16, device=META) if use_norm else None
    outs = [
        gradprobe.prune_mask(w, 0.5, norm=norm),
        gradprobe.prune_mask(w, 0.5, norm=norm, scope="layer"),
        gradprobe.prune_mask(w, None, norm=norm, structure="2:4"),
        gradprobe.prune_(w, 0.5, norm=norm),
        gradprobe.prune_(w, 0.5, norm=norm, scope="layer"),
        gradprobe.prune_(w, None, norm=norm, structure="2:4"),
        *gradprobe.global_prune_masks([w, w], 0.5, norms=None if norm is None else [norm, norm]),
        *gradprobe.global_prune_([w], 0.5, norms=None if norm is None else [norm]),
    ]
    for m in outs:
        assert m.device.type == "meta" and m.dtype == torch.bool and m.shape == (8, 16)
    for scope in ("row", "layer"):
        thr = gradprobe.kth_threshold(w, 0.5, norm=norm, scope=scope)
        assert all(t.device.type == "meta" for t in thr)
        assert thr.value.shape == ((8,) if scope == "row" else ())
    thr = gradprobe.kth_threshold([w], 0.5, norm=None if norm is None else [norm], scope="global")
    assert thr.value.device.type == "meta"


def test_meta_norm_with_a_real_weight_is_a_device_mix():
    w = torch.randn(8, 16)
    before = w.clone()
    with pytest.raises(ValueError, match="norm is on meta but weight is on cpu"):
        gradprobe.prune_(w, 0.5, norm=torch.empty(16, device=META))
    assert torch.equal(w, before)
