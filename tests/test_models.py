"""Model-family adapters: registry, prunable linears, and a layer-by-layer forward equal to the model's."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_batches, tiny_llama, tiny_mistral, tiny_qwen2

from gradprobe.models import SUPPORTED_MODEL_TYPES, get_adapter
from gradprobe.models.base import LLAMA_LINEARS
from gradprobe.models.llama import LlamaAdapter
from gradprobe.models.mistral import MistralAdapter
from gradprobe.models.qwen2 import Qwen2Adapter

FAMILIES = {
    "llama": (tiny_llama, LlamaAdapter),
    "mistral": (tiny_mistral, MistralAdapter),
    "qwen2": (tiny_qwen2, Qwen2Adapter),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_selected_by_model_type(family):
    build, cls = FAMILIES[family]
    model = build()
    assert type(get_adapter(model)) is cls
    assert type(get_adapter(model.config)) is cls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prunable_linears_order_and_shapes(family):
    model = FAMILIES[family][0](hidden=64, intermediate=128, heads=4, kv_heads=2)
    ad = get_adapter(model)
    layers = ad.decoder_layers(model)
    assert len(layers) == 2
    lin = ad.prunable_linears(layers[1])
    # the order q, k, v, o, gate, up, down is the spec (report rows, global group order)
    assert LLAMA_LINEARS == tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(
        f"mlp.{p}_proj" for p in ("gate", "up", "down")
    )
    assert list(lin) == list(LLAMA_LINEARS)
    assert all(m is layers[1].get_submodule(n) for n, m in lin.items())
    shapes = [tuple(m.weight.shape) for m in lin.values()]
    assert shapes == [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    assert lin["mlp.down_proj"] is layers[1].mlp.down_proj
    assert ad.lm_head(model) is model.lm_head and ad.embed(model) is model.model.embed_tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("bsz", [1, 3])
def test_layerwise_forward_equals_model(family, bsz):
    """embed -> layers with adapter kwargs -> norm -> lm_head reproduces model(ids).logits exactly
    (mistral: sliding window 8 < seqlen 32, so the window mask is exercised)."""
    model = FAMILIES[family][0]()
    ad = get_adapter(model)
    ids = random_batches(bsz, 32)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        h = ad.embed(model)(ids)
        for i, layer in enumerate(ad.decoder_layers(model)):
            h = ad.layer_output(layer(h, **ad.layer_forward_kwargs(model, h, layer_idx=i)))
        out = ad.lm_head(model)(ad.final_norm(model)(h))
    assert torch.equal(out, ref)


def test_layer_output_accepts_tuple_and_tensor():
    t = torch.ones(2)
    assert LlamaAdapter.layer_output(t) is t and LlamaAdapter.layer_output((t, None)) is t


def test_unknown_family_lists_supported():
    class Cfg:
        model_type = "gpt_neox"

    with pytest.raises(
        ValueError, match="unsupported model family 'gpt_neox'; supported: llama, mistral, qwen2"
    ):
        get_adapter(Cfg())
    with pytest.raises(TypeError, match="model_type"):
        get_adapter(object())
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2")
