"""Gradient-probe ops: probe_apply_ (decide + restore + zero) and probe_accumulate_ (max |grad|).

    python bench/bench_probe_update.py                  # CPU: cpp vs reference, bf16 4096x11008
    python bench/bench_probe_update.py --device cuda    # CUDA: triton vs reference

Problem: a 4096x11008 bf16 weight (Llama-2-7B down_proj), 50 % random candidates, fp32 G0/G1 (as the
probe caches them), scale 1 + tau = 1.05. Checked before timing: weight bits and mask equal to
``gradprobe.ops.reference`` (apply), accumulator bits equal to the reference (accumulate). Both ops
are idempotent (apply restores from backup; max is idempotent), so repeated timed calls see the same
state. Baseline of accumulate: ``torch.maximum(acc, grad.abs(), out=acc)`` (the probe's accumulation before the fused op).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

import _harness as H  # noqa: E402

import gradprobe  # noqa: E402,F401  (registers the ops)
from gradprobe import _backend  # noqa: E402
from gradprobe.ops import reference as ref  # noqa: E402

SCALE = 1.05


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="4096x11008")
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    dev = a.device
    o, i = (int(x) for x in a.shape.lower().split("x"))
    torch.manual_seed(0)
    w0 = torch.randn(o, i, device=dev).to(torch.bfloat16)
    cand = torch.rand(o, i, device=dev) < 0.5
    backup = w0[cand]
    k = backup.numel()
    g0 = torch.rand(k, device=dev)
    g1 = g0 * (0.9 + 0.2 * torch.rand(k, device=dev))  # about half pruned at scale 1.05
    probed = w0.clone()
    probed[cand] = (probed[cand].float() * 0.1).to(torch.bfloat16)
    fast = "cpp" if dev == "cpu" else "triton"
    problem = f"{o}x{i} bf16 50% cand"
    b = H.Bench("probe_update", dev)
    print(b.header(), flush=True)

    def op_cases(op, inputs, fresh, verify, nbytes, mode):
        """Check (on ``fresh()`` inputs, by ``verify(out, args)``) then time gradprobe::op on each backend."""
        for backend in (fast, "reference"):
            def fn(backend=backend):
                with _backend.use_backend(backend):
                    return getattr(torch.ops.gradprobe, op)(*inputs())

            def check(backend=backend):
                args = fresh()
                with _backend.use_backend(backend):
                    verify(getattr(torch.ops.gradprobe, op)(*args), args, backend)

            b.run(f"{op} ({backend})", fn, problem=problem, dtype=torch.bfloat16, nbytes=nbytes, mode=mode,
                  check=check, backend=backend, budget_s=a.budget)

    # ---- apply ----
    n = w0.numel()
    want_w = probed.clone()
    want_m = ref.probe_apply_(want_w, cand, backup, g0, g1, SCALE)

    def verify_apply(m, args, backend):
        H.check_masks_equal(m, want_m, f"{backend} mask")
        H.check_equal(bits(args[0]), bits(want_w), f"{backend} weight bits")

    op_cases("probe_apply_",
             H.rotation(lambda: (probed.clone(), cand.clone(), backup.clone(), g0.clone(), g1.clone(), SCALE),
                        n * 3 + k * 10, dev, max_copies=3),
             lambda: (probed.clone(), cand, backup, g0, g1, SCALE), verify_apply,
             nbytes=2 * n + k * (2 + 4 + 4 + 2),  # read candidates, write mask, read backup/g0/g1, write W[T]
             mode="inplace")

    # ---- accumulate ----
    acc0 = torch.randn(o, i, device=dev).to(torch.bfloat16).abs()
    grad = torch.randn(o, i, device=dev).to(torch.bfloat16)
    want_acc = acc0.clone()
    ref.probe_accumulate_(want_acc, grad)
    acc_bytes = 3 * n * 2  # read acc and grad, write acc
    acc_inputs = H.rotation(lambda: (acc0.clone(), grad.clone()), 2 * n * 2, dev, max_copies=3)
    op_cases("probe_accumulate_", acc_inputs, lambda: (acc0.clone(), grad),
             lambda _, args, backend: H.check_equal(bits(args[0]), bits(want_acc), f"{backend} acc bits"),
             nbytes=acc_bytes, mode="accumulate")

    def old():
        x, g = acc_inputs()
        torch.maximum(x, g.abs(), out=x)

    def old_check():  # equal here: acc >= +0.0 and no NaN (the ops differ only for -0.0 / negative acc, NaN)
        x = acc0.clone()
        torch.maximum(x, grad.abs(), out=x)
        H.check_equal(bits(x), bits(want_acc), "torch.maximum acc bits")

    b.run("torch.maximum(acc, grad.abs())", old, problem=problem, dtype=torch.bfloat16, nbytes=acc_bytes,
          mode="accumulate", check=old_check, budget_s=a.budget)

    print()
    print(b.table(vs={"inplace": "probe_apply_ (reference)", "accumulate": "probe_accumulate_ (reference)"}))
    print()
    print(H.target_line(f"probe_apply_ {fast} vs reference",
                        b.ratio(problem, "probe_apply_ (reference)", f"probe_apply_ ({fast})"), 1))
    print(H.target_line(f"probe_accumulate_ {fast} vs torch.maximum(acc, grad.abs())",
                        b.ratio(problem, "torch.maximum(acc, grad.abs())", f"probe_accumulate_ ({fast})"), 1))
    if not a.no_csv:
        print(f"\nappended {len(b.rows)} rows to {b.save_csv()}")


if __name__ == "__main__":
    main()
