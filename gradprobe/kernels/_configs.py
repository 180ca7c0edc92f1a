"""Launch configurations of the selection kernels: small autotune lists, log2-bucketed keys.

* ``GRADPROBE_AUTOTUNE=0`` (read at import) pins the first config of every list: reproducible
  launches for CI and the only sane choice under ``TRITON_INTERPRET=1`` (no benchmarking there).
* Autotune keys are ``*_bucket`` kernel arguments holding ``ceil(log2(size))``, so the dozens of
  layer shapes met while pruning a model share a handful of tuning runs instead of one each.
* Only kernels whose outputs are overwritten (idempotent) are autotuned. Kernels that accumulate
  with atomics into a histogram shared by the tensors of a global group, or that write weights in
  place, take a fixed config from :func:`stream_config` (autotune would re-run them while
  benchmarking and corrupt or wipe the accumulation).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

AUTOTUNE = os.environ.get("GRADPROBE_AUTOTUNE", "1").strip() != "0"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"



def _patch_interpreter_numpy24() -> None:
    """Under TRITON_INTERPRET=1 with numpy >= 2.4, ``range(0, n, BLOCK)`` over a runtime scalar fails
    ("only 0-dimensional arrays can be converted to Python scalars"): the interpreter converts its
    1-element scalar arrays with ``int()``, which numpy 2.4 refuses. Upstream fix (same one-liner):
    https://github.com/triton-lang/triton/issues/9171 . Applied only when the bug is present."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.array([1]))
        return  # numpy < 2.4: nothing to fix
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor
    if getattr(original, "_gradprobe_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._gradprobe_fixed = True
    interpreter._patch_lang_tensor = patched


def _patch_interpreter_nested_calls() -> None:
    """The interpreter re-patches ``triton.language`` (``inspect.getmembers`` over its modules, about
    1 ms) on every call of a ``@triton.jit`` device function, although the enclosing launch already
    patched the same modules (and restores them when it ends). Skip the re-patch inside a launch when
    the helper sees no language module that is not patched yet: it halves the interpreter time of
    the selection kernels, which call small helpers per block. Results are unchanged."""
    import threading

    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter.InterpretedFunction.__call__, "_gradprobe_fixed", False):
        return
    state = threading.local()
    launch, device_call = interpreter.GridExecutor.__call__, interpreter.InterpretedFunction.__call__

    def langs_of(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    def patched_launch(self, *args, **kwargs):
        outer = getattr(state, "patched", None)
        state.patched = langs_of(self.fn)
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.patched = outer

    def patched_device_call(self, *args, **kwargs):
        patched = getattr(state, "patched", None)
        langs = langs_of(self.fn)
        if patched is None or not langs <= patched:
            if patched is not None:
                state.patched = patched | langs
            return device_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    patched_device_call._gradprobe_fixed = True
    interpreter.GridExecutor.__call__ = patched_launch
    interpreter.InterpretedFunction.__call__ = patched_device_call


if INTERPRET:
    _patch_interpreter_numpy24()
    _patch_interpreter_nested_calls()

# per-row fused select: one program per row, BLOCK columns per step
ROW_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=8),
]


def log2_bucket(n: int) -> int:
    """ceil(log2(n)) (0 for n <= 1): the autotune key of a size."""
    return max(0, int(n) - 1).bit_length()


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` over ``configs``, or over its first config only when GRADPROBE_AUTOTUNE=0."""
    return triton.autotune(configs=configs if AUTOTUNE and not INTERPRET else configs[:1], key=key, **kwargs)


def stream_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the streaming (global) kernels for rows of ``n_cols`` elements.

    A tile is BLOCK consecutive columns of one row; narrow rows get a narrower tile so that little
    of it is masked padding.
    """
    block = min(1024, max(16, triton.next_power_of_2(max(1, n_cols))))
    return block, (4 if block >= 512 else 2 if block >= 128 else 1)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(device: torch.device) -> int:
    """Upper bound on the programs of a persistent streaming launch (a few waves per SM on CUDA)."""
    if device.type == "cuda":
        return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter runs programs one after another: few, long programs are fastest
