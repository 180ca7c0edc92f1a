"""Bad input to the tensor API fails at once, names the argument, and leaves every tensor unchanged;
meta-device dry runs give meta results of the right shape (no value is ever read)."""

from __future__ import annotations

import re

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


# ---- probe_prune_: every argument checked before the model is touched; errors mid-run undo the run ----


def _probe_model():
    from tiny_models import tiny_llama

    return tiny_llama(num_layers=2)


def _norms(model, bad_key=None, bad=None):
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            out[name] = torch.rand(p.shape[1])
    if bad_key is not None:
        out[bad_key] = bad
    return out


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, before) -> bool:
    return all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


LAYER1_DOWN = "model.layers.1.mlp.down_proj.weight"  # (64, 128): in_features 128
PROBE_BAD = [
    ("norm of one key has the wrong shape", dict(norms=("bad", torch.rand(64))), ValueError,
     f"norms['{LAYER1_DOWN}'] must have shape (128,)"),
    ("norm is a list", dict(norms=("bad", [1.0] * 128)), TypeError, f"norms['{LAYER1_DOWN}'] must be"),
    ("norm has NaN", dict(norms=("bad", torch.full((128,), float("nan")))), ValueError, "NaN or Inf"),
    ("norm is negative", dict(norms=("bad", -torch.ones(128))), ValueError, "negative"),
    ("norm is int", dict(norms=("bad", torch.ones(128, dtype=torch.int64))), TypeError, "float32"),
    ("norm missing", dict(norms=("drop", None)), ValueError, "norms has no entry"),
    ("token id >= vocab", dict(batches=torch.tensor([[1, 2, 300, 4]])), ValueError,
     r"batches\[0\] must be in \[0, vocab_size=256\)"),
    ("negative token id", dict(batches=[torch.tensor([3, -1, 4, 5])]), ValueError, r"got range \[-1, 5\]"),
]


@pytest.mark.parametrize("case", range(len(PROBE_BAD)), ids=[c[0] for c in PROBE_BAD])
@pytest.mark.parametrize("mode", ["layerwise", pytest.param("model", marks=pytest.mark.slow)])
def test_probe_bad_arguments_leave_the_model_untouched(case, mode):
    from tiny_models import random_batches

    _, kw, exc, match = PROBE_BAD[case]
    model = _probe_model()
    before = _snapshot(model)
    batches = kw.get("batches", random_batches(nsamples=2, seqlen=16))
    norms = None
    if "norms" in kw:
        what, value = kw["norms"]
        norms = _norms(model)
        if what == "drop":
            del norms[LAYER1_DOWN]
        else:
            norms[LAYER1_DOWN] = value
    with pytest.raises(exc, match=match if case >= 6 else re.escape(match)):
        gradprobe.probe_prune_(model, batches, 0.5, norms=norms, mode=mode)
    assert _unchanged(model, before)


class _Boom(Exception):
    pass


DEFAULT_RUN_FAULTS = {("layerwise", "forward", 3, _Boom), ("model", "reverse", 2, KeyboardInterrupt)}
RUN_FAULTS = [  # (mode, order, gradient pass that raises: 1 = first G0, 2 = first G1, 3 = second group's G0)
    pytest.param(mode, order, fail_at, error,
                 marks=() if (mode, order, fail_at, error) in DEFAULT_RUN_FAULTS else pytest.mark.slow)
    for mode, order in (("layerwise", "reverse"), ("layerwise", "forward"), ("model", "reverse"))
    for fail_at in ((1, 2, 3) if mode == "layerwise" else (1, 2))
    for error in ((_Boom, KeyboardInterrupt) if fail_at == 2 else (_Boom,))
]


@pytest.mark.parametrize("mode,order,fail_at,error", RUN_FAULTS)
def test_error_during_the_run_restores_the_model(mode, order, fail_at, error):
    """A loss that raises on its n-th gradient pass (after earlier layers were decided, or with this
    group's candidates scaled by r) leaves every weight as it was before the call."""
    from tiny_models import random_batches

    model = _probe_model()
    before = _snapshot(model)
    batches = random_batches(nsamples=2, seqlen=16)
    calls = {"n": 0}

    def loss(logits, ids):
        calls["n"] += 1
        if calls["n"] > 2 * (fail_at - 1):  # 2 batches per pass
            raise error("injected")
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    with pytest.raises(error, match="injected"):
        gradprobe.probe_prune_(model, batches, 0.5, mode=mode, order=order, loss=loss)
    assert calls["n"] == 2 * (fail_at - 1) + 1
    assert _unchanged(model, before)
    assert not any(p.requires_grad is False for p in model.parameters())  # grad flags restored too
