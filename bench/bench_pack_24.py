"""2:4 packer on CPU: gradprobe.pack_24 vs torch's CUTLASS converter and the compressed-tensors compressor.

    python bench/bench_pack_24.py                  # bf16 4096x11008, 2:4 sparse, CPU
    python bench/bench_pack_24.py --device cuda    # the CUDA packer vs torch's GPU conversions

Checked before timing: outputs bit-identical to the baseline they are compared with (packed + meta
vs ``sparse_semi_structured_from_dense_cutlass``; values + bitmask vs ``sparse24_bitmask_compress``).
Issue-4 target: pack (CUTLASS) >= 20x faster than torch's converter on CPU.

On CUDA (``--device cuda``; needs ``gradprobe._C`` built with CUDA, else the reference runs and the
backend column says so): ``gradprobe.pack_24`` vs torch's converter on the GPU,
``to_sparse_semi_structured`` (CUTLASS forced: the same layout, checked bit for bit) and
``torch._sparse_semi_structured_tile`` (torch's fused GPU prune + pack; it also writes the transposed
layout and chooses its own 2:4 pattern, so it is timed but not compared bit for bit).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import torch
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

import _harness as H  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe.ops import reference as ref  # noqa: E402


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def check_same(got, expected, what):
    def check():
        g = got()
        for a, b, name in zip(g, expected, ("values", "meta/bitmask"), strict=False):
            if not torch.equal(raw(a) if a.is_floating_point() else a, raw(b) if b.is_floating_point() else b):
                raise AssertionError(f"{what}: {name} differs from the baseline")

    return check


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x11008")
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    a = p.parse_args(argv)
    o, i = (int(x) for x in a.shape.lower().split("x"))
    torch.manual_seed(0)
    dense = torch.randn(o, i).to(torch.bfloat16)
    # exactly 2 nonzeros per group: compressed-tensors' topk picks padding zeros in an undefined order
    dense = dense.masked_fill(dense == 0, 1.0)
    scores = torch.rand(o, i)
    w = dense.masked_fill(ref.nm_rank_mask(scores, 2, 4), 0)
    problem = f"{o}x{i} bf16 2:4"
    nbytes = w.numel() * 2 + w.numel() + w.numel() // 8  # read W, write W/2 + metadata (~1/8 B per element)
    b = H.Bench("pack_24", a.device)
    print(b.header(), flush=True)
    kw = dict(problem=problem, dtype=w.dtype, nbytes=nbytes, budget_s=a.budget)
    if a.device == "cuda":
        bench_cuda(b, w.cuda(), dense.cuda(), scores.cuda(), kw)
        if not a.no_csv:
            print(f"\nappended {len(b.rows)} rows to {b.save_csv()}")
        return

    cutlass = sparse_semi_structured_from_dense_cutlass(w)
    b.run("torch sparse_semi_structured_from_dense_cutlass", lambda: sparse_semi_structured_from_dense_cutlass(w),
          mode="cutlass", min_reps=1, **kw)
    ours = lambda: gradprobe.pack_24(w)
    b.run("gradprobe.pack_24 cutlass", ours, mode="cutlass", check=check_same(ours, cutlass, "cutlass"),
          backend=H.backend_for("pack_24_cutlass", "cpu"), **kw)
    fused = lambda: gradprobe.pack_24(dense, scores=scores)
    b.run("gradprobe.pack_24 cutlass + scores (fused 2:4 mask)", fused, mode="cutlass",
          check=check_same(fused, cutlass, "cutlass+scores"), backend=H.backend_for("pack_24_cutlass", "cpu"), **kw)
    refc = lambda: ref.pack_24_cutlass(w, None)
    b.run("reference cutlass (plain torch)", refc, mode="cutlass", check=check_same(refc, cutlass, "reference"),
          backend="reference", min_reps=1, **kw)
    packed, meta = cutlass
    b.run("gradprobe.unpack_24 cutlass", lambda: gradprobe.unpack_24(packed, meta), mode="unpack",
          check=lambda: H.check_equal(gradprobe.unpack_24(packed, meta), w, "unpack"), **kw)

    ours_bm = lambda: gradprobe.pack_24(w, "bitmask")[:2]
    if importlib.util.find_spec("compressed_tensors") is not None:
        from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import (
            sparse24_bitmask_compress,
        )

        ct = sparse24_bitmask_compress(w)
        b.run("compressed-tensors sparse24_bitmask_compress", lambda: sparse24_bitmask_compress(w), mode="bitmask",
              min_reps=1, **kw)
        b.run("gradprobe.pack_24 bitmask", ours_bm, mode="bitmask", check=check_same(ours_bm, ct, "bitmask"),
              backend=H.backend_for("pack_24_bitmask", "cpu"), **kw)
    else:
        print("compressed-tensors not installed: bitmask baseline skipped (pip install 'gradprobe[test]')")
        b.run("gradprobe.pack_24 bitmask", ours_bm, mode="bitmask", backend=H.backend_for("pack_24_bitmask", "cpu"), **kw)
    print()
    print(b.table(vs={"cutlass": "torch sparse_semi_structured_from_dense_cutlass",
                      "bitmask": "compressed-tensors sparse24_bitmask_compress"}))
    print()
    print(H.target_line("pack_24 cutlass vs torch converter (CPU)",
                        b.ratio(problem, "torch sparse_semi_structured_from_dense_cutlass", "gradprobe.pack_24 cutlass"), 20))
    print(H.target_line("pack_24 bitmask vs compressed-tensors",
                        b.ratio(problem, "compressed-tensors sparse24_bitmask_compress", "gradprobe.pack_24 bitmask"), 1))
    if not a.no_csv:
        print(f"\nappended {len(b.rows)} rows to {b.save_csv()}")


def bench_cuda(b: H.Bench, w: torch.Tensor, dense: torch.Tensor, scores: torch.Tensor, kw: dict) -> None:
    """The CUDA packer (``csrc/pack_24.cu``) against torch's GPU conversions; see the module docstring."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    problem = kw["problem"]
    backend = H.backend_for("pack_24_cutlass", "cuda")
    if backend != "cpp":
        print(f"note: gradprobe._C has no CUDA packer here (backend: {backend}); timing that backend instead")
    conv = "torch sparse_semi_structured_from_dense_cutlass"
    cutlass = sparse_semi_structured_from_dense_cutlass(w)
    b.run(conv, lambda: sparse_semi_structured_from_dense_cutlass(w), mode="cutlass", **kw)
    ours = lambda: gradprobe.pack_24(w)
    b.run("gradprobe.pack_24 cutlass", ours, mode="cutlass", check=check_same(ours, cutlass, "cutlass"),
          backend=backend, **kw)
    fused = lambda: gradprobe.pack_24(dense, scores=scores)
    b.run("gradprobe.pack_24 cutlass + scores (fused 2:4 mask)", fused, mode="cutlass",
          check=check_same(fused, cutlass, "cutlass+scores"), backend=backend, **kw)
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = True
    try:
        def to_sst():
            t = to_sparse_semi_structured(w)
            return t.packed, t.meta

        b.run("torch to_sparse_semi_structured (CUTLASS)", to_sst, mode="cutlass",
              check=check_same(to_sst, cutlass, "to_sparse_semi_structured"), **kw)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced
    b.run("torch._sparse_semi_structured_tile (prune + pack, both layouts)",
          lambda: torch._sparse_semi_structured_tile(dense), mode="cutlass", **kw)
    packed, meta = cutlass
    b.run("gradprobe.unpack_24 cutlass", lambda: gradprobe.unpack_24(packed, meta), mode="unpack",
          check=lambda: H.check_equal(gradprobe.unpack_24(packed, meta), w, "unpack"), backend=backend, **kw)
    bm = lambda: gradprobe.pack_24(w, "bitmask")[:2]
    b.run("gradprobe.pack_24 bitmask", bm, mode="bitmask",
          check=check_same(bm, ref.pack_24_bitmask(w, None), "bitmask vs reference"),
          backend=H.backend_for("pack_24_bitmask", "cuda"), **kw)
    print()
    print(b.table(vs={"cutlass": conv, "bitmask": "gradprobe.pack_24 bitmask", "unpack": "gradprobe.unpack_24 cutlass"}))
    print()
    for base in (conv, "torch to_sparse_semi_structured (CUTLASS)",
                 "torch._sparse_semi_structured_tile (prune + pack, both layouts)"):
        print(H.target_line(f"pack_24 cutlass (CUDA) vs {base}", b.ratio(problem, base, "gradprobe.pack_24 cutlass"), 1))


if __name__ == "__main__":
    main()
