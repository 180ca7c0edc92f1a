"""N:M (2:4) mask: gradprobe vs the Wanda reference's per-column Python loop and a vectorised topk.

    python bench/bench_nm_mask.py                      # CPU, bf16 4096x11008 with a Wanda norm, 2:4
    python bench/bench_nm_mask.py --nm 4:8 --shape 4096x4096

Checked before timing: gradprobe's mask equals ``gradprobe.ops.reference`` bit for bit; the loop and
topk baselines (no defined tie rule) prune exactly n per group and the same sorted pruned scores.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

import _harness as H  # noqa: E402
import baselines as bl  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe.ops import reference as ref  # noqa: E402


def pruned_profile(s: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group, the sorted pruned scores: equal for any correct selection whatever its tie order."""
    return torch.sort(torch.where(mask, s, torch.inf).reshape(-1, m), dim=1).values[:, :n]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x11008")
    p.add_argument("--nm", default="2:4")
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    o, i = (int(x) for x in a.shape.lower().split("x"))
    n, m = (int(x) for x in a.nm.split(":"))
    torch.manual_seed(0)
    w = torch.randn(o, i).to(torch.bfloat16)
    norm = torch.rand(i) * 3
    problem = f"{o}x{i} bf16 norm {n}:{m}"
    nbytes = w.numel() * (w.element_size() + 1)  # read W, write a bool mask
    b = H.Bench("nm_mask", "cpu")
    print(b.header(), flush=True)

    expected = ref.nm_rank_mask(ref.score(w, norm), n, m)
    s = ref.score(w, norm)
    profile = pruned_profile(s, expected, n, m)

    def check_exact(fn, what):
        return lambda: H.check_masks_equal(fn(), expected, what)

    def check_selection(fn, what):
        def check():
            got = fn()
            H.check_equal(got.reshape(-1, m).sum(1), torch.full((got.numel() // m,), n), f"{what} count")
            H.check_equal(pruned_profile(s, got, n, m), profile, f"{what} pruned scores")

        return check

    ours = lambda: gradprobe.prune_mask(w, None, norm=norm, structure=f"{n}:{m}")
    b.run("gradprobe.prune_mask", ours, problem=problem, dtype=w.dtype, nbytes=nbytes,
          check=check_exact(ours, "gradprobe"), backend=H.backend_for("nm_mask", "cpu"), budget_s=a.budget)
    refn = lambda: ref.nm_mask(w, norm, n, m)
    b.run("reference (stable sort, (-1,m) view)", refn, problem=problem, dtype=w.dtype, nbytes=nbytes,
          check=check_exact(refn, "reference"), backend="reference", budget_s=a.budget)
    tk = lambda: bl.nm_topk_mask(w, norm, n, m)
    b.run("vectorised topk ((-1,m) view)", tk, problem=problem, dtype=w.dtype, nbytes=nbytes,
          check=check_selection(tk, "topk"), budget_s=a.budget)
    loop = lambda: bl.nm_wanda_loop_mask(w, norm, n, m)
    b.run("Wanda per-column loop", loop, problem=problem, dtype=w.dtype, nbytes=nbytes,
          check=check_selection(loop, "Wanda loop"), budget_s=a.budget, min_reps=1, warmup=0)
    print()
    print(b.table(vs="Wanda per-column loop"))
    print()
    print(H.target_line("gradprobe vs Wanda per-column loop", b.ratio(problem, "Wanda per-column loop", "gradprobe.prune_mask"), 1))
    print(H.target_line("gradprobe vs vectorised topk", b.ratio(problem, "vectorised topk ((-1,m) view)", "gradprobe.prune_mask"), 1))
    if not a.no_csv:
        print(f"\nappended {len(b.rows)} rows to {b.save_csv()}")


if __name__ == "__main__":
    main()
