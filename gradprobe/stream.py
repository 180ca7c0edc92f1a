"""Prune a model larger than host memory: one decoder layer at a time, streamed from its safetensors.

:func:`prune_streamed` builds the model skeleton on the meta device (parameters only: the rotary
buffers are computed on the CPU as ``from_pretrained`` computes them), keeps the small non-layer
tensors (final norm) in memory and hands the driver (:class:`gradprobe.pipeline.layerwise.LayerwisePruner`, the
one layer loop) a :class:`StreamedWeights` layer provider: before layer ``i`` is touched its tensors
are read from the memory-mapped shards (``safetensors.safe_open``), after it is pruned and
checkpointed they go back to the meta device. The input embeddings are loaded only around the
calibration capture and lm_head only when it is pruned.

Peak host memory ~= max(embeddings, one decoder layer) + the calibration activations (two buffers of
nsamples x seqlen x hidden) + the selection's temporaries for one tensor, whatever the number of layers.

Scope "global" streams too (:mod:`gradprobe.pipeline.global_scope`): the dense-norm pass visits each
layer once (the norms, in_features floats per tensor, stay in memory), two histogram passes read every
layer again to find the exact global threshold, and the mask pass reads, prunes and checkpoints each
layer: three reads of the weights (four for Wanda), one layer in memory at a time.

The output is written by :class:`StreamedCheckpoint` into the staging directory of
:func:`gradprobe.io.save_pruned` (atomic rename, never into the source): every source shard is
rewritten under its own name, tensor by tensor, with the pruned linears taken from the driver's
checksummed per-layer checkpoints (verified on read) and every other tensor copied from the source
(raw bytes when the dtype is unchanged). ``model.safetensors.index.json`` keeps the source's
tensor -> shard map. Disk: the checkpoints and the output each take about the model's size until
the run ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradprobe import distributed
from gradprobe._checkpoint import ResumeState
from gradprobe.config import PruneConfig
from gradprobe.pipeline.calibration import EMBEDDINGS, LM_HEAD
from gradprobe.pipeline.layerwise import LayerwisePruner
from gradprobe.report import PruneReport, TensorRow

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# safetensors dtype names <-> torch dtypes (the formats' own spelling)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
# top-level source files copied to the output (config, generation config, tokenizer, chat template)
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_COPY_CHUNK = 64 << 20


# --------------------------------------------------------------------------------------------------
# the source checkpoint
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a source shard: byte range [begin, end) of the file."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(safetensors JSON header, byte offset of the data section) of ``path``."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ValueError(f"{str(path)!r} is not a safetensors file (header size {n})")
        return json.loads(f.read(n)), 8 + n


class SourceCheckpoint:
    """A local Hugging Face checkpoint directory with safetensors weights (one file or sharded).

    Reads headers only; :meth:`load` reads tensors through ``safe_open`` (memory-mapped).
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory).expanduser().resolve()
        if not (self.dir / "config.json").is_file():
            raise ValueError(f"model_dir {str(self.dir)!r} is not a Hugging Face checkpoint directory (no config.json)")
        index = self.dir / INDEX
        if index.is_file():
            self.index: dict[str, Any] | None = json.loads(index.read_text())
            shards = sorted(set(self.index["weight_map"].values()))
        elif (self.dir / SINGLE).is_file():
            self.index, shards = None, [SINGLE]
        else:
            raise ValueError(
                f"model_dir {str(self.dir)!r} has neither {SINGLE} nor {INDEX}; streaming reads safetensors "
                "checkpoints saved by save_pretrained"
            )
        self.shards = shards
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        h = hashlib.sha256()
        for shard in shards:
            path = self.dir / shard
            if not path.is_file():
                raise ValueError(f"model_dir {str(self.dir)!r} misses weight shard {shard}")
            header, base = _read_header(path)
            self.metadata[shard] = header.pop("__metadata__", None) or {}
            h.update(f"{shard}|{path.stat().st_size}|".encode() + json.dumps(header, sort_keys=True).encode())
            for name, e in header.items():
                if name in self.entries:
                    raise ValueError(f"tensor {name!r} is in both {self.entries[name].shard} and {shard}")
                b, end = e["data_offsets"]
                self.entries[name] = TensorEntry(name, shard, e["dtype"], tuple(e["shape"]), base + b, base + end)
        if self.index is not None:
            wrong = [n for n, s in self.index["weight_map"].items() if n in self.entries and self.entries[n].shard != s]
            if wrong:
                raise ValueError(f"{INDEX} of {str(self.dir)!r} places {wrong[:3]} in other shards than hold them")
        self.fingerprint = h.hexdigest()

    def load(self, names: list[str], dtype_of: Callable[[str], torch.dtype]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` as CPU tensors, each cast to ``dtype_of(name)``."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.entries[n].shard, []).append(n)
        out = {}
        for shard, ns in by_shard.items():
            with safe_open(str(self.dir / shard), framework="pt") as f:
                for n in ns:
                    out[n] = f.get_tensor(n).to(dtype_of(n))
        return out


# --------------------------------------------------------------------------------------------------
# the layer provider
# --------------------------------------------------------------------------------------------------
def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer ``name`` (a state-dict key) of ``model`` by ``value``."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(f"the model has no parameter or buffer {name!r}")


class StreamedWeights:
    """The :class:`gradprobe.pipeline.LayerProvider` of a meta-device skeleton and its source checkpoint."""

    def __init__(self, model: nn.Module, source: SourceCheckpoint, groups: dict[int, list[str]]):
        self.model, self.source, self.groups = model, source, groups
        self.fingerprint = source.fingerprint
        self._dtypes = {k: v.dtype for k, v in model.state_dict().items()}

    def materialize(self, i: int) -> None:
        for name, t in self.source.load(self.groups.get(i, []), self._dtypes.__getitem__).items():
            _set_tensor(self.model, name, t)

    def release(self, i: int) -> None:
        for name in self.groups.get(i, []):
            _set_tensor(self.model, name, torch.empty(self.source.entries[name].shape, dtype=self._dtypes[name],
                                                      device="meta"))
        trim_heap()


def trim_heap() -> None:
    """Hand the heap pages freed by a released layer back to the OS (glibc ``malloc_trim(0)``; a no-op
    elsewhere). glibc serves allocations below its dynamic mmap threshold (up to 32 MiB: a layer's
    weights, the selection's chunk temporaries) from the heap and keeps the freed pages; over many layers
    the process then grows by tens of MiB per layer read although nothing is live (measured: the
    streamed global selection of a 24-layer 2.5 GiB model peaked at 1.57 GiB without the trim, 0.84 GiB
    with it)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_LIBC: list = []


def _libc():
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(lib if hasattr(lib, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def build_skeleton(source: SourceCheckpoint, dtype: Any = "auto") -> tuple[nn.Module, dict[int, list[str]]]:
    """(model with every parameter on the meta device, state-dict names per provider group).

    Groups: decoder layer i -> its tensors; ``num_layers`` -> lm_head; :data:`EMBEDDINGS` -> the
    input embeddings; ``None`` -> everything else (final norm, ...), loaded here and kept.
    The skeleton's dtype is what ``from_pretrained(dtype=dtype)`` would give.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradprobe.io import parse_dtype
    from gradprobe.models import get_adapter

    cfg = AutoConfig.from_pretrained(source.dir)
    adapter = get_adapter(cfg)  # unsupported family -> ValueError before anything is loaded
    dt = parse_dtype(dtype)
    if dt in (None, "auto"):
        dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(dt, str):
            dt = getattr(torch, dt)
        if dt is None:  # as from_pretrained's "auto": the checkpoint's first floating dtype
            dt = next((ST_DTYPES[e.dtype] for e in source.entries.values() if ST_DTYPES[e.dtype].is_floating_point),
                      torch.float32)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    model.tie_weights()  # from_config under init_empty_weights leaves a tied lm_head untied
    model.eval()
    names = _module_names(model)
    state = model.state_dict()
    missing = [k for k in state if k not in source.entries and not _is_tied_copy(model, k, source)]
    if missing:
        raise ValueError(
            f"model_dir {str(source.dir)!r} lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}; "
            "streaming needs a complete checkpoint"
        )
    groups: dict[int | None, list[str]] = {}
    prefixes = [(i, names[id(layer)] + ".") for i, layer in enumerate(adapter.decoder_layers(model))]
    special = {names[id(adapter.embed(model))] + ".": EMBEDDINGS}
    head = adapter.lm_head(model)
    if head is not None and not adapter.lm_head_tied(model):
        special[names[id(head)] + "."] = len(prefixes)
    for k in state:
        if k not in source.entries:
            continue
        g = next((i for p, i in special.items() if k.startswith(p)), None)
        if g is None:
            g = next((i for i, p in prefixes if k.startswith(p)), None)
        groups.setdefault(g, []).append(k)
    keep = groups.pop(None, [])
    dtypes = {k: v.dtype for k, v in state.items()}
    for k, t in source.load(keep, dtypes.__getitem__).items():
        _set_tensor(model, k, t)
    return model, groups  # type: ignore[return-value]


def _is_tied_copy(model: nn.Module, key: str, source: SourceCheckpoint) -> bool:
    """``key`` shares its parameter with a key the source holds (tied lm_head / embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and any(q is p and k in source.entries for k, q in params.items() if k != key)


# --------------------------------------------------------------------------------------------------
# the output
# --------------------------------------------------------------------------------------------------
class StreamedCheckpoint:
    """The pruned model as :func:`gradprobe.io.save_pruned` writes it: ``save_pretrained(dir)``
    writes every source shard under its own name, tensor by tensor (a layer at most in memory)."""

    def __init__(
        self,
        source: SourceCheckpoint,
        model: nn.Module,
        resume: ResumeState,
        pruned: dict[str, tuple[int, str]],
        dtype_changed: bool,
    ):
        self.source, self.model, self.resume, self.pruned = source, model, resume, pruned
        self.name_or_path = str(source.dir)  # save_pruned refuses to write into it
        self.config = model.config
        self._dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        self._dtype_changed = dtype_changed

    def _names(self, shard: str) -> list[str]:
        es = [e for e in self.source.entries.values() if e.shard == shard and e.name in self._dtypes]
        return [e.name for e in sorted(es, key=lambda e: e.begin)]

    def _tensor(self, name: str) -> torch.Tensor | None:
        """The pruned weight (from its verified checkpoint), a cast copy, or None (raw copy)."""
        if name in self.pruned:
            i, lin = self.pruned[name]
            t = self.resume.tensors("layer", i)[lin]  # verified against its sha256 when loaded
            e = self.source.entries[name]
            if tuple(t.shape) != e.shape or t.dtype != self._dtypes[name]:
                raise RuntimeError(f"checkpoint of {name} has {tuple(t.shape)} {t.dtype}, expected {e.shape}")
            return t.contiguous()
        if ST_DTYPES[self.source.entries[name].dtype] != self._dtypes[name]:
            return self.source.load([name], self._dtypes.__getitem__)[name]
        return None

    def _write_shard(self, shard: str, path: Path) -> int:
        """Write ``shard`` to ``path`` in the safetensors format; returns the bytes of tensor data.

        safetensors' own writers take every tensor at once; this one streams (header: 8-byte
        little-endian length, JSON padded with spaces to a multiple of 8, then the data in order).
        """
        names = self._names(shard)
        header: dict[str, Any] = {}
        off = 0
        for n in names:
            e, dt = self.source.entries[n], self._dtypes[n]
            size = (e.end - e.begin) // ST_DTYPES[e.dtype].itemsize * dt.itemsize
            header[n] = {"dtype": ST_NAMES[dt], "shape": list(e.shape), "data_offsets": [off, off + size]}
            off += size
        header["__metadata__"] = self.source.metadata.get(shard) or {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(self.source.dir / shard, "rb") as src, open(path, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for n in names:
                t = self._tensor(n)
                if t is None:  # unchanged tensor: the source's bytes
                    e = self.source.entries[n]
                    src.seek(e.begin)
                    left = e.end - e.begin
                    while left:
                        chunk = src.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise OSError(f"{shard} ends inside tensor {n}")
                        out.write(chunk)
                        left -= len(chunk)
                else:
                    out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            out.flush()
            os.fsync(out.fileno())
        return off

    def save_pretrained(self, directory: str | os.PathLike, safe_serialization: bool = True) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.source.dir.iterdir()):
            if f.is_file() and f.suffix in AUX_SUFFIXES and f.name != INDEX and not f.name.startswith("."):
                shutil.copy2(f, directory / f.name)
        if self._dtype_changed:  # the config records the dtype the weights are saved in
            self.config.save_pretrained(directory)
        total = 0
        for shard in self.source.shards:
            total += self._write_shard(shard, directory / shard)
        if self.source.index is not None:
            index = dict(self.source.index)
            index["metadata"] = dict(index.get("metadata") or {}) | {"total_size": total}
            index["weight_map"] = {k: v for k, v in self.source.index["weight_map"].items() if k in self._dtypes}
            (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
def prune_streamed(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PruneConfig | None = None,
    batches: torch.Tensor | None = None,
    *,
    dtype: Any = "auto",
    overwrite: bool = False,
    resume: bool = True,
    callback: Callable[[int, list[TensorRow]], None] | None = None,
    plots: bool = True,
    save: Callable[..., Path] | None = None,
) -> PruneReport:
    """Prune the checkpoint in ``model_dir`` into ``out_dir`` with one decoder layer in memory at a time.

    The result equals, bit for bit, ``gradprobe.prune(AutoModelForCausalLM.from_pretrained(model_dir,
    dtype=dtype), batches, config)`` saved with :func:`gradprobe.io.save_pruned`; ``out_dir`` keeps the
    source's shard names and ``model.safetensors.index.json`` tensor -> shard map, and the config,
    generation config and tokenizer files.

    Args:
        model_dir: a local checkpoint directory (``model.safetensors``, or shards + index).
        out_dir: the output directory; must not overlap ``model_dir``; written atomically.
        config: the :class:`PruneConfig` (scope "row", "layer" or "global", N:M, per-layer
            sparsities, any ``mask_fn``).
        batches: calibration token ids, int64 (nsamples, seqlen), for Wanda / SparseGPT; None for
            magnitude.
        dtype: "auto" (the checkpoint's) or a dtype, as ``from_pretrained(dtype=...)``.
        overwrite: replace a non-empty ``out_dir``.
        resume: continue an interrupted run from the checkpoints in ``io.partial_dir(out_dir)``
            (verified by their sha256; a run with other settings there is an error); False discards them.
        callback: ``callback(layer_idx, rows)`` after each finished layer.
        plots: write the report's PNG plots (needs matplotlib).
        save: the saver (default :func:`gradprobe.io.save_pruned`), called as ``save(checkpoint,
            None, out_dir, report, overwrite=..., staging=...)``; the CLI adds its run record here.

    Returns:
        The :class:`PruneReport` (also saved in ``out_dir``).

    Raises:
        ValueError / FileExistsError: a bad ``model_dir``, ``out_dir`` or option (checked before any
            weight is read).
    """
    from gradprobe import io
    from gradprobe.preflight import check_out_location

    config = config if config is not None else PruneConfig()
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a gradprobe.PruneConfig or None, got {type(config).__name__}")
    source = SourceCheckpoint(model_dir)
    out = io.check_out_dir(out_dir, source=source.dir, overwrite=overwrite)
    check_out_location(out, flag="out_dir")
    model, groups = build_skeleton(source, dtype)
    partial = io.partial_dir(out)
    if not resume and partial.exists() and distributed.is_writer():
        shutil.rmtree(partial)
    distributed.barrier()  # under torch.distributed every rank streams the same layer; rank 0 writes
    provider = StreamedWeights(model, source, groups)
    pruner = LayerwisePruner(
        model, config, batches, resume_dir=partial / "checkpoint", callback=callback, layer_provider=provider
    )
    report = pruner.run()
    names = _module_names(model)
    pruned = {
        names[id(lin)] + ".weight": (i, n) for i, g in pruner.groups.items() for n, lin in g.items()
    }
    stored = {e.name: ST_DTYPES[e.dtype] for e in source.entries.values()}
    dtype_changed = any(stored[k] != v.dtype for k, v in model.state_dict().items() if k in stored)
    ckpt = StreamedCheckpoint(source, model, pruner.resume, pruned, dtype_changed)
    with distributed.guard():
        if distributed.is_writer():
            if save is None:
                io.save_pruned(ckpt, None, out, report, overwrite=overwrite, staging=partial / "model", plots=plots)
            else:
                save(ckpt, None, out, report, overwrite=overwrite, staging=partial / "model")
            shutil.rmtree(partial, ignore_errors=True)
        distributed.barrier()  # a failed save on rank 0 is an error on every rank
    return report


__all__ = ["LM_HEAD", "SourceCheckpoint", "StreamedCheckpoint", "StreamedWeights", "build_skeleton", "prune_streamed"]
