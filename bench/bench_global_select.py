"""Global (whole-model) exact selection over many tensors: gradprobe vs concatenate + kthvalue.

One command each:

    python bench/bench_global_select.py --read-pass-only   # CPU targets: 2 Llama-2-7B layers, fp32 + bf16

    python bench/bench_global_select.py                 # CPU: >= 1e9 bf16 scores (Llama-2-7B layers), memory report
    python bench/bench_global_select.py --device cuda   # GPU: a whole Llama-2-7B (6.5e9 scores), select + in-place mask
    pytest bench/bench_global_select.py -m benchmark --benchmark-enable   # pytest-benchmark cases (small)

Read-pass case (CPU, first): ``--read-pass-layers`` (default 2) distinct Llama-2-7B decoder layers
(14 tensors, 4.05e8 weights) in fp32 and bf16, magnitude and Wanda norms; gradprobe's global masks
(allocation of the bool masks included) are timed side by side with one read pass over the same
tensors (``torch.sum`` of each, timed before and after; the faster is the floor) and with concat +
``kthvalue`` (threshold only, and + masks). Targets: masks <= 4 read passes, >= 30x concat + kthvalue.

CPU inputs of the big group, to fit 24 GiB: one decoder layer of real Llama-2-7B linear shapes (7 distinct bf16
tensors, 2.0e8 weights, 0.4 GB) is generated once, and the global group is that layer's tensors
repeated BY REFERENCE ``--layers`` times (default: enough for >= 1e9 scores). The op still reads every
entry of the list (each entry is a separate pass over 0.4 GB, far above the caches), so time and
memory are those of 1e9 distinct scores; only the RAM for the weights is saved. (The in-place case
runs on the distinct tensors of one layer, since zeroing the same tensor twice is not a real model.)

The concat + ``kthvalue`` baseline needs 4 bytes per score for the concatenation plus kthvalue's
working copy, so it is measured on ``--baseline-layers`` layers (default 1: 2.0e8 scores) where it
fits; the ratio at 1e9 extrapolates its time linearly in the number of scores (kthvalue is a
linear-time selection) and the same-size ratio is reported beside it.

Correctness before timing: on the baseline size the gradprobe threshold must equal the baseline's
and the masks must equal the reference selection rule; on the big group every mask is verified in a
streaming pass against the exact characterisation of the contract (:func:`verify_global_masks`).
Memory: peak RSS growth during the call (``_harness.peak_memory_delta``) minus the outputs, as a
share of the scores' fp32 size (target <= 2%).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # bench helpers; the checkout's gradprobe if not installed

import _harness as H  # noqa: E402
import baselines as bl  # noqa: E402
from shapes import MODELS  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe.select import num_pruned  # noqa: E402

pytest = H.optional_pytest()
pytestmark = pytest.mark.benchmark if pytest is not None else []

SPARSITY = 0.5
# each gradprobe row is compared with the baseline producing the same output (the in-place op with
# the masks baseline, which does not even zero W)
SAME_OUTPUT_BASELINE = {
    "threshold": "concat + torch.kthvalue",
    "mask": "concat + kthvalue, masks score <= t",
    "inplace": "concat + kthvalue, masks score <= t",
}


def make_layer(model: str, dtype: torch.dtype, device: str, seed: int, scale: int = 1):
    """The 7 linears of one decoder layer of ``model`` (shapes divided by ``scale``) + fp32 norms."""
    g = torch.Generator(device=device).manual_seed(seed)
    ws, ns = [], []
    for o, i in MODELS[model].linears.values():
        o, i = o // scale, i // scale
        ws.append(torch.randn(o, i, generator=g, device=device, dtype=torch.float32).to(dtype))
        ns.append(torch.rand(i, generator=g, device=device) * 3)
    return ws, ns


def verify_global_masks(ws, ns, masks, k: int, thr: torch.Tensor, take: torch.Tensor) -> None:
    """Exact check of a global selection, one tensor at a time (O(largest tensor) memory).

    The masks are the k smallest scores with ties pruned in group order iff: exactly k pruned; no
    pruned score above the threshold and no kept score below it; among scores equal to the
    threshold the pruned ones come first in (tensor position, flat index) order and number ``take``.
    """
    t = float(thr)
    pruned = ties = 0
    kept_tie_seen = False
    for i, (w, m) in enumerate(zip(ws, masks, strict=True)):
        s = bl.score(w, ns[i] if ns else None).reshape(-1)
        mf = m.reshape(-1)
        pruned += int(mf.sum())
        if bool((mf & (s > t)).any()):
            raise AssertionError(f"masks[{i}] prunes a score above the threshold {t}")
        if bool((~mf & (s < t)).any()):
            raise AssertionError(f"masks[{i}] keeps a score below the threshold {t}")
        tie = mf[s == t]
        n = int(tie.sum())
        if n and (kept_tie_seen or not bool(tie[:n].all())):
            raise AssertionError(f"masks[{i}]: tied scores are not pruned in group order (lower index first)")
        kept_tie_seen |= n < tie.numel()
        ties += n
    if pruned != k or ties != int(take) or (k and ties == 0):
        raise AssertionError(
            f"pruned {pruned} (expected k={k}), ties pruned {ties} (expected take={int(take)})"
        )


def nbytes(ws, ns, mode: str) -> int:
    r = sum(w.numel() * w.element_size() for w in ws) + sum(n.numel() * 4 for n in ns)
    n = sum(w.numel() for w in ws)
    return {
        "floor": r,
        "threshold": r,
        "mask": r + n,
        "inplace": r + n + sum(w.numel() * w.element_size() for w in ws),
    }[mode]


def run_case(b: H.Bench, ws, ns, label: str, case: str, fn, mode: str, **kw) -> None:
    """One row for the group (ws, ns): ``nbytes`` from ``mode``, the dtype of ``ws[0]``."""
    b.run(case, fn, problem=label, dtype=ws[0].dtype, nbytes=nbytes(ws, ns, mode), mode=mode, **kw)


def bench_gradprobe(b: H.Bench, ws, ns, label: str, budget_s: float, extra: dict, check=None) -> None:
    """gradprobe's global threshold, then its masks, on one group (``check`` runs before the first)."""
    run_case(
        b,
        ws,
        ns,
        label,
        "gradprobe.kth_threshold(global)",
        lambda: gradprobe.kth_threshold(ws, SPARSITY, norm=ns, scope="global"),
        "threshold",
        backend=H.backend_for("global_threshold", b.device),
        check=check,
        budget_s=budget_s,
        extra=extra,
    )
    run_case(
        b,
        ws,
        ns,
        label,
        "gradprobe.global_prune_masks",
        lambda: gradprobe.global_prune_masks(ws, SPARSITY, norms=ns),
        "mask",
        backend=H.backend_for("global_mask", b.device),
        budget_s=budget_s,
        extra=extra,
    )


def bench_inplace(b: H.Bench, ws, ns, label: str, budget_s: float, extra: dict | None = None) -> None:
    """Select + in-place mask of the group; every call gets the weights restored (untimed)."""
    work = [w.clone() for w in ws]

    def restore():
        for x, w in zip(work, ws, strict=True):
            x.copy_(w)

    run_case(
        b,
        ws,
        ns,
        label,
        "gradprobe.global_prune_",
        lambda: gradprobe.global_prune_(work, SPARSITY, norms=ns),
        "inplace",
        setup=restore,
        backend=H.backend_for("global_prune_", b.device),
        budget_s=budget_s,
        extra=extra,
    )


def bench_baseline_size(b: H.Bench, ws, ns, label: str, budget_s: float, inplace: bool = True) -> None:
    """gradprobe vs concat + kthvalue on a group small enough for the baseline; checked first."""
    n = sum(w.numel() for w in ws)
    k = num_pruned(n, SPARSITY)
    extra = {"scores": n}

    def check():
        base = bl.global_concat_kthvalue_threshold(ws, ns, k)
        t = gradprobe.kth_threshold(ws, SPARSITY, norm=ns, scope="global")
        H.check_equal(t.value, base, "global threshold vs concat+kthvalue")
        verify_global_masks(ws, ns, gradprobe.global_prune_masks(ws, SPARSITY, norms=ns), k, t.value, t.take)

    bench_gradprobe(b, ws, ns, label, budget_s, extra, check)
    if inplace:
        bench_inplace(b, ws, ns, label, budget_s, extra)
    baselines = (
        ("concat + torch.kthvalue", bl.global_concat_kthvalue_threshold, "threshold"),
        ("concat + kthvalue, masks score <= t", bl.global_concat_kthvalue_masks, "mask"),
    )
    for case, fn, mode in baselines:
        run_case(
            b,
            ws,
            ns,
            label,
            case,
            lambda fn=fn: fn(ws, ns, k),
            mode,
            warmup=1,
            min_reps=2,
            budget_s=max(budget_s, 6.0),  # >= 2 timed calls of a ~5 s baseline
            extra=extra,
        )


def bench_big(b: H.Bench, ws, ns, label: str, budget_s: float, note: str) -> dict:
    """gradprobe on the big group: verify, measure extra memory, then time select and select + masks."""
    n = sum(w.numel() for w in ws)
    k = num_pruned(n, SPARSITY)
    scores_bytes = 4 * n

    t, mem_thr = H.peak_memory_delta(
        lambda: gradprobe.kth_threshold(ws, SPARSITY, norm=ns, scope="global"), b.device
    )
    masks, mem_mask = H.peak_memory_delta(
        lambda: gradprobe.global_prune_masks(ws, SPARSITY, norms=ns), b.device
    )
    verify_global_masks(ws, ns, masks, k, t.value, t.take)
    out_bytes = sum(m.numel() for m in masks)
    del masks
    mem = {
        "threshold_extra_bytes": mem_thr,
        "threshold_extra_pct_of_scores": 100.0 * mem_thr / scores_bytes,
        "masks_extra_bytes": mem_mask - out_bytes,
        "masks_extra_pct_of_scores": 100.0 * (mem_mask - out_bytes) / scores_bytes,
        "scores": n,
        "tensors": len(ws),
        "inputs": note,
    }
    bench_gradprobe(b, ws, ns, label, budget_s, mem)
    return mem


READ_PASS_CASE = "torch.sum (one read pass)"
READ_PASS_GOAL, KTHVALUE_GOAL = 4.0, 30.0


def bench_read_pass(b: H.Bench, model: str, layers: int, dtype: torch.dtype, use_norm: bool, budget_s: float,
                    scale: int = 1, baseline: bool = True) -> dict:
    """The global masks of ``layers`` distinct decoder layers (Llama-2-7B: 2 layers = 14 tensors,
    4.05e8 weights) measured side by side with one read pass over the same tensors (``torch.sum`` of
    each) and, if ``baseline``, with concat + ``kthvalue`` (~24 bytes per score of peak memory: the
    fp32 scores, their concatenation, kthvalue's copy and int64 indices); returns the target ratios
    (masks included). Without the baseline the masks are verified against the contract alone."""
    ws, ns = [], []
    for layer in range(layers):
        w, n = make_layer(model, dtype, b.device, seed=100 + layer, scale=scale)
        ws += w
        ns += n
    norms = ns if use_norm else None
    ns_rows = ns if use_norm else []
    total = sum(w.numel() for w in ws)
    k = num_pruned(total, SPARSITY)
    label = (f"{layers} layers{f' /{scale}' if scale > 1 else ''} {total:.3g} {H.DTYPE_NAMES[dtype]} "
             f"{'norm' if use_norm else 'magnitude'}")
    extra = {"scores": total, "tensors": len(ws)}

    def check():
        t = gradprobe.kth_threshold(ws, SPARSITY, norm=norms, scope="global")
        if baseline:
            H.check_equal(t.value, bl.global_concat_kthvalue_threshold(ws, norms, k), "threshold vs concat+kthvalue")
        masks = gradprobe.global_prune_masks(ws, SPARSITY, norms=norms)
        verify_global_masks(ws, ns_rows, masks, k, t.value, t.take)

    run_case(b, ws, ns_rows, label, READ_PASS_CASE, lambda: [w.sum() for w in ws], "floor",
             budget_s=budget_s, extra=extra)
    run_case(b, ws, ns_rows, label, "gradprobe.global_prune_masks",
             lambda: gradprobe.global_prune_masks(ws, SPARSITY, norms=norms), "mask",
             backend=H.backend_for("global_masks", b.device), check=check, budget_s=budget_s, extra=extra)
    run_case(b, ws, ns_rows, label, "gradprobe.kth_threshold(global)",
             lambda: gradprobe.kth_threshold(ws, SPARSITY, norm=norms, scope="global"), "threshold",
             backend=H.backend_for("global_threshold", b.device), budget_s=budget_s, extra=extra)
    # the read pass again, right after: the machine's load drifts, the floor is taken as the faster
    run_case(b, ws, ns_rows, label, READ_PASS_CASE + " again", lambda: [w.sum() for w in ws], "floor",
             budget_s=budget_s, extra=extra)
    for case, fn, mode in (
        ("concat + torch.kthvalue", bl.global_concat_kthvalue_threshold, "threshold"),
        ("concat + kthvalue, masks score <= t", bl.global_concat_kthvalue_masks, "mask"),
    ) if baseline else ():
        # one call, no warm-up: each call allocates its concatenation afresh (none is colder), and a
        # call takes seconds to tens of seconds
        run_case(b, ws, ns_rows, label, case, lambda fn=fn: fn(ws, norms, k), mode, warmup=0, min_reps=1,
                 budget_s=1.0, extra=extra)
    masks = b.get(label, "gradprobe.global_prune_masks").timing.median_ms
    floor = min(b.get(label, READ_PASS_CASE).timing.median_ms,
                b.get(label, READ_PASS_CASE + " again").timing.median_ms)
    return {
        "label": label,
        "read_passes": masks / floor,
        "vs_kthvalue_threshold": b.ratio(label, "concat + torch.kthvalue", "gradprobe.global_prune_masks"),
        "vs_kthvalue_masks": b.ratio(label, "concat + kthvalue, masks score <= t", "gradprobe.global_prune_masks"),
    }


def read_pass_targets(results: list[dict]) -> str:
    lines = ["Targets (global masks, masks included, each ratio from one run):"]
    for r in results:
        lines.append(H.target_line(f"{r['label']}: masks time / one read pass", r["read_passes"], READ_PASS_GOAL,
                                   at_most=True))
        if r["vs_kthvalue_threshold"] is not None:
            lines.append(H.target_line(f"{r['label']}: concat + kthvalue (threshold only) / masks",
                                       r["vs_kthvalue_threshold"], KTHVALUE_GOAL))
            lines.append(H.target_line(f"{r['label']}: concat + kthvalue + masks / masks",
                                       r["vs_kthvalue_masks"], KTHVALUE_GOAL))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--model", default="llama-2-7b", choices=sorted(MODELS))
    p.add_argument(
        "--min-scores", type=float, default=1e9, help="CPU: repeat the layer until the group has this many"
    )
    p.add_argument(
        "--layers", type=int, default=None, help="layers in the big group (CUDA default: the whole model)"
    )
    p.add_argument(
        "--baseline-layers", type=int, default=1, help="layers for the concat + kthvalue comparison"
    )
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed reps per case")
    p.add_argument("--scale", type=int, default=1, help="divide every shape by this (quick smoke runs)")
    p.add_argument("--force", action="store_true", help="run the big group even on the reference backend")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument(
        "--read-pass-layers", type=int, default=2,
        help="CPU: distinct layers of the read-pass / kthvalue target case (0 skips it)",
    )
    p.add_argument(
        "--read-pass-dtypes", default="fp32,bf16", help="dtypes of the read-pass case (each with and without norms)"
    )
    p.add_argument("--read-pass-only", action="store_true", help="run only the read-pass / kthvalue target case")
    p.add_argument(
        "--kthvalue-scale", type=int, default=1,
        help="read-pass case: measure concat + kthvalue on shapes divided by this (the full-size group is then "
        "timed against the read pass only; the baseline needs ~24 bytes per score)",
    )
    a = p.parse_args(argv)
    dev, model = a.device, MODELS[a.model]
    b = H.Bench("global_select", dev)
    print(b.header(), flush=True)

    targets = []
    if dev == "cpu" and a.read_pass_layers > 0:
        names = {v: k for k, v in H.DTYPE_NAMES.items()}
        for name in a.read_pass_dtypes.split(","):
            for use_norm in (False, True):
                full = a.kthvalue_scale <= 1
                targets.append(bench_read_pass(b, a.model, a.read_pass_layers, names[name], use_norm, a.budget,
                                               a.scale, baseline=full))
                if not full:
                    targets.append(bench_read_pass(b, a.model, a.read_pass_layers, names[name], use_norm,
                                                   a.budget, a.scale * a.kthvalue_scale))
    if a.read_pass_only:
        print()
        print(b.table(vs=SAME_OUTPUT_BASELINE))
        print()
        print(read_pass_targets(targets))
        if not a.no_csv:
            print(f"\nappended {len(b.rows)} rows to {b.save_csv()}")
        return

    # --- baseline size: distinct tensors -------------------------------------------------------
    base_ws, base_ns = [], []
    for layer in range(a.baseline_layers):
        w, n = make_layer(a.model, torch.bfloat16, dev, seed=layer, scale=a.scale)
        base_ws += w
        base_ns += n
    nb = sum(w.numel() for w in base_ws)
    base_label = f"{a.baseline_layers} layer(s) {nb:.3g} bf16"
    bench_baseline_size(b, base_ws, base_ns, base_label, a.budget)

    # --- big group -----------------------------------------------------------------------------
    if dev == "cuda":
        layers = a.layers or model.layers
        ws, ns = list(base_ws), list(base_ns)
        for layer in range(a.baseline_layers, layers):  # distinct tensors: a whole model fits in GPU memory
            w, n = make_layer(a.model, torch.bfloat16, dev, seed=layer, scale=a.scale)
            ws += w
            ns += n
        note = f"{layers} distinct layers"
    else:
        layers = a.layers or math.ceil(a.min_scores / sum(w.numel() for w in base_ws[:7]))
        ws = base_ws[:7] * layers
        ns = base_ns[:7] * layers
        note = f"1 layer x {layers} by reference"
    n_big = sum(w.numel() for w in ws)
    big_label = f"{layers} layers {n_big:.3g} bf16"
    backend = H.backend_for("global_threshold", dev)
    mem = None
    if backend == "reference" and not a.force:
        print(
            f"skipping the {n_big:.2e}-score group: the {backend} backend concatenates and sorts (use --force)"
        )
    else:
        mem = bench_big(b, ws, ns, big_label, a.budget, note)
        if dev == "cuda":
            bench_inplace(b, ws, ns, big_label, a.budget)  # CUDA: the whole model

    print()
    print(b.table(vs=SAME_OUTPUT_BASELINE))
    print()
    if targets:
        print(read_pass_targets(targets))
    print("Targets:")
    print(
        H.target_line(
            f"kth_threshold vs concat+kthvalue, same size ({base_label})",
            b.ratio(base_label, "concat + torch.kthvalue", "gradprobe.kth_threshold(global)"),
            30,
        )
    )
    big = b.get(big_label, "gradprobe.kth_threshold(global)")
    base = b.get(base_label, "concat + torch.kthvalue")
    if big and base:
        extrapolated = base.timing.median_ms * n_big / nb
        print(
            H.target_line(
                f"kth_threshold vs concat+kthvalue at {n_big:.2e} scores (baseline extrapolated linearly "
                f"to {extrapolated / 1e3:.1f} s)",
                extrapolated / big.timing.median_ms,
                30,
            )
        )
    if mem:
        print(
            f"- extra memory, select only: {mem['threshold_extra_bytes'] / 2**20:.1f} MiB = "
            f"{mem['threshold_extra_pct_of_scores']:.3f}% of the scores' fp32 size (target <= 2%)"
        )
        print(
            f"- extra memory, select + masks (outputs excluded): {mem['masks_extra_bytes'] / 2**20:.1f} MiB = "
            f"{mem['masks_extra_pct_of_scores']:.3f}% (target <= 2%)"
        )
    whole = b.get(big_label, "gradprobe.global_prune_")
    if whole:
        print(
            f"- whole-model select + in-place mask: {whole.timing.median_ms:.1f} ms (target ~15 ms on an H100)"
        )
    if not a.no_csv:
        print(f"\nappended {len(b.rows)} rows to {b.save_csv()}")


# ---- pytest-benchmark cases (run: pytest bench/bench_global_select.py -m benchmark --benchmark-enable) ----

if pytest is not None:

    @pytest.fixture(scope="module")
    def small_group():
        ws, ns = make_layer(
            "llama-2-7b", torch.bfloat16, "cpu", seed=0, scale=8
        )  # 3.2e6 scores over 7 tensors
        return ws, ns, num_pruned(sum(w.numel() for w in ws), SPARSITY)

    @pytest.mark.parametrize("impl", ["gradprobe.kth_threshold", "concat+kthvalue"])
    def test_global_threshold(benchmark, small_group, impl):
        ws, ns, k = small_group
        base = bl.global_concat_kthvalue_threshold(ws, ns, k)
        if impl == "gradprobe.kth_threshold":
            fn = lambda: gradprobe.kth_threshold(ws, SPARSITY, norm=ns, scope="global").value
        else:
            fn = lambda: bl.global_concat_kthvalue_threshold(ws, ns, k)
        H.check_equal(fn(), base, impl)
        benchmark.group = "global_select llama-2-7b/8 layer bf16"
        benchmark(fn)

    def test_global_prune_masks(benchmark, small_group):
        ws, ns, k = small_group
        t = gradprobe.kth_threshold(ws, SPARSITY, norm=ns, scope="global")
        verify_global_masks(ws, ns, gradprobe.global_prune_masks(ws, SPARSITY, norms=ns), k, t.value, t.take)
        benchmark.group = "global_select llama-2-7b/8 layer bf16"
        benchmark(gradprobe.global_prune_masks, ws, SPARSITY, norms=ns)


if __name__ == "__main__":
    main()
