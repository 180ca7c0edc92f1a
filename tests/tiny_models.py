"""Tiny random-config causal LMs built in the test process (no downloads), fp32, eval mode."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(
    family: str,
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    max_pos: int = 256,
    seed: int = 0,
    **config_extra,
):
    """Random ``*ForCausalLM`` of ``family`` (a key of FAMILIES), weights from ``torch.manual_seed(seed)``.

    q (hidden, hidden), k/v (kv_heads*head_dim, hidden), gate/up (intermediate, hidden); ``config_extra``
    goes to the family's config (e.g. ``sliding_window``).
    """
    config_cls, model_cls = FAMILIES[family]
    cfg = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **config_extra,
    )
    torch.manual_seed(seed)
    return model_cls(cfg).to(torch.float32).eval()


def tiny_llama(**kw) -> LlamaForCausalLM:
    """Random LlamaForCausalLM (keywords as :func:`tiny_model`)."""
    return tiny_model("llama", **kw)


def tiny_mistral(sliding_window: int | None = 8, **kw) -> MistralForCausalLM:
    """Random MistralForCausalLM with a (small, so it matters) sliding window."""
    return tiny_model("mistral", sliding_window=sliding_window, **kw)


def tiny_qwen2(**kw) -> Qwen2ForCausalLM:
    """Random Qwen2ForCausalLM (q/k/v with bias)."""
    return tiny_model("qwen2", **kw)


def random_batches(nsamples: int = 4, seqlen: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """int64 token ids (nsamples, seqlen)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (nsamples, seqlen), generator=g, dtype=torch.int64)


def save_tiny_checkpoint(root: Path, num_layers: int) -> tuple[Path, Path]:
    """A tiny random Llama (hidden 32, vocab 128) + char tokenizer saved to ``root/tiny-llama`` as a
    safetensors checkpoint, and a text file ``root/text.txt``; returns (model_dir, text)."""
    from text_helpers import SAMPLE_TEXT, char_tokenizer

    model_dir = root / "tiny-llama"
    tiny_llama(
        num_layers=num_layers, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=128, max_pos=128
    ).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT)
    return model_dir, text


def prune_argv(model_dir, text, out, *extra: str) -> list[str]:
    """``gradprobe prune`` arguments for a :func:`save_tiny_checkpoint` checkpoint on the CPU: 4 calibration
    samples of 32 tokens from ``text``; ``extra`` (appended, so it overrides these) says the rest."""
    return [
        "prune",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--calib",
        str(text),
        "--device",
        "cpu",
        *extra,
    ]
