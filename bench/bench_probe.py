"""Gradient probe on the embedded SmolLM2-135M: perplexity, achieved sparsity and time per method.

Methods: magnitude and Wanda (``gradprobe.prune``, the layerwise driver) and magnitude+probe /
Wanda+probe (``gradprobe.probe_prune_``); sparsity 50/60/70 %; then one threshold-tuning run of
``gradprobe.iterative.iterative_prune_`` (a failing step re-decided from the cached G0/G1).
Small on purpose (CPU): few calibration windows of ``--seqlen`` tokens, perplexity on the first
``--windows`` windows of 256 tokens of the embedded evaluation text.

    HF_HUB_OFFLINE=1 python bench/bench_probe.py --out bench/results/probe_table.md
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import gradprobe
from gradprobe.data import calibration_batches, eval_ids
from gradprobe.embedded import load_default_model
from gradprobe.eval import perplexity
from gradprobe.iterative import SparsitySchedule, ThresholdSearch, iterative_prune_
from gradprobe.probe import probe


def _sparsity(model) -> float:
    adapter = gradprobe.models.get_adapter(model)
    z = n = 0
    for layer in adapter.decoder_layers(model):
        for lin in adapter.prunable_linears(layer).values():
            z += int((lin.weight == 0).sum())
            n += lin.weight.numel()
    return z / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/probe_table.md")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--mode", default="model", choices=("model", "layerwise"))
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--skip-tuning", action="store_true")
    ap.add_argument("--only-tuning", action="store_true", help="append the tuning run to an existing --out")
    args = ap.parse_args()
    torch.manual_seed(0)
    _, tok = load_default_model()
    calib = calibration_batches(tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ids = eval_ids(tok)
    ppl = lambda m: perplexity(m, ids, context=256, max_windows=args.windows, progress=False).value  # noqa: E731
    lines = [
        f"Embedded SmolLM2-135M-Instruct (fp32, CPU {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), calibration {args.nsamples} x {args.seqlen} tokens (embedded enwiki), "
        f"perplexity on {args.windows} windows x 256 tokens of embedded lee_background. Probe: mode={args.mode}, "
        "r=0.1, tau=0, row scope. Sparsity = zeros / weights over all decoder linears.",
        "",
        "| method | target | achieved sparsity | perplexity | prune time (s) |",
        "|---|---|---|---|---|",
    ]
    out = Path(args.out)
    if args.only_tuning:
        lines = out.read_text().splitlines()
    else:
        model, _ = load_default_model()
        lines.insert(2, f"Dense perplexity: {ppl(model):.2f}\n")
        del model
    out.parent.mkdir(parents=True, exist_ok=True)
    for s in ([] if args.only_tuning else (float(x) for x in args.sparsities.split(","))):
        for name in ("magnitude", "wanda", "magnitude+probe", "wanda+probe"):
            model, _ = load_default_model()
            method = name.split("+")[0]
            t = time.perf_counter()
            if name.endswith("probe"):
                probe(model, calib, s, method=method, mode=args.mode)
            else:
                gradprobe.prune(model, calib if method == "wanda" else None, method=method, sparsity=s, progress=False)
            secs = time.perf_counter() - t
            row = f"| {name} | {s:.0%} | {_sparsity(model):.2%} | {ppl(model):.2f} | {secs:.1f} |"
            print(row, flush=True)
            lines.append(row)
            out.write_text("\n".join(lines) + "\n")
            del model
    if not args.skip_tuning:
        model, _ = load_default_model()
        t = time.perf_counter()
        res = iterative_prune_(
            model, calib, schedule=SparsitySchedule(0.5, 0.1, 0.6), evaluate=ppl, max_metric_drop=0.25,
            gradient_threshold=1.0, tune=ThresholdSearch(factor=0.5, max_trials=4), method="wanda", mode=args.mode,
        )
        total = time.perf_counter() - t
        lines += ["", "Iterative run (Wanda+probe, schedule 50 % -> 60 %, tau0 = 1.0, allowed perplexity rise 25 %, "
                  "search tau x0.5, 4 trials):", "",
                  "| step target | achieved | perplexity | tau | accepted | probe (s) | tuning (s) | tuning trials |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res.steps:
            lines.append(f"| {r.target:.0%} | {r.achieved:.2%} | {r.metric:.2f} | {r.tau} | {r.accepted} | "
                         f"{r.probe_seconds:.1f} | {r.tune_seconds:.1f} | {r.trials} |")
        lines.append(f"\nBaseline perplexity {res.baseline:.2f}; whole iterative run {total:.1f} s "
                     "(evaluation included; tuning re-decides from cached G0/G1, no gradient pass).")
        out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
