"""Everything a run writes to survive a crash: atomic files and directories, checksums, resume state.

One room for the file-level rules every resumable part shares (the layerwise pipeline, the probe,
iterative runs, the CLI's run settings, the streamed writer and the final output directory):

* a file is written to ``<name>.tmp`` and renamed over ``<name>`` (``os.replace``), so a reader sees the
  old or the new file, never a torn one; a directory is written as a staging directory beside the
  target and renamed into place (:func:`publish_dir`);
* every state file carries a sha256 of its content (:func:`write_signed_json`) and every tensor file the
  sha256 of its tensors (:func:`tensors_digest`), so bit rot, truncation or a foreign write is detected
  (:class:`ResumeStateWarning`) and the affected part is redone instead of being trusted;
* :class:`ResumeState` is the one resumable run state: an identity (the settings that must match to
  resume) and an ordered prefix of finished steps, each with its tensors and a JSON record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradprobe import distributed
from gradprobe.report import TensorRow

STATE_VERSION = 2  # 2: checksummed state.json and checkpoint files


# --------------------------------------------------------------------------------------------------
# digests
# --------------------------------------------------------------------------------------------------
def sample_checksum(w: torch.Tensor) -> float:
    """Cheap identity of a weight: float64 sum of ~4096 strided elements (no full copy)."""
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    return float(flat[::step].to(torch.float64).sum())


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order (CPU tensors)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of the canonical (sorted-key) JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def batches_digest(batches: torch.Tensor | None) -> str | None:
    """sha256 of the raw bytes of calibration token ids (None for no calibration)."""
    if batches is None:
        return None
    return hashlib.sha256(batches.contiguous().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# atomic files and directories
# --------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.tmp`` and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors ``save_file`` of contiguous CPU ``tensors`` through ``path.tmp`` and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_signed_json(path: Path, obj: Any) -> None:
    """Write ``obj`` plus a sha256 of it atomically (read back with :func:`read_signed_json`)."""
    body = json.dumps(obj, sort_keys=True, default=str)
    text = json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "data": json.loads(body)})
    atomic_write_text(path, text)


def read_signed_json(path: Path) -> Any:
    """What :func:`write_signed_json` wrote; ValueError if it is unreadable or fails its checksum."""
    try:
        wrapped = json.loads(Path(path).read_text())
        data = wrapped["data"]
        body = json.dumps(data, sort_keys=True, default=str)
        ok = wrapped["sha256"] == hashlib.sha256(body.encode()).hexdigest()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable ({type(exc).__name__})") from None
    if not ok:
        raise ValueError(f"{path} fails its checksum")
    return data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_dir(out: Path, staging: Path | None = None) -> Iterator[Path]:
    """A fresh directory to write ``out``'s content into before :func:`publish_dir`: ``staging`` (emptied
    first) or a new hidden sibling of ``out``; whatever is left of it on exit (an error, or not
    published) is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:
        stage = Path(staging)
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
    try:
        yield stage
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def publish_dir(stage: Path, out: Path) -> None:
    """Give every file in the staging directory ``stage`` the usual permissions (0666 & ~umask; mkdtemp
    and safetensors' temporary files are 0600/0700) and rename it to ``out``; an existing (empty, or
    explicitly overwritten) ``out`` is moved aside first and removed only after the swap."""
    mask = _umask()
    os.chmod(stage, 0o777 & ~mask)
    for f in stage.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# the resumable run state
# --------------------------------------------------------------------------------------------------
class ResumeStateWarning(UserWarning):
    """A resume checkpoint failed its checksum or could not be read; the run redoes that part."""


class ResumeState:
    """``resume_dir`` layout: ``state.json`` + ``layer_XXXX.safetensors`` (pruned weights) or
    ``norms_XXXX.safetensors`` (scope "global": dense norms). Files are written atomically.

    Integrity: ``state.json`` carries a sha256 of its own content; every checkpoint file carries, in its
    safetensors metadata, the sha256 of its tensors, its layer record and the run identity's digest.
    A checkpoint that fails its checksum (bit rot, truncation, a foreign write) is reported with a
    :class:`ResumeStateWarning` and that layer and every later one are redone; an unreadable or corrupt
    ``state.json`` is rebuilt from the checkpoint files that verify (the longest prefix of layers).
    """

    def __init__(self, directory: str | os.PathLike, identity: dict[str, Any], checksums: dict[str, float]):
        self.dir = Path(directory)
        self.path = self.dir / "state.json"
        self.identity_digest = json_digest(identity)
        self._verified: dict[int, dict[str, torch.Tensor]] = {}  # layer -> tensors that passed the checksum
        fresh = {
            "version": STATE_VERSION,
            "identity": identity,
            "checksums": checksums,
            "finished": {},
            "complete": False,
        }
        state = self._read_state() if self.path.exists() else None
        if state is not None and state.get("identity") != identity:
            diff = sorted(k for k in identity if state.get("identity", {}).get(k) != identity[k])
            raise ValueError(
                f"resume_dir {str(self.dir)!r} was written by a different run (differs in: {', '.join(diff)}); "
                "use a new resume_dir or delete this one"
            )
        if state is None and self.path.exists():
            self.state = fresh
            self._rebuild()
        else:
            self.state = state if state is not None else fresh

    def _read_state(self) -> dict[str, Any] | None:
        """The parsed state, or None (with a warning) when it is unreadable or fails its checksum."""
        try:
            state = json.loads(self.path.read_text())
            body = {k: v for k, v in state.items() if k != "sha256"}
            ok = isinstance(state, dict) and state.get("sha256") == json_digest(body)
        except (OSError, ValueError, AttributeError):
            ok = False
        if ok:
            return state
        warnings.warn(
            f"resume state {str(self.path)!r} is unreadable or fails its checksum; rebuilding it from the "
            "layer checkpoints that verify",
            ResumeStateWarning,
            stacklevel=3,
        )
        return None

    def _rebuild(self) -> None:
        """Recover ``finished`` from the checkpoint files: layers 0, 1, ... while each verifies."""
        i = 0
        while True:
            got = None
            for kind in ("layer", "norms"):
                if (self.dir / f"{kind}_{i:04d}.safetensors").exists():
                    got = self._load_verified(kind, i, report=True)
                    break
            if got is None:
                break
            tensors, record = got
            self.state["finished"][str(i)] = record
            del tensors  # verified again (and kept) when the layer is restored
            i += 1
        self.flush()

    def _load_verified(self, kind: str, i: int, report: bool) -> tuple[dict[str, torch.Tensor], dict] | None:
        from safetensors import safe_open

        path = self.dir / f"{kind}_{i:04d}.safetensors"
        problem = None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
            record = json.loads(meta.get("gradprobe_record", "null"))
            if meta.get("gradprobe_identity") != self.identity_digest:
                problem = "belongs to another run"
            elif meta.get("gradprobe_sha256") != tensors_digest(tensors) or not isinstance(record, dict):
                problem = "fails its checksum"
        except Exception as exc:  # truncated / garbled header: safetensors raises its own errors
            problem = f"cannot be read ({type(exc).__name__})"
        if problem is None:
            return tensors, record
        if report:
            warnings.warn(
                f"resume checkpoint {str(path)!r} {problem}; redoing layer {i} and every later layer",
                ResumeStateWarning,
                stacklevel=4,
            )
        return None

    def finished(self, i: int) -> bool:
        """True if layer ``i`` finished and its checkpoint verifies; a bad checkpoint is reported and
        layer ``i`` and all later layers are marked unfinished (they are recomputed)."""
        entry = self.state["finished"].get(str(i))
        if entry is None:
            return False
        if i not in self._verified:
            self._verified = {}  # drop the previous layer's tensors first: one layer in memory
            got = self._load_verified(entry.get("kind", "layer"), i, report=True)
            if got is None or got[1].get("rows") != entry.get("rows"):
                for k in [k for k in self.state["finished"] if int(k) >= i]:
                    del self.state["finished"][k]
                self.flush()
                return False
            self._verified = {i: got[0]}  # keep one layer's tensors: the one about to be restored
        return True

    def rows(self, i: int) -> list[TensorRow]:
        return [TensorRow.from_dict(d) for d in self.state["finished"][str(i)]["rows"]]

    def seconds(self, i: int) -> float:
        return float(self.state["finished"][str(i)]["seconds"])

    def tensors(self, kind: str, i: int) -> dict[str, torch.Tensor]:
        if i in self._verified or self.finished(i):
            return self._verified[i]
        raise ValueError(f"resume_dir {str(self.dir)!r} has no verified checkpoint of layer {i}")

    def mark(
        self, kind: str, i: int, tensors: dict[str, torch.Tensor], rows: list[TensorRow], seconds: float
    ) -> None:
        record = {"kind": kind, "rows": [r.to_dict() for r in rows], "seconds": seconds}
        self._verified.pop(i, None)  # a record replacing another (norms -> layer) must not serve the old tensors
        if not distributed.is_writer():  # rank 0 writes; the others keep the same state in memory
            self.state["finished"][str(i)] = record
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {
            "gradprobe_identity": self.identity_digest,
            "gradprobe_record": json.dumps(record),
            "gradprobe_sha256": tensors_digest(cpu),
        }
        save_tensors_atomic(self.dir / f"{kind}_{i:04d}.safetensors", cpu, meta)
        self.state["finished"][str(i)] = record
        self.flush()

    def flush(self) -> None:
        if not distributed.is_writer():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        body = {k: v for k, v in self.state.items() if k != "sha256"}
        self.state = body | {"sha256": json_digest(body)}
        atomic_write_text(self.path, json.dumps(self.state, indent=1))

    def check_model(self, groups: dict[int, dict[str, nn.Linear]]) -> None:
        """Every layer must be dense (checksum) or, if finished, equal to its saved pruned weights."""
        saved = self.state["checksums"]
        for i, linears in groups.items():
            for name, lin in linears.items():
                key = f"{i}.{name}"
                if sample_checksum(lin.weight) == saved.get(key):
                    continue
                if self.finished(i) and (self.dir / f"layer_{i:04d}.safetensors").exists():
                    t = self.tensors("layer", i).get(name)
                    if t is not None and torch.equal(t, lin.weight.detach().cpu()):
                        continue
                raise ValueError(
                    f"resume_dir {str(self.dir)!r}: weights of layer {i} {name} match neither the dense model it was "
                    "started on nor its saved pruned state (was the model modified by the interrupted run?); "
                    "reload the original model and rerun"
                )


