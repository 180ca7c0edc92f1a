"""End-to-end layerwise Wanda: gradprobe.prune vs a Wanda-reference-style implementation.

Model: random-weight LlamaForCausalLM with Llama-7B layer shapes (hidden 4096, intermediate 11008,
32 heads) but only ``--layers`` decoder layers and a small vocabulary; CPU, fp32 by default.

Reference style (https://github.com/locuslab/wanda/blob/main/lib/prune.py, ``prune_wanda``):
layer-0 inputs caught with a Catcher into buffers sized to the model's maximum context
(``--max-context``, Llama-2: 4096) although only ``seqlen`` positions are used, fp32 running-mean
``scaler_row`` per linear, ``torch.sort`` of every row, then the pruned layer recomputes the outputs.

Usage: python bench/bench_driver.py [--layers 2] [--nsamples 4] [--seqlen 128]
Prints a Markdown table: wall seconds, peak extra RSS, achieved sparsity, mask agreement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from _harness import peak_memory_delta  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe.models.base import LLAMA_LINEARS  # noqa: E402


def build(layers: int, dtype: torch.dtype, max_context: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=max_context,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
    model.model.rotary_emb.__init__(cfg)  # real inv_freq buffer (to_empty left it uninitialised)
    return model.eval()


class _Catch(Exception):
    pass


@torch.no_grad()
def reference_style_wanda(model, batches, sparsity: float, max_context: int):
    """Wanda's prune_wanda, restated (max-context buffers, running-mean scaler_row, torch.sort)."""
    layers = model.model.layers
    n, seqlen = batches.shape
    hidden = model.config.hidden_size
    inps = torch.zeros((n, max_context, hidden), dtype=torch.float32)  # Wanda: (nsamples, model.seqlen, H)
    cache = {"i": 0, "kw": None}

    def catcher(_m, args, kwargs):
        inps[cache["i"], :seqlen] = args[0][0]
        cache["i"] += 1
        cache["kw"] = kwargs
        raise _Catch

    h = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
    for j in range(n):
        try:
            model(batches[j : j + 1], use_cache=False)
        except _Catch:
            pass
    h.remove()
    outs = torch.zeros_like(inps)
    kw = cache["kw"]
    dtype = next(model.parameters()).dtype
    for layer in layers:
        subset = {name: layer.get_submodule(name) for name in LLAMA_LINEARS}
        scaler = {name: torch.zeros(m.in_features) for name, m in subset.items()}
        count = {name: 0 for name in subset}

        def add_batch(name, scaler=scaler, count=count):
            def hook(_m, args, _out):
                inp = args[0].reshape(-1, args[0].shape[-1]).t().float()
                scaler[name] *= count[name] / (count[name] + 1)
                count[name] += 1
                scaler[name] += torch.norm(inp, p=2, dim=1) ** 2 / count[name]

            return hook

        hs = [m.register_forward_hook(add_batch(name)) for name, m in subset.items()]
        for j in range(n):
            outs[j, :seqlen] = layer(inps[j : j + 1, :seqlen].to(dtype), **kw)[0]
        for x in hs:
            x.remove()
        for name, m in subset.items():
            metric = m.weight.abs().float() * torch.sqrt(scaler[name].reshape(1, -1))
            idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
            mask = torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)
            m.weight.data[mask] = 0
        for j in range(n):
            outs[j, :seqlen] = layer(inps[j : j + 1, :seqlen].to(dtype), **kw)[0]
        inps, outs = outs, inps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = build(a.layers, dtype, a.max_context)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batches = torch.randint(0, 1024, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    results = []

    def run(label, fn):
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        _, peak = peak_memory_delta(fn, "cpu")
        secs = time.perf_counter() - t0
        zeros = {
            (i, n): (lay.get_submodule(n).weight == 0)
            for i, lay in enumerate(model.model.layers)
            for n in LLAMA_LINEARS
        }
        results.append((label, secs, peak, zeros))

    run(
        "gradprobe.prune (row, wanda)",
        lambda: gradprobe.prune(model, batches, gradprobe.PruneConfig(sparsity=a.sparsity, progress=False)),
    )
    run(
        f"reference style (sort, {a.max_context}-ctx buffers)",
        lambda: reference_style_wanda(model, batches, a.sparsity, a.max_context),
    )
    base = results[0][3]
    total = sum(m.numel() for m in base.values())
    print(
        f"\nLlama-7B layer shapes x {a.layers} layers, {a.dtype}, calibration {a.nsamples}x{a.seqlen}, "
        f"CPU {a.threads} threads, torch {torch.__version__}\n"
    )
    print("| implementation | seconds | peak extra MiB | sparsity | masks equal to gradprobe |")
    print("|---|---:|---:|---:|---:|")
    for label, secs, peak, zeros in results:
        sp = sum(int(z.sum()) for z in zeros.values()) / total
        agree = sum(int((z == base[k]).sum()) for k, z in zeros.items()) / total
        print(f"| {label} | {secs:.2f} | {peak / 2**20:.0f} | {sp:.4f} | {agree:.6%} |")


if __name__ == "__main__":
    main()
