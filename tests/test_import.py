"""``import gradprobe`` never fails; without ``gradprobe._C`` auto falls back to the reference, and an
explicit ``GRADPROBE_BACKEND=cpp`` raises BackendUnavailableError with a diagnosis.

The missing extension (and a missing Triton) is simulated in a fresh interpreter by putting ``None``
in ``sys.modules``, which makes their import raise ImportError.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import gradprobe
from gradprobe import _backend, _extension
from gradprobe.ops import reference as ref
from tests.helpers import make_norm, make_weight

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["gradprobe._C"] = None   # the compiled extension is "not built"
    sys.modules["triton"] = None         # and Triton is not installed
    import torch
    import gradprobe
    from gradprobe import _backend, _extension
    from gradprobe.ops import reference as ref

    out = {"C_loaded_on_import": "gradprobe._C" in sys.modules and sys.modules["gradprobe._C"] is not None}
    torch.manual_seed(0)
    w, norm = torch.randn(9, 50), torch.rand(50)
    mask = gradprobe.prune_mask(w, 0.5, norm=norm)
    out["auto_backend"] = _backend.resolve("row_mask", "cpu")[0]
    out["auto_mask_ok"] = bool(torch.equal(mask, ref.stable_rank_mask(ref.score(w, norm), 25)))
    out["available"] = _extension.available()
    out["diagnosis"] = _extension.diagnosis()
    os.environ["GRADPROBE_BACKEND"] = "cpp"
    try:
        gradprobe.prune_mask(w, 0.5)
        out["forced_cpp"] = "no error"
    except _backend.BackendUnavailableError as exc:
        out["forced_cpp"] = "BackendUnavailableError: " + str(exc)
    except Exception as exc:
        out["forced_cpp"] = type(exc).__name__ + ": " + str(exc)
    os.environ["GRADPROBE_BACKEND"] = "reference"
    out["forced_reference_ok"] = bool(torch.equal(gradprobe.prune_mask(w, 0.5, norm=norm), mask))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def without_extension() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("GRADPROBE_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"import gradprobe without _C failed:\n{proc.stderr[-3000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_import_does_not_load_the_extension_eagerly(without_extension):
    assert without_extension["C_loaded_on_import"] is False


def test_auto_falls_back_to_reference_without_extension(without_extension):
    assert without_extension["auto_backend"] == "reference"
    assert without_extension["auto_mask_ok"] is True
    assert without_extension["available"] is False
    assert without_extension["diagnosis"].startswith("not loaded: ")


def test_forced_cpp_without_extension_raises_with_diagnosis(without_extension):
    msg = without_extension["forced_cpp"]
    assert msg.startswith("BackendUnavailableError: "), msg
    assert "GRADPROBE_BACKEND=cpp" in msg and "gradprobe._C" in msg
    assert "pip install --no-build-isolation -e ." in msg, "the diagnosis must say how to fix it"


def test_forced_reference_works_without_extension(without_extension):
    assert without_extension["forced_reference_ok"] is True


@pytest.mark.parametrize("value", ["fastest", "cuda", "c++"])
def test_invalid_backend_env_raises_value_error(monkeypatch, value):
    monkeypatch.setenv("GRADPROBE_BACKEND", value)
    with pytest.raises(ValueError, match="GRADPROBE_BACKEND=.* is not one of"):
        gradprobe.prune_mask(torch.randn(3, 8), 0.5)
    with pytest.raises(ValueError, match="GRADPROBE_BACKEND"):
        gradprobe.global_prune_masks([torch.randn(3, 8)], 0.5)


@pytest.mark.skipif(not _extension.available(), reason=f"gradprobe._C not built: {_extension.diagnosis()}")
def test_auto_uses_cpp_when_extension_is_built(monkeypatch):
    monkeypatch.delenv("GRADPROBE_BACKEND", raising=False)
    for op in ("row_threshold", "row_mask", "row_prune_", "global_threshold", "global_mask", "global_prune_"):
        assert _backend.resolve(op, "cpu")[0] == "cpp", op
    w, norm = make_weight((9, 50), torch.bfloat16), make_norm(50)
    assert torch.equal(gradprobe.prune_mask(w, 0.5, norm=norm), ref.stable_rank_mask(ref.score(w, norm), 25))


@pytest.mark.skipif(not _extension.available(), reason=f"gradprobe._C not built: {_extension.diagnosis()}")
def test_cpp_schemas_equal_the_gradprobe_schemas():
    """Every gradprobe_cpp:: op has exactly the schema of its gradprobe:: op (gradprobe/ops/_schemas.py)."""
    from gradprobe.ops._schemas import SCHEMAS

    cpp_ops = [op for op in SCHEMAS if hasattr(torch.ops.gradprobe_cpp, op)]
    for op in ("row_threshold", "row_mask", "row_prune_", "global_threshold", "global_mask", "global_prune_"):
        assert op in cpp_ops, f"gradprobe._C does not implement {op}"
    for op in cpp_ops:
        mine = str(getattr(torch.ops.gradprobe_cpp, op).default._schema).replace("gradprobe_cpp::", "")
        theirs = str(getattr(torch.ops.gradprobe, op).default._schema).replace("gradprobe::", "")
        assert mine == theirs, f"{op}: {mine} != {theirs}"


@pytest.mark.skipif(not _extension.available(), reason=f"gradprobe._C not built: {_extension.diagnosis()}")
def test_compiled_backend_is_registered_per_device(monkeypatch):
    """The cpp backend serves a device only where gradprobe._C registered a kernel for it: CUDA tensors
    get the compiled 2:4 packer only when it was built with CUDA, else the next backend in line."""
    monkeypatch.delenv("GRADPROBE_BACKEND", raising=False)
    built_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("gradprobe_cpp::pack_24_cutlass", "CUDA")
    assert (_backend.resolve("pack_24_cutlass", "cuda")[0] == "cpp") == built_cuda
    assert _backend.resolve("row_mask", "cuda")[0] != "cpp"  # no CUDA kernel in _C: Triton or reference
    if not built_cuda:
        with _backend.use_backend("cpp"), pytest.raises(_backend.BackendUnavailableError, match="built only when torch has CUDA"):
            _backend.resolve("pack_24_cutlass", "cuda")
    # as if the extension had been built with CUDA: auto prefers the compiled kernel on CUDA tensors
    monkeypatch.setitem(_backend._DEVICES, ("cpp", "pack_24_cutlass"), frozenset({"cpu", "cuda"}))
    assert _backend.resolve("pack_24_cutlass", "cuda")[0] == "cpp"
    with _backend.use_backend("cpp"), pytest.raises(_backend.BackendUnavailableError, match="for cpu tensors only"):
        _backend.resolve("row_mask", "cuda")


# ---- production code never imports the reference (the test oracle) ----------------------------------

_PACKAGE = ROOT / "gradprobe"
# gradprobe/ops/__init__.py imports it to register the reference backend (the fallback); the reference
# itself is the oracle. Every other module must reach the ops through torch.ops.gradprobe.
_MAY_IMPORT_REFERENCE = {"ops/__init__.py", "ops/reference.py"}


def _imports_reference(path: pathlib.Path, package: tuple[str, ...] | None = None) -> list[int]:
    """Line numbers of the imports of gradprobe.ops.reference in ``path`` (absolute or relative).

    ``package``: the dotted package ``path`` belongs to, as parts (default: from its place under ROOT).
    """
    import ast

    if package is None:
        rel = path.relative_to(ROOT).with_suffix("")
        package = rel.parts[:-1] if rel.name != "__init__" else rel.parts
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == "gradprobe.ops.reference" or n.startswith("gradprobe.ops.reference.") for n in names):
            lines.append(node.lineno)
    return lines


_MODULES = sorted(str(p.relative_to(_PACKAGE)) for p in _PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module", [m for m in _MODULES if m not in _MAY_IMPORT_REFERENCE])
def test_production_code_never_imports_the_reference(module):
    lines = _imports_reference(_PACKAGE / module)
    assert not lines, (
        f"gradprobe/{module} imports gradprobe.ops.reference (the test oracle) at line(s) {lines}; "
        "call the ops (torch.ops.gradprobe.*) or a production helper (gradprobe.select, gradprobe.ops._checks)"
    )


def test_reference_import_detector_sees_every_form(tmp_path):
    """The detector above finds absolute, from-package and relative imports of the reference."""
    assert _imports_reference(_PACKAGE / "ops" / "__init__.py")  # the allowed registration import
    probe = tmp_path / "mod.py"
    probe.write_text(
        "import gradprobe.ops.reference\n"
        "from gradprobe.ops.reference import score\n"
        "from gradprobe.ops import reference\n"
        "from . import reference\n"
        "from .reference import score\n"
        "from ..ops import reference\n"
        "import gradprobe.select\n"
        "from gradprobe.ops import _checks\n"
        "from . import _schemas\n"
    )
    assert _imports_reference(probe, package=("gradprobe", "ops")) == [1, 2, 3, 4, 5, 6]
