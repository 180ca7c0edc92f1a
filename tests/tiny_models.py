"""Tiny random-config causal LMs built in the test process (no downloads), fp32, eval mode."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


def _common(num_layers, hidden, intermediate, heads, kv_heads, vocab, max_pos):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def _build(cls, config, seed):
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    return model


def tiny_llama(
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    max_pos: int = 256,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Random LlamaForCausalLM; q (hidden, hidden), k/v (kv_heads*head_dim, hidden), gate/up (inter, hidden)."""
    cfg = LlamaConfig(**_common(num_layers, hidden, intermediate, heads, kv_heads, vocab, max_pos))
    return _build(LlamaForCausalLM, cfg, seed)


def tiny_mistral(
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    max_pos: int = 256,
    sliding_window: int | None = 8,
    seed: int = 0,
) -> MistralForCausalLM:
    """Random MistralForCausalLM with a (small, so it matters) sliding window."""
    cfg = MistralConfig(
        **_common(num_layers, hidden, intermediate, heads, kv_heads, vocab, max_pos),
        sliding_window=sliding_window,
    )
    return _build(MistralForCausalLM, cfg, seed)


def tiny_qwen2(
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    max_pos: int = 256,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """Random Qwen2ForCausalLM (q/k/v with bias)."""
    cfg = Qwen2Config(**_common(num_layers, hidden, intermediate, heads, kv_heads, vocab, max_pos))
    return _build(Qwen2ForCausalLM, cfg, seed)


def random_batches(nsamples: int = 4, seqlen: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """int64 token ids (nsamples, seqlen)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (nsamples, seqlen), generator=g, dtype=torch.int64)
