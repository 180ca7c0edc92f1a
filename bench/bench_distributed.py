"""Scaling of a calibration-dominated Wanda run with the world size (torch.distributed, gloo, CPU).

Same model, same calibration set, one run: configurations alternate round by round so that the
machine's load hits them alike.

* ``1 rank x 1 thread``  — the baseline
* ``1 rank x 2 threads`` — intra-op parallelism (torch.set_num_threads(2))
* ``2 ranks x 1 thread`` — data-parallel calibration: each rank embeds and runs half the samples

The model is a random Llama with small weights and many long calibration windows, so the layer forwards
dominate (not the selection). Every configuration must produce the same pruned weights (sha256 of the
pruned linears, compared before the table is printed). Timed: ``gradprobe.prune`` alone (rank 0's wall
time; the group set-up and imports excluded).

Usage: python bench/bench_distributed.py [--rounds 3] [--layers 4] [--hidden 256] [--nsamples 32] [--seqlen 128]
Writes bench/results/distributed_table.md (and prints it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = [("1 rank x 1 thread", 1, 1), ("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1)]


def worker(args) -> None:
    """One rank: build the model, prune, print a JSON line (seconds, digest) on rank 0."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import gradprobe
    from gradprobe._checkpoint import tensors_digest

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=args.seqlen, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    batches = torch.randint(0, 1024, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1))
    config = gradprobe.PruneConfig(sparsity=0.5, scope="row", batch_size=args.batch_size, progress=False)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    gradprobe.prune(model, batches, config)
    secs = time.perf_counter() - t0
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"seconds": secs, "digest": tensors_digest(weights)}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, threads: int, argv: list[str]) -> dict:
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--threads", str(threads), *argv],
                                      env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed (world {world}, threads {threads})")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "results" / "distributed_table.md"))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    argv = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    digests: dict[str, set[str]] = {name: set() for name, _, _ in CONFIGS}
    loads = []
    for r in range(args.rounds):
        for name, world, threads in CONFIGS:
            loads.append(os.getloadavg()[0])
            got = launch(world, threads, argv)
            times[name].append(got["seconds"])
            digests[name].add(got["digest"])
            print(f"round {r + 1}: {name}: {got['seconds']:.2f} s", flush=True)
    all_digests = set().union(*digests.values())
    if len(all_digests) != 1:
        raise SystemExit(f"pruned weights differ between configurations: {digests}")
    base = statistics.median(times[CONFIGS[0][0]])
    lines = [
        f"# Data-parallel calibration: world size vs threads ({datetime.date.today()})",
        "",
        f"Random Llama, {args.layers} layers, hidden {args.hidden}, intermediate {args.hidden * 11 // 4}, fp32, "
        f"Wanda 50 % row, {args.nsamples} windows x {args.seqlen} tokens, batch size {args.batch_size}; CPU, gloo. "
        f"{args.rounds} rounds, configurations alternating; `gradprobe.prune` wall time (rank 0). "
        f"Pruned weights identical in every configuration (sha256 {next(iter(all_digests))[:12]}). "
        f"Shared, loaded machine ({os.cpu_count()} cores, 1-min load average {min(loads):.1f}-{max(loads):.1f} "
        "during the run): compare the ratios measured side by side, not the absolute seconds.",
        "",
        "| configuration | median s | range s | speed-up vs 1 x 1 (median) | per-round ratio vs 1 rank x 2 threads |",
        "|---|---|---|---|---|",
    ]
    two_threads = times[CONFIGS[1][0]]
    for name, _, _ in CONFIGS:
        t = times[name]
        ratio = [a / b for a, b in zip(two_threads, t, strict=True)]
        lines.append(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} | "
                     f"{base / statistics.median(t):.2f} x | {min(ratio):.2f}-{max(ratio):.2f} x |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
