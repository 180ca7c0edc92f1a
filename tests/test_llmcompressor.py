"""GradprobeModifier inside llm-compressor's oneshot: masks equal gradprobe.prune, prune -> GPTQ W4A16.

Needs the ``llmcompressor`` extra (its own virtual environment, see README); skipped without it.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llmcompressor")

from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402

from gradprobe import PruneConfig, prune  # noqa: E402
from gradprobe.allocation import owl_from_model  # noqa: E402
from gradprobe.integrations.llmcompressor import GradprobeModifier, pack_mask, unpack_mask  # noqa: E402
from tests.text_helpers import char_tokenizer  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

# W4A16 (int4 symmetric weights, 16-bit activations) with groups of 64: the preset's group of 128 does
# not divide SmolLM2's hidden size 576, which llm-compressor rejects.
W4A16_G64 = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64},
    }
}
DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calib_dataset(ids: torch.Tensor) -> Dataset:
    """The calibration windows (nsamples, seqlen) as the pre-tokenised data set oneshot takes."""
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def run_oneshot(model, ids: torch.Tensor, recipe, tokenizer=None, **kw) -> None:
    # shuffle off and batch 1: the pipeline then feeds the windows in gradprobe.prune's order.
    # The data set is pre-tokenised; oneshot still wants a processor object.
    oneshot(
        model=model,
        processor=tokenizer or char_tokenizer(),
        dataset=calib_dataset(ids),
        recipe=recipe,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        batch_size=1,
        **kw,
    )


def decoder_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(tuple(f"{d}.weight" for d in DECODER))}


def assert_same_weights(a, b) -> None:
    wa, wb = decoder_weights(a), decoder_weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    bad = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"
    for n, p in a.named_parameters():  # nothing else was touched
        if n not in wa:
            assert torch.equal(p, dict(b.named_parameters())[n]), n


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved to disk (oneshot reads the config of ``model.name_or_path``)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(num_layers=3, hidden=64, intermediate=128, vocab=256, seed=0).save_pretrained(path)
    return path


@pytest.fixture
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


# --- the same masks as gradprobe.prune (tiny model, every mode) -----------------------------------
@pytest.mark.parametrize(
    "modifier_kw,config_kw",
    [
        ({"sparsity": 0.5}, {"sparsity": 0.5}),
        ({"sparsity": 0.6, "scope": "layer"}, {"sparsity": 0.6, "scope": "layer"}),
        ({"sparsity": None, "mask_structure": "2:4"}, {"structure": "2:4"}),
        ({"sparsity": 0.5, "mask_structure": "4:8"}, {"structure": "4:8"}),
        ({"sparsity": [0.3, 0.5, 0.7]}, {"sparsity": (0.3, 0.5, 0.7)}),
        ({"sparsity": 0.5, "method": "magnitude"}, {"sparsity": 0.5, "method": "magnitude"}),
    ],
    ids=["row", "layer", "2:4", "4:8", "per-layer", "magnitude"],
)
def test_masks_equal_gradprobe_prune_tiny(modifier_kw, config_kw, tiny_ids, tiny):
    a, b = tiny(), tiny()
    mod = GradprobeModifier(**modifier_kw)
    run_oneshot(a, tiny_ids, [mod])
    prune(b, tiny_ids, PruneConfig(batch_size=1, progress=False, **config_kw))
    assert_same_weights(a, b)
    assert len(mod.rows) == 3 * 7
    assert sum(r.pruned for r in mod.rows) == sum(int((w == 0).sum()) for w in decoder_weights(a).values())


def test_owl_equals_gradprobe_owl(tiny_ids, tiny):
    a, b = tiny(), tiny()
    run_oneshot(a, tiny_ids, [GradprobeModifier(sparsity=0.5, sparsity_profile="owl", owl_m=3.0, owl_lmbda=0.08)])
    alloc = owl_from_model(b, tiny_ids, 0.5, m=3.0, lam=0.08, config=PruneConfig(batch_size=1, progress=False))
    assert len(set(alloc.layer_sparsity.values())) > 1  # OWL really moved the layers apart
    prune(b, tiny_ids, alloc.config(batch_size=1, progress=False))
    assert_same_weights(a, b)


# --- targets ---------------------------------------------------------------------------------------
def test_default_targets_leave_lm_head_and_embeddings(tiny_ids, tiny):
    model = tiny()
    head, embed = model.lm_head.weight.clone(), model.model.embed_tokens.weight.clone()
    run_oneshot(model, tiny_ids, [GradprobeModifier(sparsity=0.5)])
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, embed)
    assert all(float((w == 0).float().mean()) == 0.5 for w in decoder_weights(model).values())


def test_ignore_plain_name_and_lm_head_target(tiny_ids, tiny):
    model = tiny()
    before = model.model.layers[1].mlp.down_proj.weight.clone()
    mod = GradprobeModifier(sparsity=0.5, targets=["Linear"], ignore=["model.layers.1.mlp.down_proj"])
    run_oneshot(model, tiny_ids, [mod])
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)  # a plain name in ignore works
    assert float((model.lm_head.weight == 0).float().mean()) == 0.5  # "Linear" includes the (untied) head
    assert len(mod.rows) == 3 * 7 - 1 + 1


def test_lm_head_mask_is_exact_on_the_pipeline_inputs(tiny_ids, tiny):
    """lm_head is traced into the last decoder layer's subgraph, so llm-compressor calibrates it on
    the *dense* last layer's output (gradprobe.prune uses the pruned one): the masks of the decoder
    linears equal gradprobe.prune's, lm_head's equals gradprobe's op on the inputs the pipeline fed."""
    from gradprobe import prune_mask
    from gradprobe.stats import ChannelStats

    a, b = tiny(), tiny()
    head = a.lm_head.weight.detach().clone()
    st = ChannelStats(head.shape[1], "cpu")
    seen = []

    def capture(_m, args):
        if args[0].device.type != "meta" and len(seen) < tiny_ids.shape[0]:  # the calibration pass
            seen.append(1)
            st.add(args[0])

    a.lm_head.register_forward_pre_hook(capture)
    run_oneshot(a, tiny_ids, [GradprobeModifier(sparsity=0.5, targets=["Linear"])])
    prune(b, tiny_ids, PruneConfig(batch_size=1, progress=False))
    wa, wb = decoder_weights(a), decoder_weights(b)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert torch.equal(a.lm_head.weight == 0, prune_mask(head, 0.5, norm=st.norm()) | (head == 0))


def test_bad_arguments_raise_before_the_model_is_touched(tiny_ids, tiny):
    with pytest.raises(ValueError, match="sequential pipeline"):
        GradprobeModifier(method="probe", sparsity=0.5)
    with pytest.raises(ValueError, match="scope"):
        GradprobeModifier(sparsity=0.5, scope="global")
    with pytest.raises(ValueError, match="2:4"):
        GradprobeModifier(sparsity=0.3, mask_structure="2:4")
    model = tiny()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them
    dense = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="tied"):
        run_oneshot(model, tiny_ids, [GradprobeModifier(sparsity=0.5, targets=["re:.*lm_head"])])
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())
    model = tiny()
    model.model.extra = torch.nn.Linear(64, 64)  # a Linear outside the decoder layers
    dense = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="neither a decoder-layer linear"):
        run_oneshot(model, tiny_ids, [GradprobeModifier(sparsity=0.5, targets=["Linear"])])
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())


def test_pack_mask_round_trip():
    for shape in [(1, 1), (3, 5), (8, 8), (7, 13)]:
        m = torch.rand(shape) < 0.5
        assert torch.equal(unpack_mask(pack_mask(m), m.shape), m)
        assert pack_mask(m).numel() == -(-m.numel() // 8)


# --- the embedded model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradprobe import data
    from gradprobe.embedded import default_model_dir

    path = default_model_dir()
    ids = data.calibration_batches(AutoTokenizer.from_pretrained(path), None, nsamples=4, seqlen=64, seed=0)

    def load(attn: str = "eager"):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()

    return load, ids, path


def test_embedded_masks_equal_gradprobe_prune(embedded):
    """Bit-identical weights with eager attention (both pipelines then compute identical activations).

    With SDPA they differ from about layer 4 on: the traced pipeline passes an explicit 4-D causal mask
    while gradprobe's per-layer call lets SDPA use is_causal=True; the two kernels round differently
    and near-tied scores flip (see the module docstring of gradprobe.integrations.llmcompressor).
    """
    load, ids, _ = embedded
    a, b = load(), load()
    mod = GradprobeModifier(sparsity=0.5)
    run_oneshot(a, ids, [mod])
    prune(b, ids, PruneConfig(batch_size=1, progress=False, nsamples=4, seqlen=64))
    assert_same_weights(a, b)
    assert len(mod.rows) == 30 * 7


def test_embedded_prune_then_gptq_w4a16_keeps_sparsity(embedded, tmp_path):
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    load, ids, path = embedded
    model = load("sdpa")
    mod = GradprobeModifier(sparsity=0.5)
    run_oneshot(model, ids, [mod, GPTQModifier(targets="Linear", config_groups=W4A16_G64, ignore=["lm_head"])])
    pruned = sum(r.pruned for r in mod.rows)
    numel = sum(r.numel for r in mod.rows)
    assert pruned == numel // 2
    assert sum(mod.rezeroed.values()) > 0  # GPTQ moved pruned weights; the modifier zeroed them again
    zeros = sum(int((w == 0).sum()) for w in decoder_weights(model).values())
    assert zeros >= pruned
    out = tmp_path / "w4a16"
    model.save_pretrained(out, save_compressed=True)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    config = back.config.quantization_config
    if not isinstance(config, dict):  # transformers wraps it in a CompressedTensorsConfig
        config = config.to_dict()
    assert "pack-quantized" in json.dumps(config), config
    wb = decoder_weights(back)
    if not wb:  # compressed modules keep weight_packed: decompress to compare
        from compressed_tensors.compressors import ModelCompressor

        ModelCompressor.from_pretrained_model(back).decompress_model(back)
        wb = decoder_weights(back)
    zeros_back = sum(int((w == 0).sum()) for w in wb.values())
    assert zeros_back >= pruned
    assert all(torch.equal(wb[n], w.to(wb[n].dtype)) for n, w in decoder_weights(model).items())
