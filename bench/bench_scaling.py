"""Per-layer costs of one Llama-2-7B-shaped decoder layer, measured; 7B / 70B / 405B runs projected from them.

One random-init ``LlamaForCausalLM`` with a single decoder layer of Llama-2-7B's shape (hidden 4096,
intermediate 11008, 32 heads, vocab 32000, bf16; 202.4M parameters in the 7 linears) and a small random
calibration set (default 2 windows x 512 tokens; the projections add attention's share at 2048 tokens
analytically). Measured on this machine, each step as the layer loop (gradprobe/pipeline) runs it:

* dense forward: the layer over every window (batch size 1), no hooks - the forward that produces the
  next layer's inputs (the loop runs it once per layer, after pruning);
* stats forward: the same forward inside ``gradprobe.stats.LayerStats`` (per-window fp32 sums of squares
  of each distinct linear input) - the loop's first forward of every layer;
* select + mask: ``gradprobe.prune_`` on each of the 7 linears (Wanda norm, 50 %, scope row; and 2:4),
  in place, bf16;
* SparseGPT: the stats forward with ``hessian=True`` (the 4 distinct inputs' Hessians) and
  ``sparsegpt_prune_`` of q_proj (default; ``--sparsegpt-linears all`` for every linear) on one thread;
* the sha256s the loop computes: of the layer's bool masks (``distributed.masks_digest``, every rank under
  torch.distributed) and of the pruned linears (``tensors_digest``, every resume checkpoint);
* I/O: reading the layer from a safetensors file as ``--stream`` does (``safe_open`` + ``get_tensor``,
  every byte touched) with the file's pages dropped from the page cache first (``posix_fadvise``) and
  warm; the resume checkpoint (sha256 + ``safetensors.save_file`` + fsync + rename);
* end to end: ``gradprobe.prune`` on the one-layer model and ``prune_streamed`` from its saved checkpoint.

Checked before anything is written: every ``prune_`` and SparseGPT mask prunes exactly floor(s * in) per
row (2 of every 4 for 2:4); the layer read back equals the dense layer; ``gradprobe.prune`` produces exactly
the weights of the measured stats + select path; ``prune_streamed`` exactly those of ``gradprobe.prune``.

On a shared machine the 1-min load average (``os.getloadavg``) is recorded around every step, and the
process's CPU seconds per wall second (``CPU/wall``); single-threaded rates (sha256) used by the
projections are bytes per CPU second, so the load is divided out.

Projections (``projections_markdown``; docs/scaling.md explains them): model shapes, per-GPU device memory
(``device_memory``), host memory and disk, time per layer and in total for W ranks on one or several nodes
(``per_layer``), SparseGPT (``sparsegpt_per_layer``) and the gradient probe (``probe_model_mode``), from the
measured numbers and the hardware assumptions in ``ASSUME`` (none of them measured here).

Usage: python bench/bench_scaling.py [--nsamples 2] [--seqlen 512] [--reps 2] [--no-sparsegpt]
                                     [--sparsegpt-linears q_proj|all|a,b] [--no-e2e]
       python bench/bench_scaling.py --project-from bench/results/scaling.md   (projections only)
Writes bench/results/scaling.md (measured table, raw JSON, projections) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _harness import copy_bandwidth, peak_memory_delta  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000)
SPARSITY = 0.5


def load() -> float:
    return round(os.getloadavg()[0], 2)


T0 = time.perf_counter()
PEAK: dict[str, int] = {}


def progress(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s, load {load()}] {msg}", file=sys.stderr, flush=True)


CPU_S: dict[str, float] = {}


def timed(fn, reps: int = 1, name: str = "", peak: bool = False) -> tuple[float, list[float], tuple[float, float]]:
    """(median wall seconds, every rep's seconds, 1-min load before / after). The process's CPU seconds
    per rep (median) go to ``CPU_S[name]``: on a loaded machine CPU s / wall s is the share of the cores
    the step got. ``peak``: the first rep also records its peak extra host memory in ``PEAK[name]``."""
    progress(f"{name} x {reps}")
    before = load()
    times, cpu = [], []
    for r in range(reps):
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        if peak and r == 0:
            PEAK[name] = peak_memory_delta(fn, "cpu")[1]
        else:
            fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU_S[name] = statistics.median(cpu)
    return statistics.median(times), times, (before, load())


def drop_page_cache(path: Path) -> None:
    """Evict ``path``'s clean pages from the page cache (no root needed): the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The resume checkpoint's digest: gradprobe's own ``tensors_digest`` wherever this tree keeps it."""
    for mod in ("gradprobe._checkpoint", "gradprobe.pipeline.layerwise", "gradprobe.driver"):
        with contextlib.suppress(ImportError, AttributeError):
            return __import__(mod, fromlist=["tensors_digest"]).tensors_digest(tensors)
    raise ImportError("no gradprobe module exports tensors_digest")


def read_layer(src: Path, names: list[str], dtype: torch.dtype, touch: bool = False) -> dict[str, torch.Tensor]:
    """The layer's tensors as ``--stream`` reads them: ``safe_open`` (memory-mapped) + ``get_tensor``.

    ``get_tensor`` hands back tensors whose pages are read only when first used (on the GPU path: by the
    layer's host->device copy); ``touch`` copies every tensor once, as that first use does, so the time
    includes reading the bytes."""
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        out = {n: f.get_tensor(n).to(dtype) for n in names}
    return {n: t.clone() for n, t in out.items()} if touch else out


# ---- the measured table --------------------------------------------------------------------------------
LABELS = {
    "fwd": "dense forward (all windows)",
    "stats": "stats forward (LayerStats hooks, all windows)",
    "select_row": "select + mask, Wanda row 50 %, 7 linears (prune_)",
    "select_24": "select + mask, 2:4, 7 linears (prune_)",
    "masks_sha": "sha256 of the 7 bool masks (distributed.masks_digest)",
    "ckpt_sha": "sha256 of the 7 pruned linears (tensors_digest)",
    "hess": "stats + Hessian forward (SparseGPT, all windows)",
    "sgpt": "SparseGPT solve (1 thread)",
    "read_cold": "read the layer from safetensors, page cache dropped",
    "read_warm": "read the layer from safetensors, warm page cache",
    "ckpt_write": "checkpoint write (sha256 + save_file + fsync)",
    "e2e": "gradprobe.prune end to end (1-layer model)",
    "e2e_stream": "prune_streamed end to end (1-layer model, page cache dropped)",
}


def fwd_flops_per_token(linear_params: int, seqlen: int, hidden: int) -> float:
    """Forward FLOPs per token of one decoder layer: 2 x linear params (matmuls) + causal attention
    (scores and weighted sum: 2 x 2 x hidden x seqlen/2 on average over a window's positions)."""
    return 2 * linear_params + 2 * seqlen * hidden


def measured_markdown(raw: dict) -> str:
    m, st = raw["meta"], raw["steps"]
    H = m["shape"]["hidden_size"]
    tokens, lin_bytes = m["tokens"], 2 * m["linear_params"]
    flops = fwd_flops_per_token(m["linear_params"], m["seqlen"], H) * tokens
    lines = [
        "# Per-layer costs of one Llama-2-7B-shaped decoder layer (measured, CPU)",
        "",
        f"Written {m['date']} by `{' '.join(['python bench/bench_scaling.py', m['argv']]).strip()}`; gradprobe commit {m['commit'] or '?'} "
        f"(imported from {m['gradprobe']}); torch {m['torch']}; {m['cpu']} ({m['cores']} vCPUs"
        f"{', AMX-BF16' if m.get('amx_bf16') else ''}), "
        f"{m['threads']} torch threads, {m['mem_gib']:.0f} GiB; copy bandwidth measured at the end "
        f"{m['copy_bw_gbps']:.1f} GB/s. **Shared machine**: 1-min load average {m['load_start']} at the start, "
        f"{m['load_end']} at the end (per step below) with 2 vCPUs, so a step got only part of a core: the "
        f"`CPU/wall` column is the process's CPU seconds per wall second (2.0 = both cores). Bench wall time "
        f"{m['wall_s']:.0f} s.",
        "",
        f"Layer: hidden {H}, intermediate {m['shape']['intermediate_size']}, {m['shape']['num_attention_heads']} "
        f"heads (MHA), bf16, random init; {m['linear_params'] / 1e6:.1f}M parameters in the 7 prunable linears, "
        f"{m['layer_bytes'] / 2**20:.0f} MiB with the two norms. Calibration {m['nsamples']} x {m['seqlen']} = "
        f"{tokens} random tokens, batch size 1, SDPA attention; forward = {flops / 1e9:.0f} GFLOP "
        "(2 x linear params x tokens + causal attention).",
        "",
        "| step | median s | reps s | CPU/wall | per token | rate | load before -> after |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    fwd = st["fwd"]["median_s"]
    for k, v in st.items():
        med = v["median_s"]
        share = f"{v['cpu_s'] / med:.2f}" if med > 0 and v.get("cpu_s") else ""
        per_tok, rate = "", ""
        if k == "fwd":
            per_tok, rate = f"{med / tokens * 1e3:.2f} ms", f"{flops / med / 1e9:.0f} GFLOP/s"
        elif k in ("stats", "hess"):
            per_tok, rate = f"{med / tokens * 1e3:.2f} ms", f"{med / fwd:.2f} x dense forward"
        elif k.startswith("select"):
            rate = f"{lin_bytes / med / 1e9:.2f} GB/s of bf16 weights"
        elif k == "masks_sha":
            rate = f"{m['linear_params'] / med / 1e9:.2f} GB/s"
        elif k in ("ckpt_sha", "ckpt_write"):
            rate = f"{lin_bytes / med / 1e9:.2f} GB/s"
        elif k.startswith("read"):
            rate = f"{m['layer_bytes'] / med / 1e9:.2f} GB/s"
        elif k == "sgpt":
            fl = sum(o * i * i for o, i in m["sparsegpt_linears"].values())
            cols = sum(i for _, i in m["sparsegpt_linears"].values())
            rate = f"{med / cols * 1e3:.1f} ms per column, {fl / med / 1e9:.2f} GFLOP/s"
        label = LABELS.get(k, k)
        if k == "sgpt":
            label += " of " + ", ".join(n.rsplit(".", 1)[-1] for n in m["sparsegpt_linears"])
        reps = ", ".join(f"{t:.3f}" for t in v["reps_s"])
        lines.append(f"| {label} | {med:.3f} | {reps} | {share} | {per_tok} | {rate} | {v['load'][0]} -> {v['load'][1]} |")
    pk = m["peak_extra_bytes"]
    lines += [
        "",
        "Per linear, select + mask (Wanda row 50 %, median ms): "
        + ", ".join(f"{n.rsplit('.', 1)[-1]} {t:.0f}" for n, t in raw["per_linear_select_ms"].items()) + ".",
        "",
        f"Peak extra host memory (VmHWM - VmRSS before) of the stats forward: {pk.get('stats', 0) / 2**20:.0f} MiB"
        + (f"; of the stats + Hessian forward: {pk['hess'] / 2**20:.0f} MiB (the 4 fp32 Hessians alone: "
           f"{4 * (3 * H * H + m['shape']['intermediate_size'] ** 2) / 2**20:.0f} MiB)" if "hess" in pk else "")
        + f". Calibration buffers (inputs + outputs): {m['calib_buffer_bytes'] / 2**20:.0f} MiB.",
        "",
        "Checked before this table was written: exact per-row counts (Wanda row, SparseGPT) and 2 of every 4 "
        "(2:4) in every linear; the layer read back from safetensors equals the dense layer; where the end-to-end "
        "rows ran, `gradprobe.prune` gives exactly the weights of the measured stats + select path and "
        "`prune_streamed` exactly those of `gradprobe.prune`. The end-to-end rows include the calibration "
        "capture, the report and (streamed) the output written and fsynced (embeddings + lm_head + the layer, "
        "~0.9 GiB) with the checkpoint verified again.",
        "",
        "Raw numbers (input of the projections below; `python bench/bench_scaling.py --project-from "
        "bench/results/scaling.md` recomputes them):",
        "",
        "```json",
        json.dumps(raw, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


# ---- projections ------------------------------------------------------------------------------------------
MODELS = {  # decoder shapes (config.json of each release)
    "Llama-2-7B": dict(layers=32, hidden=4096, inter=11008, heads=32, kv=32, vocab=32000),
    "Llama-2-70B": dict(layers=80, hidden=8192, inter=28672, heads=64, kv=8, vocab=32000),
    "Llama-3.1-405B": dict(layers=126, hidden=16384, inter=53248, heads=128, kv=8, vocab=128256),
}
CALIB = (128, 2048)  # nsamples x seqlen of the target run (the CLI defaults)
BATCH = 8  # CLI --batch-size default: windows per layer forward
ASSUME = {  # one H100 SXM 80 GB per rank; every number an assumption, none measured here
    "bf16_flops": 400e12,  # effective dense bf16 matmul throughput (peak 989e12)
    "fp32_flops": 50e12,  # fp32 matmul as torch runs it by default (TF32 off for matmul; peak 67e12)
    "hbm": 2.0e12,  # effective bytes/s of memory-bound passes (peak 3.35e12)
    "select_passes": 6,  # select + mask = 6 read passes over the bf16 weights (CPU: 2-6, bench/README.md)
    "pcie": 25e9,  # host <-> device per GPU (PCIe Gen5 x16, effective)
    "nvme": 3e9,  # reading the source shards
    "disk_write": 2e9,  # checkpoints and output
    "nvlink": 150e9,  # all-gather bus bandwidth inside a node
    "net": 25e9,  # all-gather bandwidth per GPU across nodes (200 Gb/s NIC per GPU)
    "lat_intra": 20e-6,  # per collective, inside a node
    "lat_inter": 60e-6,  # per collective, across nodes
    "launch": 10e-6,  # per small kernel incl. Python (the SparseGPT column loop, per-window statistics)
    "gpu_mem": 80e9,
}


def model_shape(c: dict) -> dict:
    H, F, hd = c["hidden"], c["inter"], c["hidden"] // c["heads"]  # F: the MLP's intermediate size
    kvd = c["kv"] * hd
    lin = {"q": (H, H), "k": (kvd, H), "v": (kvd, H), "o": (H, H), "gate": (F, H), "up": (F, H), "down": (H, F)}
    p_lin = sum(o * i for o, i in lin.values())
    total = c["layers"] * (p_lin + 2 * H) + 2 * c["vocab"] * H + H  # + embeddings, lm_head, final norm
    return dict(c, H=H, F=F, kvd=kvd, lin=lin, p_lin=p_lin, layer_bytes=2 * (p_lin + 2 * H), total=total,
                sum_in=sum(i for _, i in lin.values()), distinct_in=[H, H, H, F])


def per_layer(s: dict, W: int = 1, nodes: int = 1, stream: bool = False, sha_gbps: float = 1.0,
              masks_sha_gbps: float = 1.0) -> dict[str, float]:
    """Projected seconds per decoder layer on W ranks (one H100 each) over ``nodes`` nodes (ASSUME)."""
    a, (N, L) = ASSUME, CALIB
    n_loc = -(-N // W)
    t_loc = n_loc * L
    out = {
        "forwards (stats + output)": 2 * t_loc * fwd_flops_per_token(s["p_lin"], L, s["H"]) / a["bf16_flops"],
        "statistics hooks": t_loc * sum(s["distinct_in"]) * 12 / a["hbm"] + n_loc * 4 * 4 * a["launch"],
        "select + mask": a["select_passes"] * 2 * s["p_lin"] / a["hbm"],
        "layer to device and back": 2 * s["layer_bytes"] / a["pcie"],
        "read layer (stream)": s["layer_bytes"] / a["nvme"] if stream else 0.0,
        "checkpoint (sha256 + write, rank 0)": 2 * s["p_lin"] / (sha_gbps * 1e9) + 2 * s["p_lin"] / a["disk_write"],
    }
    if W > 1:
        bw, lat = (a["nvlink"], a["lat_intra"]) if nodes == 1 else (a["net"], a["lat_inter"])
        out["all-gather of per-window partials"] = n_loc * W * s["sum_in"] * 4 / bw + 45 * lat
        out["masks sha256 on every rank"] = s["p_lin"] / a["pcie"] + s["p_lin"] / (masks_sha_gbps * 1e9)
    return out


def sparsegpt_per_layer(s: dict) -> dict[str, float]:
    a, (N, L) = ASSUME, CALIB
    hess = N * L * 2 * sum(i * i for i in s["distinct_in"]) / a["fp32_flops"]
    solve_flops = sum(o * i * i for o, i in s["lin"].values()) + sum(4 / 3 * i**3 for i in s["distinct_in"])
    return {"Hessian accumulation (fp32 matmul)": hess,
            "solve: block updates + factorisations (fp32)": solve_flops / a["fp32_flops"],
            "solve: column loop launches (~8 per column)": s["sum_in"] * 8 * a["launch"]}


def probe_model_mode(s: dict, W: int = 1) -> dict[str, float]:
    """The gradient probe in model mode with the model in host memory and ``device`` a GPU (its streamed
    backward): per gradient pass (G0 or G1), every one of the ``N / W`` windows of a rank is one batch;
    each batch runs a no-grad forward of every layer, the head, and per layer a recomputed forward and its
    backward (~2 forwards), each layer visiting the device twice (forward, backward)."""
    a, (N, L) = ASSUME, CALIB
    n_loc = -(-N // W)
    head = 2 * s["vocab"] * s["H"]
    per_tok = s["layers"] * fwd_flops_per_token(s["p_lin"], L, s["H"]) + head
    out = {
        "compute (4 forwards' FLOPs)": 4 * n_loc * L * per_tok / a["bf16_flops"],
        "weights host -> device (2 per layer per window)": n_loc * 2 * 2 * s["total"] / a["pcie"],
    }
    if W > 1:  # max |grad| of every probed weight: an all-reduce (MAX) of the bf16 statistics per pass
        out["all-reduce MAX of the statistics"] = 2 * 2 * s["layers"] * s["p_lin"] / a["nvlink"]
    return out


def device_memory(s: dict, W: int = 1, sparsegpt: bool = False) -> dict[str, float]:
    (N, L) = CALIB
    n_loc = -(-N // W)
    b = min(BATCH, n_loc)
    H, F = s["H"], s["F"]
    out = {
        "one layer (bf16)": s["layer_bytes"],
        "calibration buffers 2 x (N/W) x L x H bf16": 2 * n_loc * L * H * 2,
        f"forward temporaries (batch {b}) + one window's fp32 statistics": b * L * (3 * F + 4 * H + 2 * s["kvd"]) * 2
        + 2 * L * F * 4,
        "the 7 bool masks of the layer": s["p_lin"],
    }
    if W > 1:
        out["all-gather buffers (largest linear input)"] = 2 * W * n_loc * F * 4
    if sparsegpt:
        sq = sum(i * i for i in s["distinct_in"])
        out["Hessians + cached inverse factors (fp32)"] = 2 * 4 * sq
        out["factorisation temporaries (largest input) + fp32 weight copy"] = 3 * 4 * F * F + 2 * 4 * H * F
    return out


def gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB" if x >= 1e9 else f"{x / 1e6:,.0f} MB"


def secs(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 60:
        return f"{x / 60:.1f} min"
    return f"{x:.2f} s" if x >= 0.01 else f"{x * 1e3:.1f} ms"


def projections_markdown(raw: dict) -> str:
    m, st = raw["meta"], raw["steps"]
    a, (N, L) = ASSUME, CALIB
    # single-core rates of the CPU-bound steps: bytes per CPU second (the machine's load divided out)
    sha = 2 * m["linear_params"] / st["ckpt_sha"]["cpu_s"] / 1e9 if st.get("ckpt_sha", {}).get("cpu_s") else 0.5
    msha = m["linear_params"] / st["masks_sha"]["cpu_s"] / 1e9 if st.get("masks_sha", {}).get("cpu_s") else 0.5
    shapes = {k: model_shape(c) for k, c in MODELS.items()}
    lines = [
        "## Projections (computed, not measured)",
        "",
        f"**Projection.** Target run: {N} x {L} calibration tokens, bf16, one H100 SXM 80 GB per rank. Assumptions: "
        + "; ".join(f"{k} = {v:g}" for k, v in a.items())
        + f"; sha256 {sha:.2f} GB/s (tensors) and {msha:.2f} GB/s (masks) = this CPU's measured bytes per CPU "
        "second (one core, load divided out). Formulas: `bench/bench_scaling.py` (`per_layer`, `device_memory`, "
        "`sparsegpt_per_layer`).",
        "",
        "| model | layers | params | linear params / layer | layer bf16 | model bf16 | calibration buffers (W=1) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, s in shapes.items():
        lines.append(f"| {k} | {s['layers']} | {s['total'] / 1e9:.1f} B | {s['p_lin'] / 1e6:,.0f} M | "
                     f"{gb(s['layer_bytes'])} | {gb(2 * s['total'])} | {gb(2 * N * L * s['H'] * 2)} |")
    # this CPU, scaled by FLOPs / bytes from the measured 7B-shaped layer
    f7 = fwd_flops_per_token(m["linear_params"], m["seqlen"], m["shape"]["hidden_size"]) * m["tokens"]
    lines += ["", "This CPU, measured 7B-layer costs scaled (forward by FLOPs, select and sha256 by bytes; "
              f"load {m['load_start']}-{m['load_end']}):", "",
              "| model | one layer: 2 forwards over 128 x 2048 | select + mask | checkpoint write | all layers |",
              "|---|---:|---:|---:|---:|"]
    for k, s in shapes.items():
        fw = 2 * st["fwd"]["median_s"] * fwd_flops_per_token(s["p_lin"], L, s["H"]) * N * L / f7
        se = st["select_row"]["median_s"] * s["p_lin"] / m["linear_params"]
        ck = st["ckpt_write"]["median_s"] * s["p_lin"] / m["linear_params"]
        lines.append(f"| {k} | {secs(fw)} | {secs(se)} | {secs(ck)} | {secs(s['layers'] * (fw + se + ck))} |")
    lines += ["", "Per GPU device memory (Wanda / magnitude; SparseGPT only with W = 1):", "",
              "| model | W | layer | calibration buffers | temporaries | masks | gather | SparseGPT extra | total |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, s in shapes.items():
        for W in (1, 8):
            d = device_memory(s, W)
            vals = list(d.values())
            g = d.get("all-gather buffers (largest linear input)", 0)
            tot = sum(vals)
            row = f"| {k} | {W} | {gb(vals[0])} | {gb(vals[1])} | {gb(vals[2])} | {gb(vals[3])} | {gb(g) if g else '-'}"
            if W == 1:
                sg = device_memory(s, 1, sparsegpt=True)
                extra = sum(sg.values()) - tot
                row += f" | {gb(extra)} | {gb(tot)} (SparseGPT {gb(tot + extra)}) |"
            else:
                row += f" | - | {gb(tot)} |"
            lines.append(row)
    lines += ["", "Host memory per rank and disk:", "",
              "| model | host, in memory (per rank) | host, --stream (per rank) | source | checkpoints | output | disk peak |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for k, s in shapes.items():
        ckpt = s["layers"] * 2 * s["p_lin"]
        lines.append(f"| {k} | {gb(2 * s['total'] + 0.5e9)} | {gb(2 * s['layer_bytes'] + 0.5e9)} | {gb(2 * s['total'])} | "
                     f"{gb(ckpt)} | {gb(2 * s['total'])} | {gb(4 * s['total'] + ckpt)} |")
    lines += ["", "Time per layer and in total (Wanda row; W ranks x 1 GPU, `nodes` nodes):", ""]
    cols = list(per_layer(shapes["Llama-2-70B"], W=8).keys())
    lines += ["| model | W (nodes) | mode | " + " | ".join(cols) + " | per layer | all layers | output write | total |",
              "|---|---|---|" + "---:|" * (len(cols) + 4)]
    for k, s in shapes.items():
        for W, nodes in ((1, 1), (8, 1), (16, 2), (32, 4)):
            for stream in (False, True):
                t = per_layer(s, W, nodes, stream, sha, msha)
                per = sum(t.values())
                if stream:  # output: checkpoints verified and read again, every shard written
                    outw = s["layers"] * (2 * s["p_lin"] / (sha * 1e9) + 2 * s["p_lin"] / a["nvme"]) + 2 * s["total"] / a["disk_write"]
                else:
                    outw = 2 * s["total"] / a["disk_write"]
                cells = " | ".join(secs(t.get(c, 0.0)) if t.get(c, 0.0) else "-" for c in cols)
                lines.append(f"| {k} | {W} ({nodes}) | {'stream' if stream else 'in memory'} | {cells} | {secs(per)} | "
                             f"{secs(s['layers'] * per)} | {secs(outw)} | {secs(s['layers'] * per + outw)} |")
    lines += ["", "SparseGPT (one process; refused under torch.distributed), per layer, added to the Wanda row above:", "",
              "| model | " + " | ".join(sparsegpt_per_layer(shapes["Llama-2-7B"])) + " | per layer | all layers |",
              "|---|" + "---:|" * 5]
    for k, s in shapes.items():
        t = sparsegpt_per_layer(s)
        lines.append(f"| {k} | " + " | ".join(secs(v) for v in t.values())
                     + f" | {secs(sum(t.values()))} | {secs(s['layers'] * sum(t.values()))} |")
    lines += ["", "Gradient probe, model mode, model in host memory, one window per batch (per gradient pass; a run "
              "is a G0 and a G1 pass), W ranks on one node:", "",
              "| model | W | " + " | ".join(probe_model_mode(shapes["Llama-2-7B"], 8)) + " | per pass | "
              "boundary activations of one window (device) | host: model + probe cache (~10.4 B/param, target exact) |",
              "|---|---:|" + "---:|" * 6]
    for k, s in shapes.items():
        for W in (1, 8):
            t = probe_model_mode(s, W)
            cells = " | ".join(secs(t.get(c, 0.0)) if t.get(c) else "-" for c in probe_model_mode(s, 8))
            lin_total = s["layers"] * s["p_lin"]
            lines.append(f"| {k} | {W} | {cells} | {secs(sum(t.values()))} | {gb(s['layers'] * L * s['H'] * 2)} | "
                         f"{gb(2 * s['total'] + 10.4 * lin_total)} per rank |")
    return "\n".join(lines) + "\n"


def raw_from_results(path: Path) -> dict:
    """The raw JSON block of a results file written by this bench."""
    text = path.read_text()
    a = text.index("```json\n") + len("```json\n")
    return json.loads(text[a : text.index("```", a)])



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of the cheap steps (median)")
    ap.add_argument("--no-sparsegpt", action="store_true")
    ap.add_argument("--sparsegpt-linears", default="q_proj",
                    help="linears whose SparseGPT solve is timed: comma list or 'all' (minutes on a loaded 2-core CPU)")
    ap.add_argument("--no-e2e", action="store_true", help="skip gradprobe.prune / prune_streamed end to end")
    ap.add_argument("--out", default=str(HERE / "results" / "scaling.md"))
    ap.add_argument("--project-from", metavar="RESULTS_MD",
                    help="print the projections from an earlier run's results file (no measurement)")
    args = ap.parse_args()
    if args.project_from:
        print(projections_markdown(raw_from_results(Path(args.project_from))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import LlamaConfig, LlamaForCausalLM

    import gradprobe
    from gradprobe import distributed
    from gradprobe.models import get_adapter
    from gradprobe.stats import LayerStats

    t_start = time.perf_counter()
    load_start = load()
    dtype = torch.bfloat16
    N, L = args.nsamples, args.seqlen
    tokens = N * L
    cfg = LlamaConfig(**SHAPE, num_hidden_layers=1, max_position_embeddings=max(L, 4096),
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16: half the memory and time of an fp32 init + cast
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    linears = adapter.prunable_linears(layer)
    names = list(linears)
    layer_params = sum(p.numel() for p in layer.parameters())
    linear_params = sum(lin.weight.numel() for lin in linears.values())
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    dense = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    batches = torch.randint(0, SHAPE["vocab_size"], (N, L), generator=torch.Generator().manual_seed(1))

    def restore() -> None:
        for n, lin in linears.items():
            lin.weight.data.copy_(dense[n])

    res: dict = {}
    sg: dict[str, float] = {}
    with torch.no_grad():
        inps = model.get_input_embeddings()(batches)  # (N, L, H) bf16: the layer-0 inputs
        outs = torch.empty_like(inps)
        kw = adapter.layer_forward_kwargs(model, inps[:1], None, None, layer_idx=0)

        def run_layer(dst):
            for b in range(N):
                out = adapter.layer_output(layer(inps[b : b + 1], **kw))
                if dst is not None:
                    dst[b : b + 1].copy_(out)

        progress(f"model built ({layer_params / 1e6:.1f}M parameters in the layer); warm-up forward")
        run_layer(None)  # warm-up (oneDNN primitives, allocator)
        res["fwd"] = timed(lambda: run_layer(outs), args.reps, "fwd")

        holder = {}

        def stats_forward():
            with LayerStats(linears) as st:
                run_layer(None)
            holder["norms"] = st.norms()

        res["stats"] = timed(stats_forward, args.reps, "stats", peak=True)
        norms = holder["norms"]

        # check: exact per-row counts (Wanda row) and 2 of every 4 (2:4), before timing
        masks = {n: gradprobe.prune_(lin.weight.data, SPARSITY, norm=norms[n], scope="row") for n, lin in linears.items()}
        for n, m in masks.items():
            k = int(SPARSITY * m.shape[1])
            assert m.sum(dim=1).eq(k).all(), f"{n}: per-row count is not floor(s * in) = {k}"
        wanda_weights = {n: lin.weight.detach().clone() for n, lin in linears.items()}
        restore()
        m24 = {n: gradprobe.prune_(lin.weight.data, None, norm=norms[n], structure="2:4") for n, lin in linears.items()}
        for n, m in m24.items():
            assert m.reshape(m.shape[0], -1, 4).sum(-1).eq(2).all(), f"{n}: 2:4 groups do not prune exactly 2"
        restore()

        del m24
        per_linear: dict[str, list[float]] = {n: [] for n in names}

        def time_select(structure: str | None) -> tuple[float, list[float], tuple[float, float]]:
            """Sum over the 7 linears of the in-place select + mask time (the restore copy untimed)."""
            progress(f"select + mask ({structure or 'row'}) x {args.reps + 1}")
            before, totals, cpu = load(), [], []
            for _ in range(args.reps + 1):
                gc.collect()
                total, c0 = 0.0, time.process_time()
                for n, lin in linears.items():
                    t0 = time.perf_counter()
                    if structure is None:
                        gradprobe.prune_(lin.weight.data, SPARSITY, norm=norms[n], scope="row")
                    else:
                        gradprobe.prune_(lin.weight.data, None, norm=norms[n], structure=structure)
                    dt = time.perf_counter() - t0
                    total += dt
                    if structure is None:
                        per_linear[n].append(dt)
                cpu.append(time.process_time() - c0)
                restore()
                totals.append(total)
            CPU_S["select_row" if structure is None else "select_24"] = statistics.median(cpu)
            return statistics.median(totals), totals, (before, load())

        res["select_row"] = time_select(None)
        res["select_24"] = time_select("2:4")

        # the masks' sha256 compared across ranks (only under torch.distributed), and the checkpoint
        res["masks_sha"] = timed(lambda: distributed.masks_digest(masks.values()), args.reps,
                                                          "masks_sha")
        ckpt = {n: w.contiguous() for n, w in wanda_weights.items()}
        res["ckpt_sha"] = timed(lambda: tensors_sha256(ckpt), args.reps, "ckpt_sha")

        if not args.no_sparsegpt:
            from gradprobe.sparsegpt import sparsegpt_prune_

            def hess_forward():
                with LayerStats(linears, hessian=True) as st:
                    run_layer(None)
                holder["hstats"] = st.stats

            res["hess"] = timed(hess_forward, 1, "hess", peak=True)
            hstats = holder["hstats"]

            def solve():
                for n in sg_names:
                    t0 = time.perf_counter()
                    m = sparsegpt_prune_(linears[n].weight.data, hstats[n].hessian, SPARSITY, scope="row")
                    sg[n] = time.perf_counter() - t0
                    assert m.sum(dim=1).eq(int(SPARSITY * m.shape[1])).all(), f"SparseGPT count at {n}"

            wanted = names if args.sparsegpt_linears == "all" else args.sparsegpt_linears.split(",")
            sg_names = [n for n in names if n in wanted or n.rsplit(".", 1)[-1] in wanted]
            if len(sg_names) != len(wanted):
                raise SystemExit(f"--sparsegpt-linears: {wanted} are not all among the layer's linears {names}")
            # one thread: the solve is ~8 small ops per weight column; with 2 threads on a loaded machine
            # each op's parallel region waits for a descheduled sibling thread (45 ms per column measured)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                res["sgpt"] = timed(solve, 1, "sgpt")
            finally:
                torch.set_num_threads(threads)
            restore()
            del hstats, holder["hstats"]
            gc.collect()

    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALING_TMP")) as tmp:
        src = Path(tmp) / "src"
        model.save_pretrained(src)  # dense; one model.safetensors (embeddings, the layer, norm, lm_head)
        layer_names = [k for k in model.state_dict() if k.startswith("model.layers.0.")]
        st_file = src / "model.safetensors"

        def cold_read():
            holder.pop("read", None)  # a live mapping of the file would keep its pages in the cache
            gc.collect()
            drop_page_cache(st_file)
            holder["read"] = read_layer(src, layer_names, dtype, touch=True)

        res["read_cold"] = timed(cold_read, args.reps + 1, "read_cold")
        res["read_warm"] = timed(lambda: read_layer(src, layer_names, dtype, touch=True), args.reps, "read_warm")
        for n in names:
            assert torch.equal(holder["read"][f"model.layers.0.{n}.weight"], dense[n]), "read-back differs"
        del holder["read"]

        from safetensors.torch import save_file

        def write_ckpt():
            p = Path(tmp) / "layer_0000.safetensors"
            save_file(ckpt, str(p.with_suffix(".tmp")), metadata={"gradprobe_sha256": tensors_sha256(ckpt)})
            fd = os.open(p.with_suffix(".tmp"), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            os.replace(p.with_suffix(".tmp"), p)

        res["ckpt_write"] = timed(write_ckpt, args.reps, "ckpt_write")

        if not args.no_e2e:
            config = gradprobe.PruneConfig(method="wanda", sparsity=SPARSITY, scope="row", nsamples=N, seqlen=L,
                                           batch_size=1, progress=False)
            restore()
            res["e2e"] = timed(lambda: gradprobe.prune(model, batches, config), 1, "e2e")
            for n, lin in linears.items():
                assert torch.equal(lin.weight.data, wanda_weights[n]), f"gradprobe.prune differs from the measured path at {n}"
            from gradprobe.stream import prune_streamed

            out = Path(tmp) / "out"
            drop_page_cache(st_file)
            res["e2e_stream"] = timed(lambda: prune_streamed(src, out, config, batches, plots=False), 1, "e2e_stream")
            got = read_layer(out, [f"model.layers.0.{n}.weight" for n in names], dtype)
            for n in names:
                assert torch.equal(got[f"model.layers.0.{n}.weight"], wanda_weights[n]), f"prune_streamed differs at {n}"
            restore()

    copy_bw = copy_bandwidth("cpu")
    load_end = load()
    total = time.perf_counter() - t_start

    # ---- report ---------------------------------------------------------------------------------------
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(gradprobe.__file__).parent,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    meta = {
        "nsamples": N, "seqlen": L, "tokens": tokens, "linear_params": linear_params, "layer_bytes": layer_bytes,
        "shape": SHAPE, "sparsegpt_linears": {n: [linears[n].out_features, linears[n].in_features] for n in sg},
        "copy_bw_gbps": round(copy_bw, 2), "load_start": load_start, "load_end": load_end,
        "wall_s": round(total, 1), "commit": sha, "gradprobe": str(Path(gradprobe.__file__).parent.parent),
        "torch": torch.__version__, "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "amx_bf16": "amx_bf16" in Path("/proc/cpuinfo").read_text(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "peak_extra_bytes": PEAK, "calib_buffer_bytes": 2 * inps.numel() * inps.element_size(),
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "argv": " ".join(sys.argv[1:]),
    }
    steps = {k: {"median_s": round(v[0], 4), "reps_s": [round(t, 4) for t in v[1]], "cpu_s": round(CPU_S.get(k, 0.0), 4),
                 "load": list(v[2])} for k, v in res.items()}
    raw = {"meta": meta, "steps": steps, "per_linear_select_ms": {n: round(statistics.median(v) * 1e3, 1)
                                                                  for n, v in per_linear.items()},
           "sparsegpt_solve_s": {n: round(t, 2) for n, t in sg.items()}}
    text = measured_markdown(raw) + "\n" + projections_markdown(raw)
    print(text)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_path.with_name(out_path.name + ".tmp")
    tmp_out.write_text(text)
    os.replace(tmp_out, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
