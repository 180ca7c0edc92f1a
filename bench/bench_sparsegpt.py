"""SparseGPT vs Wanda on the embedded SmolLM2-135M, side by side in one run at equal sparsity.

    HF_HUB_OFFLINE=1 python bench/bench_sparsegpt.py [--nsamples 16 --seqlen 256 --windows 16]

Calibration: ``nsamples`` x ``seqlen`` tokens of the embedded Wikipedia extract (seed 0); evaluation:
the first ``windows`` disjoint 256-token windows of the embedded ``lee_background`` text. Every run
starts from the same dense weights. Prints a markdown table (perplexity, achieved sparsity, prune
seconds) and writes it to ``bench/results/sparsegpt_table.md``.
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

OUT = Path(__file__).parent / "results"
RUNS = {
    "wanda 50% row": dict(method="wanda", sparsity=0.5),
    "sparsegpt 50% row": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt 50% layer": dict(method="sparsegpt", sparsity=0.5, scope="layer"),
    "wanda 2:4": dict(method="wanda", structure="2:4"),
    "sparsegpt 2:4": dict(method="sparsegpt", structure="2:4"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--out", type=Path, default=OUT / "sparsegpt_table.md")
    args = ap.parse_args()
    model, batches, dense, ppl = embedded_setup(args.nsamples, args.seqlen, args.windows)

    rows = [("dense", 0.0, ppl(), 0.0)]
    print(rows[-1], flush=True)
    for name in args.runs:
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        rep = gradprobe.prune(
            model, batches, nsamples=args.nsamples, seqlen=args.seqlen, progress=False, **RUNS[name]
        )
        secs = time.perf_counter() - t0
        rows.append((name, rep.sparsity, ppl(), secs))
        print(rows[-1], flush=True)
    lines = [
        "# SparseGPT vs Wanda: perplexity on the embedded SmolLM2-135M",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"calibration {args.nsamples} x {args.seqlen} tokens (embedded Wikipedia extract, seed 0), "
        f"perplexity on the first {args.windows} x 256 tokens of lee_background; one run, same dense start. "
        "Prune seconds on a shared, loaded CPU machine.",
        "",
        "| run | achieved sparsity | perplexity | prune s |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {s:.6f} | {p:.2f} | {t:.1f} |" for n, s, p, t in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
