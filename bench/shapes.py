"""Real linear-layer shapes of popular decoder-only LLMs, as ``(out_features, in_features)``.

Taken from the models' published ``config.json`` (hidden_size, intermediate_size,
num_attention_heads, num_key_value_heads, num_hidden_layers); head_dim = hidden / heads = 128 for
all of them, so the k/v projections of the GQA models are (kv_heads * 128, hidden).
Per decoder layer the prunable linears are q, k, v, o (attention) and gate, up, down (MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShapes:
    """Linear shapes of one model family member. ``linears`` maps name -> (out, in)."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    @property
    def layer_numel(self) -> int:
        """Weights (= scores) in the prunable linears of one decoder layer."""
        return sum(o * i for o, i in self.linears.values())

    @property
    def model_numel(self) -> int:
        """Weights in the prunable linears of the whole model (embeddings / lm_head excluded)."""
        return self.layer_numel * self.layers


MODELS: dict[str, ModelShapes] = {
    m.name: m
    for m in (
        ModelShapes("llama-2-7b", hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32),
        ModelShapes("llama-2-13b", hidden=5120, intermediate=13824, heads=40, kv_heads=40, layers=40),
        ModelShapes("llama-2-70b", hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=80),
        ModelShapes("llama-3-8b", hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32),
        ModelShapes("mistral-7b", hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32),
    )
}

# the models of the GPU table (Llama-2-13B is extra, kept for completeness)
LLAMA_FAMILY = ("llama-2-7b", "llama-3-8b", "mistral-7b", "llama-2-70b", "llama-2-13b")


def distinct_shapes(models=LLAMA_FAMILY) -> list[tuple[tuple[int, int], list[str]]]:
    """Every distinct (out, in) over ``models``, with the 'model:linear' names that have it, in first-seen order."""
    seen: dict[tuple[int, int], list[str]] = {}
    for m in models:
        for lin, shape in MODELS[m].linears.items():
            seen.setdefault(shape, []).append(f"{m}:{lin}")
    return list(seen.items())


def model_linear_shapes(model: str, layers: int | None = None) -> list[tuple[str, tuple[int, int]]]:
    """('layers.{l}.{linear}', (out, in)) for the first ``layers`` decoder layers (all by default), in model order."""
    m = MODELS[model]
    n = m.layers if layers is None else layers
    return [(f"layers.{layer}.{lin}", shape) for layer in range(n) for lin, shape in m.linears.items()]


if __name__ == "__main__":
    for m in MODELS.values():
        print(
            f"{m.name}: {m.layers} layers, {m.layer_numel / 1e6:.1f}M/layer, {m.model_numel / 1e9:.2f}B linear weights"
        )
        for lin, (o, i) in m.linears.items():
            print(f"  {lin:10s} ({o}, {i})")
