"""End-to-end layerwise Wanda: the forward floor ratio, and gradprobe.prune vs a Wanda-reference-style run.

``ratio`` (default): exact layerwise Wanda needs two forwards of each decoder layer over the
calibration set (statistics, then the pruned propagation); everything else should be cheap. On the
embedded SmolLM2-135M (30 layers, hidden 576, fp32) with ``--nsamples`` x ``--seqlen`` calibration
tokens it times, in one process on the same data, interleaved for ``--repeats`` rounds:

* floor: the windows embedded once, then each decoder layer run twice over all windows in batches of
  ``--batch-size`` (the second run's outputs feed the next layer; no copies, no hooks), the layer
  forward kwargs built once;
* gradprobe.prune: Wanda 50 % per row with the same calibration and batch size (the CLI default 8);

and reports the medians and the median per-round ratio prune / floor (goal <= 1.15 on the CPU), plus a
cProfile breakdown of one more prune run (decoder forwards, statistics hooks, selection, mask
counts, kwargs building, copies, checkpoint/other). Markdown into ``bench/results/driver_ratio.md``
with the load average before and after.

``reference``: gradprobe.prune vs a Wanda-reference-style implementation. Model: random-weight LlamaForCausalLM with Llama-7B layer shapes (hidden 4096, intermediate 11008,
32 heads) but only ``--layers`` decoder layers and a small vocabulary; CPU, fp32 by default.

Reference style (https://github.com/locuslab/wanda/blob/main/lib/prune.py, ``prune_wanda``):
layer-0 inputs caught with a Catcher into buffers sized to the model's maximum context
(``--max-context``, Llama-2: 4096) although only ``seqlen`` positions are used, fp32 running-mean
``scaler_row`` per linear, ``torch.sort`` of every row, then the pruned layer recomputes the outputs.

``probe``: the gradient probe's time per gradient pass over the floor of that pass, one forward +
backward of the model loss per calibration batch (whole graph, only the decoder linears requiring
grad), on the embedded model and the same batches, interleaved: ``probe_prune_(mode="model")`` with the
streamed forward/backward (one decoder layer's graph at a time) and with the whole graph
(``streamed=False``); per pass = the run's seconds / 2 (G0 and G1; candidate selection and decisions
included). Markdown into ``bench/results/probe_ratio.md``.

Usage: python bench/bench_driver.py [ratio] [--nsamples 16] [--seqlen 256] [--repeats 3] [--layers N]
       python bench/bench_driver.py probe [--nsamples 4] [--seqlen 128] [--repeats 3]
       python bench/bench_driver.py reference [--layers 2] [--nsamples 4] [--seqlen 128]
``reference`` prints a Markdown table: wall seconds, peak extra RSS, achieved sparsity, mask agreement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from _harness import peak_memory_delta  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe.models.base import LLAMA_LINEARS  # noqa: E402


def build(layers: int, dtype: torch.dtype, max_context: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=max_context,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
    model.model.rotary_emb.__init__(cfg)  # real inv_freq buffer (to_empty left it uninitialised)
    return model.eval()


class _Catch(Exception):
    pass


@torch.no_grad()
def reference_style_wanda(model, batches, sparsity: float, max_context: int):
    """Wanda's prune_wanda, restated (max-context buffers, running-mean scaler_row, torch.sort)."""
    layers = model.model.layers
    n, seqlen = batches.shape
    hidden = model.config.hidden_size
    inps = torch.zeros((n, max_context, hidden), dtype=torch.float32)  # Wanda: (nsamples, model.seqlen, H)
    cache = {"i": 0, "kw": None}

    def catcher(_m, args, kwargs):
        inps[cache["i"], :seqlen] = args[0][0]
        cache["i"] += 1
        cache["kw"] = kwargs
        raise _Catch

    h = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
    for j in range(n):
        try:
            model(batches[j : j + 1], use_cache=False)
        except _Catch:
            pass
    h.remove()
    outs = torch.zeros_like(inps)
    kw = cache["kw"]
    dtype = next(model.parameters()).dtype
    for layer in layers:
        subset = {name: layer.get_submodule(name) for name in LLAMA_LINEARS}
        scaler = {name: torch.zeros(m.in_features) for name, m in subset.items()}
        count = {name: 0 for name in subset}

        def add_batch(name, scaler=scaler, count=count):
            def hook(_m, args, _out):
                inp = args[0].reshape(-1, args[0].shape[-1]).t().float()
                scaler[name] *= count[name] / (count[name] + 1)
                count[name] += 1
                scaler[name] += torch.norm(inp, p=2, dim=1) ** 2 / count[name]

            return hook

        hs = [m.register_forward_hook(add_batch(name)) for name, m in subset.items()]
        for j in range(n):
            outs[j, :seqlen] = layer(inps[j : j + 1, :seqlen].to(dtype), **kw)[0]
        for x in hs:
            x.remove()
        for name, m in subset.items():
            metric = m.weight.abs().float() * torch.sqrt(scaler[name].reshape(1, -1))
            idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
            mask = torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)
            m.weight.data[mask] = 0
        for j in range(n):
            outs[j, :seqlen] = layer(inps[j : j + 1, :seqlen].to(dtype), **kw)[0]
        inps, outs = outs, inps


# --------------------------------------------------------------------------------------------------
# ratio: gradprobe.prune / two dense forwards (the floor)
# --------------------------------------------------------------------------------------------------
RATIO_GOAL = 1.15
NOTES_MARKER = "<!-- notes: kept when the bench rewrites this file -->"
RATIO_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "driver_ratio.md")
PROBE_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "probe_ratio.md")


def _loadavg() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


@torch.no_grad()
def floor_forwards(model, batches: torch.Tensor, batch_size: int) -> None:
    """Two dense forwards of every decoder layer over all windows (embedding once, kwargs built once
    per batch size, no hooks, outputs kept as the batches the layer returned: no copies)."""
    from gradprobe.models import get_adapter

    ad = get_adapter(model)
    embed = ad.embed(model)
    xs = [embed(batches[b0 : b0 + batch_size]) for b0 in range(0, batches.shape[0], batch_size)]
    kw = {x.shape[0]: ad.layer_forward_kwargs(model, x, layer_idx=0) for x in xs}
    for layer in ad.decoder_layers(model):
        for x in xs:  # statistics pass: outputs discarded
            ad.layer_output(layer(x, **kw[x.shape[0]]))
        xs = [ad.layer_output(layer(x, **kw[x.shape[0]])) for x in xs]  # propagation


def _profile_parts(fn) -> tuple[float, list[tuple[str, float]]]:
    """(total seconds, [(part, seconds)]) of one ``fn()`` under cProfile (torch CPU ops are
    synchronous, so an op's time is its caller's)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(fn)
    total = time.perf_counter() - t0
    st = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}

    def cum(file_end: str, func: str) -> float:
        return sum(v[3] for k, v in st.items() if k[0].endswith(file_end) and k[2] == func)

    def op_from(op: str, caller_file_end: str, caller_func: str) -> float:
        """Seconds of builtin ``op`` called directly from the given Python function."""
        out = 0.0
        for k, v in st.items():
            if k[2] == op:
                for ck, cv in v[4].items():
                    if ck[0].endswith(caller_file_end) and ck[2] == caller_func:
                        out += cv[3]
        return out

    calib = "gradprobe/pipeline/calibration.py"
    layerwise = "gradprobe/pipeline/layerwise.py"
    hooks = cum("gradprobe/stats.py", "hook")
    run_layer = cum(calib, "run_layer")
    kwargs = cum(calib, "kwargs_for")
    copies = op_from("<method 'copy_' of 'torch._C.TensorBase' objects>", calib, "run_layer")
    prune_group = cum(layerwise, "_prune_group")
    row_counts = cum(layerwise, "_row")
    capture = cum(calib, "capture_calibration")
    parts = [
        ("decoder layer forwards (both passes, hooks excluded)", run_layer - hooks - kwargs - copies),
        ("statistics hooks (sums of squares, ordered sums)", hooks),
        ("selection + pruning (mask_fn)", prune_group - row_counts),
        ("pruned-count of each mask (report rows)", row_counts),
        ("forward kwargs (rotary, causal mask) incl. cache lookups", kwargs),
        ("copies of layer outputs into the activation buffer", copies),
        ("embedding capture", capture),
    ]
    parts.append(("other (setup, checkpoint, per-layer overheads)", total - sum(v for _, v in parts)))
    return total, parts


def _timer(model, dense: dict):
    """``timed(fn)``: restore the dense weights, then the wall seconds of ``fn()``."""

    def timed(fn) -> float:
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return timed


def ratio_main(a) -> None:
    import statistics

    from gradprobe.data import calibration_batches
    from gradprobe.embedded import load_default_model

    torch.manual_seed(0)
    model, tok = load_default_model()
    if a.layers is not None:  # a shorter model for quick checks (the ratio is per layer anyway)
        del model.model.layers[a.layers :]
        model.config.num_hidden_layers = a.layers
    batches = calibration_batches(tok, nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = gradprobe.PruneConfig(sparsity=0.5, batch_size=a.batch_size, progress=False)

    def floor() -> None:
        floor_forwards(model, batches, a.batch_size)

    def prune() -> None:
        gradprobe.prune(model, batches, cfg)

    timed = _timer(model, dense)

    load_before = _loadavg()
    for _ in range(a.warmup):
        timed(floor), timed(prune)
    floors, prunes, ratios = [], [], []
    for r in range(a.repeats):  # interleaved, the order alternating, so drifting load hits both alike
        if r % 2:
            p, f = timed(prune), timed(floor)
        else:
            f, p = timed(floor), timed(prune)
        floors.append(f)
        prunes.append(p)
        ratios.append(p / f)
        print(
            f"round {r}: floor {f:.2f} s, prune {p:.2f} s, ratio {p / f:.3f} (load {_loadavg()})", flush=True
        )
    model.load_state_dict(dense)
    prof_total, parts = _profile_parts(prune)
    fwd = parts[0][1]
    load_after = _loadavg()
    med_f, med_p, med_r = statistics.median(floors), statistics.median(prunes), statistics.median(ratios)

    from _harness import machine_info, target_line

    info = machine_info("cpu")
    lines = [
        "# gradprobe.prune / two dense forwards (the floor)",
        "",
        f"Embedded SmolLM2-135M ({len(model.model.layers)} layers, hidden {model.config.hidden_size}, "
        f"fp32), calibration {a.nsamples} x {a.seqlen} tokens, batch size {a.batch_size}, Wanda 50 % row; "
        f"CPU {info['machine']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch_version']}, "
        f"gradprobe {info['git_sha']}.",
        f"Load average (1/5/15 min) before: {load_before}, after: {load_after}. "
        f"`python bench/bench_driver.py ratio --repeats {a.repeats}`.",
        "",
        "| round | floor s | prune s | prune / floor |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r} | {f:.2f} | {p:.2f} | {p / f:.3f} |"
        for r, (f, p) in enumerate(zip(floors, prunes, strict=True))
    ]
    lines += [
        f"| **median** | **{med_f:.2f}** | **{med_p:.2f}** | **{med_r:.3f}** |",
        "",
        target_line("median prune / floor", med_r, RATIO_GOAL, at_most=True),
        "",
        f"Profile of one more prune run (cProfile, {prof_total:.2f} s, load {load_after}). Each part is "
        "also given per second of the run's own decoder forwards, so the overheads compare across load "
        f"changes: total / forwards = {prof_total / fwd:.3f} is this run's ratio to its forwards.",
        "",
        "| part | s | share of prune | / forwards |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {v:.2f} | {v / prof_total:.1%} | {v / fwd:.3f} |" for name, v in parts]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        try:  # hand-written notes below the marker survive a rerun
            with open(a.out) as f:
                old = f.read()
            if NOTES_MARKER in old:
                text += "\n" + old[old.index(NOTES_MARKER) :]
        except FileNotFoundError:
            pass
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)  # atomic: a reader never sees half a table


def probe_main(a) -> None:
    import statistics

    from _harness import machine_info

    from gradprobe.data import calibration_batches
    from gradprobe.embedded import load_default_model
    from gradprobe.models import get_adapter

    torch.manual_seed(0)
    model, tok = load_default_model()
    if a.layers is not None:
        del model.model.layers[a.layers :]
        model.config.num_hidden_layers = a.layers
    batches = calibration_batches(tok, nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ad = get_adapter(model)
    linears = [lin.weight for layer in ad.decoder_layers(model) for lin in ad.prunable_linears(layer).values()]

    def floor() -> None:  # one forward + backward of the model loss per batch: what a gradient pass must do
        for p in model.parameters():
            p.requires_grad_(False)
        for w in linears:
            w.requires_grad_(True)
        try:
            for b in batches:
                model(input_ids=b[None], labels=b[None]).loss.backward()
                for w in linears:
                    w.grad = None
        finally:
            for w in linears:
                w.requires_grad_(False)

    def probe(streamed: bool):
        return lambda: gradprobe.probe_prune_(model, batches, 0.5, mode="model", streamed=streamed)

    timed = _timer(model, dense)

    load_before = _loadavg()
    runs = {"floor": floor, "streamed": probe(True), "whole graph": probe(False)}
    for fn in runs.values():
        timed(fn)  # warm-up
    secs: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(a.repeats):  # interleaved, the order rotating
        for k in order[r % 3 :] + order[: r % 3]:
            secs[k].append(timed(runs[k]))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in secs.items()), flush=True)
    model.load_state_dict(dense)
    med = {k: statistics.median(v) for k, v in secs.items()}
    info = machine_info("cpu")
    lines = [
        "# Gradient probe: time per gradient pass / (forward + backward)",
        "",
        f"Embedded SmolLM2-135M ({len(model.model.layers)} layers, fp32), {a.nsamples} batches of 1 x {a.seqlen} "
        f"tokens, `probe_prune_(mode=\"model\")`, Wanda 50 % row; CPU {info['machine']}, {info['threads']} threads, "
        f"torch {info['torch_version']}, gradprobe {info['git_sha']}. Load before {load_before}, after {_loadavg()}. "
        f"`python bench/bench_driver.py probe --repeats {a.repeats}`. Floor: forward + backward of the model loss "
        "per batch (whole graph, decoder linears requiring grad). Per pass = probe seconds / 2 (G0, G1).",
        "",
        "| run | median s | per pass s | per pass / floor |",
        "|---|---:|---:|---:|",
        f"| floor (forward + backward, every batch) | {med['floor']:.2f} | {med['floor']:.2f} | 1.000 |",
    ]
    for k in ("streamed", "whole graph"):
        lines.append(f"| probe, {k} | {med[k]:.2f} | {med[k] / 2:.2f} | {med[k] / 2 / med['floor']:.3f} |")
    lines += ["", "Rounds (s): " + "; ".join(f"{k}: " + ", ".join(f"{x:.2f}" for x in v) for k, v in secs.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", choices=["ratio", "reference", "probe"], default="ratio")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (reference: 2; ratio: all 30)")
    ap.add_argument("--nsamples", type=int, default=None, help="reference: 4; ratio: 16")
    ap.add_argument("--seqlen", type=int, default=None, help="reference: 128; ratio: 256")
    ap.add_argument(
        "--batch-size", type=int, default=8, help="ratio: windows per layer forward (CLI default)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="ratio: interleaved timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="ratio: untimed rounds first")
    ap.add_argument("--out", default=RATIO_MD, help="ratio: Markdown output ('' = stdout only)")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.mode == "probe":
        a.nsamples = a.nsamples or 4
        a.seqlen = a.seqlen or 128
        if a.out == RATIO_MD:
            a.out = PROBE_MD
        probe_main(a)
    elif a.mode == "ratio":
        a.nsamples = a.nsamples or 16
        a.seqlen = a.seqlen or 256
        ratio_main(a)
    else:
        a.layers = a.layers or 2
        a.nsamples = a.nsamples or 4
        a.seqlen = a.seqlen or 128
        reference_main(a)


def reference_main(a) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = build(a.layers, dtype, a.max_context)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batches = torch.randint(0, 1024, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    results = []

    def run(label, fn):
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        _, peak = peak_memory_delta(fn, "cpu")
        secs = time.perf_counter() - t0
        zeros = {
            (i, n): (lay.get_submodule(n).weight == 0)
            for i, lay in enumerate(model.model.layers)
            for n in LLAMA_LINEARS
        }
        results.append((label, secs, peak, zeros))

    run(
        "gradprobe.prune (row, wanda)",
        lambda: gradprobe.prune(model, batches, gradprobe.PruneConfig(sparsity=a.sparsity, progress=False)),
    )
    run(
        f"reference style (sort, {a.max_context}-ctx buffers)",
        lambda: reference_style_wanda(model, batches, a.sparsity, a.max_context),
    )
    base = results[0][3]
    total = sum(m.numel() for m in base.values())
    print(
        f"\nLlama-7B layer shapes x {a.layers} layers, {a.dtype}, calibration {a.nsamples}x{a.seqlen}, "
        f"CPU {a.threads} threads, torch {torch.__version__}\n"
    )
    print("| implementation | seconds | peak extra MiB | sparsity | masks equal to gradprobe |")
    print("|---|---:|---:|---:|---:|")
    for label, secs, peak, zeros in results:
        sp = sum(int(z.sum()) for z in zeros.values()) / total
        agree = sum(int((z == base[k]).sum()) for k, z in zeros.items()) / total
        print(f"| {label} | {secs:.2f} | {peak / 2**20:.0f} | {sp:.4f} | {agree:.6%} |")


if __name__ == "__main__":
    main()
