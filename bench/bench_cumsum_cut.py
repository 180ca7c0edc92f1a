"""The Wanda variant's per-row cumulative cut (``gradprobe::row_cumsum_cut``) on CPU: C++ vs reference.

    python bench/bench_cumsum_cut.py                  # 4096x11008 bf16 with Wanda norm
    python bench/bench_cumsum_cut.py --shape 576x1536 # a SmolLM2-135M MLP tensor

The variant bisects alpha, calling the cut ~10 times per tensor, so this op is the variant's cost.
Checked before timing: the C++ triple (threshold, take, pruned, total) equals the reference bit for bit.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

import _harness as H  # noqa: E402

import gradprobe  # noqa: E402, F401  (registers the ops)
from gradprobe._backend import use_backend  # noqa: E402


def cut(backend: str, w: torch.Tensor, norm: torch.Tensor, alpha: float):
    with use_backend(backend):
        return torch.ops.gradprobe.row_cumsum_cut(w, norm, alpha)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x11008")
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    o, i = (int(x) for x in a.shape.lower().split("x"))
    torch.manual_seed(0)
    w = torch.randn(o, i).to(torch.bfloat16)
    norm = torch.rand(i) * 3
    problem = f"{o}x{i} bf16 alpha={a.alpha}"
    nbytes = w.numel() * 2 + o * 28  # read W once, write the (fp32, 3 x int64) triple per row
    b = H.Bench("cumsum_cut", "cpu")
    print(b.header(), flush=True)
    kw = dict(problem=problem, dtype=w.dtype, nbytes=nbytes, budget_s=a.budget, mode="cut")

    def check():
        for name, x, y in zip(("threshold", "take", "pruned", "total"), cut("cpp", w, norm, a.alpha),
                              cut("reference", w, norm, a.alpha), strict=True):
            H.check_equal(x, y, name)

    b.run("gradprobe row_cumsum_cut (cpp)", lambda: cut("cpp", w, norm, a.alpha), check=check, backend="cpp", **kw)
    b.run("reference (torch histogram)", lambda: cut("reference", w, norm, a.alpha), backend="reference",
          min_reps=1, **kw)
    print()
    print(b.table(vs="reference (torch histogram)"))
    if not a.no_csv:
        print(f"\nappended {len(b.rows)} rows to {b.save_csv()}")


if __name__ == "__main__":
    main()
