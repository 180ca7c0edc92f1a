"""GradprobeModifier vs llm-compressor's own WandaPruningModifier, side by side in one run.

Same model (the embedded SmolLM2-135M, fp32), same calibration windows (embedded enwiki, fed in
order, batch 1), same sparsity, decoder linears only (Wanda gets ``ignore=["re:.*lm_head"]``: its
default also prunes the tied lm_head / embeddings). For each recipe: ``oneshot`` wall time, the
achieved sparsity of the decoder linears, perplexity on the embedded news text, and for the
prune -> GPTQ W4A16 (int4, group 64) recipes the sparsity left after GPTQ.

    /work/venv-llmc/bin/python bench/bench_llmcompressor.py --out bench/results/llmcompressor.md

Timings are wall clock on whatever machine runs it (the committed table says which).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

for _v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_v, "1")

import torch  # noqa: E402

DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
W4A16_G64 = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64},
    }
}


def decoder_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(tuple(f"{d}.weight" for d in DECODER))}


def sparsity(model) -> float:
    ws = decoder_weights(model).values()
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def table(rows: list[dict], notes: list[str], args, version: str) -> str:
    lines = [
        f"# GradprobeModifier vs WandaPruningModifier (llm-compressor {version})",
        "",
        f"Embedded SmolLM2-135M (fp32, CPU, {platform.machine()}, {os.cpu_count()} cores, shared and loaded: "
        "compare within the table, not across machines); calibration "
        f"{args.nsamples} x {args.seqlen} tokens of the embedded enwiki text in order, batch 1; target sparsity "
        f"{args.sparsity} of the decoder linears; perplexity on the embedded lee_background text, context 256, "
        f"{args.eval_windows} windows. Wanda gets ignore=['re:.*lm_head'] (its default prunes the tied lm_head).",
        "",
        "| recipe | oneshot s | decoder sparsity | lm_head sparsity | perplexity |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['seconds']:.1f} | {r['sparsity']:.4f} | {r['head']:.4f} | {r['ppl']:.2f} |")
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--no-gptq", action="store_true", help="skip the prune -> GPTQ recipes")
    p.add_argument("--out", default=None, help="write the Markdown table here")
    args = p.parse_args(argv)

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradprobe import data
    from gradprobe.embedded import default_model_dir
    from gradprobe.eval import perplexity
    from gradprobe.integrations.llmcompressor import GradprobeModifier

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    ids = data.calibration_batches(tok, None, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    eval_ids = data.eval_ids(tok, None)

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def ppl(model) -> float:
        return perplexity(model, eval_ids, context=256, max_windows=args.eval_windows, progress=False).value

    def run(label, recipe):
        model = load()
        t = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=recipe, processor=tok, num_calibration_samples=args.nsamples,
                max_seq_length=args.seqlen, shuffle_calibration_samples=False, batch_size=1)
        secs = time.perf_counter() - t
        row = {"recipe": label, "seconds": secs, "sparsity": sparsity(model), "ppl": ppl(model),
               "head": float((model.lm_head.weight == 0).float().mean())}
        print(row, flush=True)
        return row, model

    s = args.sparsity
    rows = [{"recipe": "dense", "seconds": 0.0, "sparsity": sparsity(load()), "ppl": ppl(load()), "head": 0.0}]
    notes: list[str] = []

    def write() -> None:  # after every row, so an interrupted run keeps what it measured
        text = table(rows, notes, args, llmcompressor.__version__)
        print(text, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)

    r, wanda = run("llm-compressor WandaPruningModifier", [WandaPruningModifier(sparsity=s, ignore=["re:.*lm_head"])])
    rows.append(r)
    write()
    r, ours = run("gradprobe GradprobeModifier(method='wanda')", [GradprobeModifier(sparsity=s)])
    rows.append(r)
    wa, wb = decoder_weights(wanda), decoder_weights(ours)
    agree = sum(int(((wa[n] == 0) == (wb[n] == 0)).sum()) for n in wa) / sum(w.numel() for w in wa.values())
    notes.append(f"Masks of the two pruning modifiers agree on {agree:.4%} of the decoder weights (llm-compressor "
                 "scores |W| sqrt(running mean of x^2), gradprobe |W| sqrt(sum of x^2): the same order up to "
                 "rounding, so only near-ties can flip).")
    write()
    del wanda, ours
    if not args.no_gptq:
        gptq = GPTQModifier(targets="Linear", config_groups=W4A16_G64, ignore=["lm_head"])
        rows.append(run("Wanda -> GPTQ W4A16 (g64)",
                        [WandaPruningModifier(sparsity=s, ignore=["re:.*lm_head"]), gptq])[0])
        write()
        gptq = GPTQModifier(targets="Linear", config_groups=W4A16_G64, ignore=["lm_head"])
        rows.append(run("GradprobeModifier -> GPTQ W4A16 (g64)", [GradprobeModifier(sparsity=s), gptq])[0])
        write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
