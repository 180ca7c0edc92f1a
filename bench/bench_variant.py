"""Allocation evidence on the embedded SmolLM2-135M: perplexity of uniform / global / variant / OWL.

    HF_HUB_OFFLINE=1 python bench/bench_variant.py [--nsamples 16 --seqlen 256 --windows 64]

Calibration: ``nsamples`` x ``seqlen`` tokens of the embedded Wikipedia extract (gradprobe.data);
evaluation: the first ``windows`` disjoint 256-token windows of the embedded ``lee_background`` text.
Writes ``bench/results/allocation_table.md`` and one PNG per run in ``bench/results/allocation/``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _quality import embedded_setup  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe.allocation import owl_from_model, report_allocation
from gradprobe.variant import VariantMaskFn

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--methods", nargs="+", default=["uniform", "global", "variant", "owl", "owl-rescaled"])
    args = ap.parse_args()
    model, batches, dense_state, ppl = embedded_setup(args.nsamples, args.seqlen, args.windows)

    rows = [("dense", "-", 0.0, ppl(), 0.0, "")]
    print(rows[-1], flush=True)
    tables = []
    for s in args.sparsities:
        for method in args.methods:
            model.load_state_dict(dense_state)
            t0 = time.perf_counter()
            base = dict(nsamples=args.nsamples, seqlen=args.seqlen, progress=False)
            note = ""
            if method == "uniform":
                rep = gradprobe.prune(model, batches, sparsity=s, **base)
                alloc = report_allocation(rep, f"uniform {s}", s)
            elif method == "global":
                rep = gradprobe.prune(model, batches, sparsity=s, scope="global", **base)
                alloc = report_allocation(rep, f"global {s}", s)
            elif method == "variant":
                fn = VariantMaskFn(tol=1e-3)
                rep = gradprobe.prune(model, batches, sparsity=s, mask_fn=fn, **base)
                alloc = report_allocation(rep, f"variant {s}", s)
                alphas = [r.alpha for r in fn.results.values()]
                note = f"alpha {min(alphas):.3f}..{max(alphas):.3f}"
            else:  # owl (the published mapping) or owl-rescaled
                mapping = "published" if method == "owl" else "rescaled"
                owl = owl_from_model(model, batches, s, mapping=mapping)
                rep = gradprobe.prune(model, batches, owl.config(**base))
                owl.check(rep)
                alloc = owl
                ls = owl.layer_sparsity.values()
                note = f"m 5, lam 0.08, {mapping}; layers {min(ls):.3f}..{max(ls):.3f}"
            secs = time.perf_counter() - t0
            alloc.save_plot(OUT / "allocation" / f"{method}_{int(s * 100)}.png")
            tables.append(alloc.table())
            rows.append((method, s, rep.sparsity, ppl(), secs, note))
            print(rows[-1], flush=True)
    lines = [
        "# Allocation: perplexity on the embedded SmolLM2-135M-Instruct",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"calibration {args.nsamples} x {args.seqlen} tokens (embedded Wikipedia extract), perplexity on the "
        f"first {args.windows} x 256 tokens of lee_background. Sparsity over the 7 linears of all 30 decoder layers.",
        "",
        "| method | target | achieved sparsity | perplexity | prune s | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m, s, got, p, secs, note in rows:
        lines.append(f"| {m} | {s} | {got:.6f} | {p:.2f} | {secs:.1f} | {note} |")
    lines += ["", "## Per-layer tables", ""] + [t + "\n" for t in tables]
    (OUT / "allocation_table.md").write_text("\n".join(lines))
    print("\n".join(lines[: 6 + len(rows)]))


if __name__ == "__main__":
    main()
