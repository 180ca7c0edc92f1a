"""Quality at equal achieved sparsity: every pruning method on the embedded SmolLM2-135M, one run.

    HF_HUB_OFFLINE=1 python bench/bench_quality.py [--nsamples 32 --seqlen 256 --windows 16]

Methods: magnitude, Wanda, the Wanda variant (cumulative-score cut), OWL (published mapping) + Wanda,
SparseGPT, and the gradient probe with ``target="exact"`` (the achieved count equals the requested one)
with the model loss (``mode="model"``) and the block-local loss (``mode="regional"``). Targets 50 %,
60 %, 70 % (per row) and 2:4. The probe, the variant and OWL are unstructured only (n/a at 2:4).

The dense model is loaded once; its state is restored before every run. Calibration: ``nsamples`` x
``seqlen`` tokens of the embedded Wikipedia extract (seed 0), the same batches for every method;
evaluation: the first ``windows`` disjoint 256-token windows of the embedded ``lee_background`` text.
Writes ``bench/results/quality_table.md`` and ``.csv`` (the CSV after every run, so an interrupted
run keeps what it measured). Prune seconds are wall time on whatever machine runs it (shared, loaded
CPUs here): compare them within one table only.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _quality import embedded_setup  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe.allocation import owl_from_model  # noqa: E402
from gradprobe.variant import VariantMaskFn  # noqa: E402

OUT = Path(__file__).parent / "results"
TARGETS = ("0.5", "0.6", "0.7", "2:4")
FIELDS = ["target", "method", "achieved_sparsity", "perplexity", "vs_wanda_pct", "prune_s", "note"]
UNSTRUCTURED_ONLY = {"Wanda variant": "the variant's cumulative cut is unstructured",
                     "OWL + Wanda": "OWL allocates unstructured layer budgets",
                     "probe (model loss, exact)": "restoring a candidate breaks N:M groups",
                     "probe (regional loss, exact)": "restoring a candidate breaks N:M groups"}


def _prune(model, batches, target: str, **kw) -> float:
    """gradprobe.prune at ``target`` (a fraction or "N:M"); returns the achieved sparsity."""
    if ":" in target:
        kw["structure"] = target
    else:
        kw["sparsity"] = float(target)
    if batches is not None:
        kw.update(nsamples=batches.shape[0], seqlen=batches.shape[1])
    rep = gradprobe.prune(model, batches, progress=False, **kw)
    return rep.sparsity


def _owl(model, batches, target: str) -> float:
    cfg = gradprobe.PruneConfig(nsamples=batches.shape[0], seqlen=batches.shape[1], progress=False)
    alloc = owl_from_model(model, batches, float(target), config=cfg)
    rep = gradprobe.prune(model, batches, alloc.config(nsamples=batches.shape[0], seqlen=batches.shape[1],
                                                       progress=False))
    return rep.sparsity


def _probe(model, batches, target: str, mode: str) -> float:
    masks = gradprobe.probe_prune_(model, batches, float(target), mode=mode, target="exact").masks
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


METHODS: dict[str, Callable[[torch.nn.Module, torch.Tensor, str], float]] = {
    "magnitude": lambda m, b, t: _prune(m, None, t, method="magnitude"),
    "Wanda": lambda m, b, t: _prune(m, b, t, method="wanda"),
    "Wanda variant": lambda m, b, t: _prune(m, b, t, method="wanda", mask_fn=VariantMaskFn()),
    "OWL + Wanda": _owl,
    "SparseGPT": lambda m, b, t: _prune(m, b, t, method="sparsegpt"),
    "probe (model loss, exact)": lambda m, b, t: _probe(m, b, t, "model"),
    "probe (regional loss, exact)": lambda m, b, t: _probe(m, b, t, "regional"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", type=Path, default=OUT / "quality_table")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (e.g. a run over other --targets has it)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="CSV",
                    help="no pruning: render one table from the CSVs of runs over different --targets / --methods")
    ap.add_argument("--note", default="", help="a sentence appended to the table's header (e.g. what was not run)")
    args = ap.parse_args()
    if args.merge:
        rows = []
        for path in args.merge:
            with open(path, newline="") as f:
                rows += [r for r in csv.DictReader(f) if r["method"] != "dense" or not any(
                    q["method"] == "dense" for q in rows)]
        wanda = {r["target"]: float(r["perplexity"]) for r in rows if r["method"] == "Wanda" and r["perplexity"]}
        for r in rows:  # relative to the Wanda row of the same target, whichever run measured it
            if r["perplexity"] and r["target"] in wanda:
                r["vs_wanda_pct"] = round(100.0 * (float(r["perplexity"]) / wanda[r["target"]] - 1.0), 1)
        order = {m: i for i, m in enumerate(["dense", *METHODS])}
        rows.sort(key=lambda r: (r["target"] != "dense", TARGETS.index(r["target"]) if r["target"] in TARGETS else -1,
                                 order.get(r["method"], len(order))))
        _write(args, rows)
        return
    model, batches, dense, ppl = embedded_setup(args.nsamples, args.seqlen, args.windows)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = args.out.with_suffix(".csv")
    rows: list[dict] = [] if args.no_dense else [
        {"target": "dense", "method": "dense", "achieved_sparsity": 0.0, "perplexity": ppl(), "vs_wanda_pct": "",
         "prune_s": 0.0, "note": ""}]

    def flush() -> None:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)

    print(rows, flush=True)
    for target in args.targets:
        wanda = None
        for name in args.methods:
            row = {"target": target, "method": name, "achieved_sparsity": "", "perplexity": "", "vs_wanda_pct": "",
                   "prune_s": "", "note": ""}
            if ":" in target and name in UNSTRUCTURED_ONLY:
                row["note"] = "n/a: " + UNSTRUCTURED_ONLY[name]
            else:
                model.load_state_dict(dense)
                t0 = time.perf_counter()
                try:
                    row["achieved_sparsity"] = METHODS[name](model, batches, target)
                except Exception as exc:  # one failing method must not lose the rest of the table
                    traceback.print_exc()
                    row["note"] = f"error: {type(exc).__name__}: {exc}"[:200]
                    rows.append(row)
                    flush()
                    continue
                row["prune_s"] = round(time.perf_counter() - t0, 1)
                row["perplexity"] = ppl()
                if name == "Wanda":
                    wanda = row["perplexity"]
                if wanda is not None:
                    row["vs_wanda_pct"] = round(100.0 * (row["perplexity"] / wanda - 1.0), 1)
            rows.append(row)
            flush()
            print(row, flush=True)
    model.load_state_dict(dense)
    _write(args, rows)


def _fmt(r: dict) -> str:
    if r["perplexity"] == "":
        return f"| {r['target']} | {r['method']} | – | – | – | – | {r['note']} |"
    vs = "" if r["vs_wanda_pct"] == "" else f"{float(r['vs_wanda_pct']):+.1f} %"
    return (f"| {r['target']} | {r['method']} | {float(r['achieved_sparsity']):.6f} | {float(r['perplexity']):.2f} | "
            f"{vs} | {float(r['prune_s']):.1f} | {r['note']} |")


def _write(args, rows: list[dict]) -> None:
    """Write the markdown table (and, when merging, the merged CSV) for ``rows``; print it."""
    if args.merge:
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)

    lines = [
        "# Quality at equal achieved sparsity: embedded SmolLM2-135M",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"calibration {args.nsamples} x {args.seqlen} tokens (embedded Wikipedia extract, seed 0, the same for "
        f"every method), perplexity on the first {args.windows} x 256 tokens of lee_background; one run, every "
        "method from the same dense weights. Per-row targets (OWL: per-layer budgets summing to the target). "
        "`vs Wanda` = perplexity relative to Wanda at the same target (negative = better). Prune seconds on "
        "a shared, loaded 2-core CPU machine."
        + (" Merged from runs over subsets of targets / methods (same settings and calibration, each from the "
           "dense weights, run concurrently: prune seconds depend on the load at the time)." if args.merge else "")
        + (" " + args.note if args.note else ""),
        "",
        "| target | method | achieved sparsity | perplexity | vs Wanda | prune s | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    lines += [_fmt(r) for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
