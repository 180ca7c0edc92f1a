"""The one benchmark harness every ``bench/bench_*.py`` uses.

Check first, then time, then report:

* :meth:`Bench.run` calls the case's ``check`` (bit-exact mask / threshold equality against the
  reference or a baseline, see :func:`check_masks_equal`) BEFORE timing; a mismatch aborts the case.
* Timing (:func:`time_fn`): on CUDA ``triton.testing.do_bench`` (it flushes L2 before every call;
  median, p20, p80) over rotating input copies (:func:`rotation`) so L2 cannot flatter small shapes;
  cases that need an untimed per-call ``setup`` (in-place ops restoring their weight) use a CUDA-event
  loop with the same flush. On CPU a ``time.perf_counter`` loop with warm-up and median/p20/p80.
* Effective bandwidth = the case's bytes (minimal read + write traffic of the op, the same bytes for
  every implementation of one problem) / median time, and its share of the device's measured copy
  bandwidth (``dst.copy_(src)`` on the same device, measured once per run: :func:`copy_bandwidth`).
* Output: a Markdown table on stdout (:meth:`Bench.table`) and CSV rows appended to
  ``bench/results/<bench>.csv`` (:meth:`Bench.save_csv`; Liger-Kernel-style schema plus the machine,
  cores, torch/triton versions, gradprobe backend, git SHA and timestamp).
"""

from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import functools
import importlib.metadata
import itertools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
REPO = pathlib.Path(__file__).resolve().parents[1]

CSV_FIELDS = [
    "kernel_name",  # the bench (e.g. row_select)
    "kernel_provider",  # the implementation (gradprobe.prune_mask, torch.sort+scatter, ...)
    "kernel_operation_mode",  # mask | inplace | threshold | floor
    "metric_name",
    "metric_unit",
    "x_name",
    "x_value",
    "y_value_50",
    "y_value_20",
    "y_value_80",
    "gbps",
    "pct_copy_bw",
    "copy_bw_gbps",
    "dtype",
    "device",
    "machine",
    "cores",
    "threads",
    "torch_version",
    "triton_version",
    "gradprobe_backend",
    "git_sha",
    "timestamp",
    "extra_benchmark_config_str",
]


# ---- environment -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def machine_info(device: str) -> dict[str, str]:
    """Machine / versions / commit fields of every CSV row for ``device`` ('cpu' or 'cuda')."""
    if device == "cuda":
        machine = torch.cuda.get_device_name()
        cores = str(torch.cuda.get_device_properties(0).multi_processor_count) + " SMs"
    else:
        machine = _cpu_model()
        cores = str(os.cpu_count())
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = ""
    sha = _git("rev-parse", "--short", "HEAD")
    # the working tree of the measured code differs from HEAD: say so (sources only, not results)
    if sha and _git("status", "--porcelain", "--", "gradprobe", "csrc", "setup.py"):
        sha += "+dirty"
    return {
        "device": device,
        "machine": machine,
        "cores": cores,
        "threads": str(torch.get_num_threads()),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "git_sha": sha,
    }


def backend_for(op: str, device: str) -> str:
    """Name of the gradprobe backend that ``gradprobe::op`` resolves to on ``device`` (e.g. 'cpp')."""
    from gradprobe._backend import resolve

    try:
        return resolve(op, device)[0]
    except Exception as exc:  # noqa: BLE001 — reported, not hidden
        return f"unavailable ({type(exc).__name__})"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- timing ----------------------------------------------------------------------------------


@dataclass
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles over ``reps`` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantiles(times_ms: Sequence[float], reps: int) -> Timing:
    xs = sorted(times_ms)
    if len(xs) == 1:
        return Timing(xs[0], xs[0], xs[0], reps)
    q = statistics.quantiles(xs, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return Timing(statistics.median(xs), q[1], q[7], reps)


def time_fn(
    fn: Callable[[], object],
    device: str,
    *,
    setup: Callable[[], object] | None = None,
    warmup: int = 1,
    budget_s: float = 2.0,
    min_reps: int = 3,
    max_reps: int = 200,
) -> Timing:
    """Time ``fn()`` on ``device``; ``setup()`` (if given) runs before every call, untimed.

    CUDA without setup: ``triton.testing.do_bench`` (warm-up 25 ms, 100 ms of reps, L2 flushed
    before each call). CUDA with setup: the same flush and CUDA events around ``fn`` only. CPU: ``warmup``
    untimed calls, then timed calls until ``budget_s`` is spent and at least ``min_reps`` were made
    (a call slower than the budget ends it sooner: at most twice the budget is spent on min_reps).
    """
    if device == "cuda":
        if setup is None:
            import triton.testing

            med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            return Timing(med, p20, p80, -1)
        return _cuda_event_loop(
            fn, setup, warmup=max(warmup, 3), budget_s=budget_s, min_reps=min_reps, max_reps=max_reps
        )
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times: list[float] = []
    end = time.perf_counter() + budget_s
    # stop once the budget is spent and min_reps calls are done; a slow call (a sort baseline) may
    # end it earlier: min_reps is only pursued up to twice the budget
    while True:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        now = time.perf_counter()
        times.append((now - t0) * 1e3)
        if len(times) >= max_reps or (now >= end and (len(times) >= min_reps or now >= end + budget_s)):
            break
    return _quantiles(times, len(times))


def _cuda_event_loop(fn, setup, *, warmup, budget_s, min_reps, max_reps) -> Timing:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # > L2 of any current GPU
    for _ in range(warmup):
        setup()
        fn()
    torch.cuda.synchronize()
    starts, ends = [], []
    end = time.perf_counter() + budget_s
    while len(starts) < min_reps or (len(starts) < max_reps and time.perf_counter() < end):
        setup()
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        starts.append(s)
        ends.append(e)
        if len(starts) % 10 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)], len(starts))


def last_level_cache_bytes(device: str) -> int:
    """L2 size on CUDA, the largest CPU cache level (L3, else L2) on CPU; a safe default when unknown."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 * 2**20))
    best = 0
    base = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
            best = max(best, int(size.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 64 * 2**20


def rotation(
    make: Callable[[], tuple], bytes_per_input: int, device: str, max_copies: int = 8
) -> Callable[[], tuple]:
    """Rotate over enough independent inputs (``make()`` each) that together they exceed 2x the cache.

    Returns a zero-argument callable giving the next input tuple; with inputs larger than the
    cache it builds only one (big problems are never cache-resident anyway).
    """
    need = -(-2 * last_level_cache_bytes(device) // max(bytes_per_input, 1))
    copies = [make() for _ in range(max(1, min(max_copies, need)))]
    cyc = itertools.cycle(copies)
    return lambda: next(cyc)


_COPY_BW: dict[tuple[str, int], float] = {}
COPY_BYTES = 512 * 2**20  # far above any cache: the streaming bandwidth of the memory


def copy_bandwidth(device: str, nbytes: int = COPY_BYTES) -> float:
    """Measured ``dst.copy_(src)`` bandwidth on ``device`` in GB/s (read + write bytes), cached per run."""
    if (device, nbytes) not in _COPY_BW:
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), device, warmup=2, budget_s=1.0, min_reps=5)
        _COPY_BW[(device, nbytes)] = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
        del src, dst
    return _COPY_BW[(device, nbytes)]


# ---- correctness -----------------------------------------------------------------------------


def check_masks_equal(actual, expected, what: str = "mask") -> None:
    """Bit-exact equality of a bool mask (or list of masks); raises AssertionError naming the first mismatches."""
    if isinstance(actual, (list, tuple)):
        if len(actual) != len(expected):
            raise AssertionError(f"{what}: {len(actual)} masks, expected {len(expected)}")
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            check_masks_equal(a, e, f"{what}[{i}]")
        return
    if actual.dtype != torch.bool or actual.shape != expected.shape:
        raise AssertionError(
            f"{what}: got {actual.dtype}{tuple(actual.shape)}, expected bool{tuple(expected.shape)}"
        )
    diff = actual.ne(expected.to(actual.device))
    if bool(diff.any()):
        where = diff.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} entries differ, first at {where}")


def check_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "threshold") -> None:
    """Exact equality (``torch.equal``) of thresholds / counts; raises AssertionError with the first differences."""
    expected = expected.to(actual.device)
    if actual.shape != expected.shape or not torch.equal(actual, expected):
        if actual.shape != expected.shape:
            raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
        bad = (actual != expected).nonzero()[:5].flatten().tolist()
        raise AssertionError(
            f"{what}: differs at {bad}: {actual.flatten()[bad].tolist()} vs {expected.flatten()[bad].tolist()}"
        )


# ---- memory ----------------------------------------------------------------------------------


def _rss_kib(field_name: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(field_name)


def peak_memory_delta(fn: Callable[[], object], device: str) -> tuple[object, int]:
    """(fn(), peak extra bytes while it ran).

    CUDA: ``max_memory_allocated`` delta. CPU (Linux): free heap returned with ``malloc_trim``, the
    peak-RSS watermark reset through ``/proc/self/clear_refs``, then ``VmHWM - VmRSS(before)``; this
    counts every allocation the op touches (torch tensors, C++ vectors, thread stacks), outputs included.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = fn()
    return out, (_rss_kib("VmHWM") - before) * 1024


# ---- results ---------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    mode: str
    problem: str  # e.g. "4096x11008 fp32 norm": rows of one problem are compared with each other
    dtype: str
    timing: Timing
    nbytes: int
    gbps: float
    pct_copy: float
    backend: str = ""
    extra: dict = field(default_factory=dict)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Bench:
    """Collects the timed cases of one bench script on one device."""

    def __init__(self, name: str, device: str, copy_bytes: int = COPY_BYTES):
        self.name = name
        self.device = device
        self.rows: list[Row] = []
        self.copy_bw = copy_bandwidth(device, copy_bytes)
        self.timestamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.loadavg = os.getloadavg()[0]  # others' load on a shared machine makes CPU timings noisy

    def run(
        self,
        case: str,
        fn: Callable[[], object],
        *,
        problem: str,
        dtype: torch.dtype | str,
        nbytes: int,
        mode: str = "mask",
        check: Callable[[], None] | None = None,
        setup: Callable[[], object] | None = None,
        backend: str = "",
        extra: dict | None = None,
        **timing_kw,
    ) -> Row:
        """Check (if given), time ``fn`` and record a row; ``nbytes`` = the op's minimal read + write bytes."""
        if check is not None:
            check()
        synchronize(self.device)
        t = time_fn(fn, self.device, setup=setup, **timing_kw)
        gbps = nbytes / (t.median_ms * 1e-3) / 1e9
        row = Row(
            case,
            mode,
            problem,
            DTYPE_NAMES.get(dtype, str(dtype)),
            t,
            nbytes,
            gbps,
            100.0 * gbps / self.copy_bw,
            backend,
            dict(extra or {}),
        )
        self.rows.append(row)
        print(f"  {problem:28s} {case:34s} {t.median_ms:10.2f} ms  ({gbps:6.1f} GB/s)", flush=True)
        return row

    def get(self, problem: str, case: str) -> Row | None:
        for r in self.rows:
            if r.problem == problem and r.case == case:
                return r
        return None

    def ratio(self, problem: str, slow_case: str, fast_case: str) -> float | None:
        """time(slow_case) / time(fast_case) on one problem, None if either was not run."""
        a, b = self.get(problem, slow_case), self.get(problem, fast_case)
        return None if a is None or b is None else a.timing.median_ms / b.timing.median_ms

    def table(self, vs: str | dict[str, str] | None = None) -> str:
        """Markdown table of every row with a speedup column.

        ``vs``: the case each problem's speedups are relative to, or ``{mode: case}`` to compare each
        row with the baseline that produces the same output (threshold vs threshold, mask vs mask).
        """
        head = [
            "problem",
            "implementation",
            "mode",
            "backend",
            "median ms",
            "p20-p80 ms",
            "GB/s",
            "% copy BW",
        ]
        if vs:
            head.append(f"speedup vs {vs}" if isinstance(vs, str) else "speedup vs same-output baseline")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [
                r.problem,
                r.case,
                r.mode,
                r.backend or "-",
                f"{r.timing.median_ms:.2f}",
                f"{r.timing.p20_ms:.2f}-{r.timing.p80_ms:.2f}",
                f"{r.gbps:.1f}",
                f"{r.pct_copy:.0f}%",
            ]
            if vs:
                base = vs if isinstance(vs, str) else vs.get(r.mode)
                ref = self.get(r.problem, base) if base else None
                cells.append(f"{ref.timing.median_ms / r.timing.median_ms:.1f}x" if ref else "-")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def header(self) -> str:
        m = machine_info(self.device)
        return (
            f"{self.name} on {m['machine']} ({m['cores']} cores, {m['threads']} threads), torch {m['torch_version']}, "
            f"triton {m['triton_version'] or '-'}, commit {m['git_sha']}, {self.timestamp}; "
            f"measured copy bandwidth {self.copy_bw:.1f} GB/s, load average {self.loadavg:.2f}"
        )

    def save_csv(self, path: pathlib.Path | None = None) -> pathlib.Path:
        """Append every row to ``bench/results/<name>.csv`` (header written when the file is new)."""
        path = path or RESULTS / f"{self.name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        m = machine_info(self.device)
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            for r in self.rows:
                w.writerow(
                    {
                        "kernel_name": self.name,
                        "kernel_provider": r.case,
                        "kernel_operation_mode": r.mode,
                        "metric_name": "time",
                        "metric_unit": "ms",
                        "x_name": "problem",
                        "x_value": r.problem,
                        "y_value_50": f"{r.timing.median_ms:.4f}",
                        "y_value_20": f"{r.timing.p20_ms:.4f}",
                        "y_value_80": f"{r.timing.p80_ms:.4f}",
                        "gbps": f"{r.gbps:.2f}",
                        "pct_copy_bw": f"{r.pct_copy:.1f}",
                        "copy_bw_gbps": f"{self.copy_bw:.2f}",
                        "dtype": r.dtype,
                        **m,
                        "gradprobe_backend": r.backend,
                        "timestamp": self.timestamp,
                        "extra_benchmark_config_str": json.dumps(
                            {
                                "reps": r.timing.reps,
                                "bytes": r.nbytes,
                                "loadavg_1m": round(self.loadavg, 2),
                                **r.extra,
                            }
                        ),
                    }
                )
        return path


def target_line(label: str, value: float | None, goal: float, *, at_most: bool = False) -> str:
    """'- label: 57.3x (target >= 50x) PASS' for the targets summary."""
    if value is None:
        return f"- {label}: not measured (target {'<=' if at_most else '>='} {goal:g}x)"
    ok = value <= goal if at_most else value >= goal
    return (
        f"- {label}: {value:.1f}x (target {'<=' if at_most else '>='} {goal:g}x) {'PASS' if ok else 'MISS'}"
    )


def optional_pytest():
    """The ``pytest`` module for a bench script's pytest-benchmark cases, or None (scripts run without it)."""
    try:
        import pytest
    except ImportError:
        return None
    return pytest
