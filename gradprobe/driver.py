"""Sequential layerwise pruning (Wanda / magnitude) of a Hugging Face decoder-only LM.

Algorithm (as the Wanda reference, https://github.com/locuslab/wanda/blob/main/lib/prune.py):

1. :func:`capture_calibration` embeds the calibration windows once: ``inputs`` (N, L, H) in the
   model's dtype on ``config.device`` = the inputs of decoder layer 0.
2. For each decoder layer: move it to the device; run it on all windows with
   :class:`gradprobe.stats.LayerStats` hooks (fp32 per-input-channel sum of squares); select and
   prune every prunable linear in place (``config.mask_fn`` or :func:`gradprobe.prune_`); re-run the
   *pruned* layer to produce the next layer's inputs into the second buffer; swap buffers; move the
   layer back.
3. Scope "global": one pass over the dense model collects all norms, then one
   :func:`gradprobe.global_prune_` over every prunable tensor (on the weights' device).

Resume: after every finished layer the pruned linears are saved (safetensors) with a JSON state.
A rerun restores finished layers and *recomputes* their outputs from the layer-0 inputs with the
restored (pruned) weights instead of storing activations (N*L*H per boundary: 2 GiB at 128x2048x4096
bf16). The recomputation repeats exactly the forwards of the uninterrupted run, so the result is
bit-identical on a deterministic device.

Under ``torch.distributed`` (:mod:`gradprobe.distributed`) each rank embeds and propagates only its
contiguous share of the windows; the statistics are combined in global sample order, so every rank
selects the masks one process selects (checked by a digest per layer before the checkpoint is written,
by rank 0 only).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gradprobe import distributed
from gradprobe.config import PruneConfig
from gradprobe.models import ModelAdapter, get_adapter
from gradprobe.report import PruneReport, TensorRow
from gradprobe.select import global_prune_, prune_
from gradprobe.stats import ChannelStats, LayerStats

LM_HEAD = "lm_head"
STATE_VERSION = 2  # 2: checksummed state.json and checkpoint files


# --------------------------------------------------------------------------------------------------
# calibration capture (reusable by the gradient probe / OWL drivers)
# --------------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Inputs of decoder layer 0 for all calibration windows, and the per-layer forward kwargs.

    Attributes:
        inputs: (nsamples, seqlen, hidden) in the model's dtype, on ``config.device``.
    """

    model: nn.Module
    adapter: ModelAdapter
    inputs: torch.Tensor
    batch_size: int
    _kwargs: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def nsamples(self) -> int:
        return self.inputs.shape[0]

    @property
    def seqlen(self) -> int:
        return self.inputs.shape[1]

    def kwargs_for(self, layer_idx: int, bsz: int) -> dict[str, Any]:
        """Forward kwargs of decoder layer ``layer_idx`` for a batch of ``bsz`` windows (cached)."""
        key = (layer_idx, bsz)
        if key not in self._kwargs:
            self._kwargs[key] = self.adapter.layer_forward_kwargs(
                self.model, self.inputs[:bsz], None, None, layer_idx=layer_idx
            )
        return self._kwargs[key]

    def run_layer(
        self, layer: nn.Module, layer_idx: int, src: torch.Tensor, dst: torch.Tensor | None
    ) -> None:
        """dst[b] = layer(src[b]) for every batch of windows; ``dst=None`` discards outputs."""
        for b0 in range(0, src.shape[0], self.batch_size):
            x = src[b0 : b0 + self.batch_size]
            out = self.adapter.layer_output(layer(x, **self.kwargs_for(layer_idx, x.shape[0])))
            if dst is not None:
                dst[b0 : b0 + x.shape[0]].copy_(out)


def check_batches(batches: Any, vocab_size: int | None) -> torch.Tensor:
    """Validate calibration token ids: an integer tensor (nsamples, seqlen), non-empty, ids in range."""
    if not isinstance(batches, torch.Tensor):
        raise TypeError(
            f"calibration batches must be an int64 tensor (nsamples, seqlen) or a tokenizer, got {type(batches).__name__}"
        )
    if batches.dtype.is_floating_point or batches.dtype.is_complex or batches.dtype == torch.bool:
        raise TypeError(f"calibration batches must hold integer token ids (int64), got {batches.dtype}")
    if batches.dim() != 2:
        raise ValueError(
            f"calibration batches must be 2-D (nsamples, seqlen), got shape {tuple(batches.shape)}"
        )
    if batches.numel() == 0:
        raise ValueError(
            f"calibration batches are empty (shape {tuple(batches.shape)}); give at least one window of >= 1 token"
        )
    check_token_ids(batches, vocab_size, "calibration token ids")
    return batches.to(torch.int64)


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, name: str = "token ids") -> None:
    """ValueError naming ``name`` unless every id of the integer tensor ``ids`` is in [0, vocab_size)
    (an out-of-range id would otherwise surface as a bare IndexError inside the embedding)."""
    if ids.numel() == 0 or ids.device.type == "meta":
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise ValueError(f"{name} must be in [0, vocab_size={vocab_size}), got range [{lo}, {hi}]")


@torch.no_grad()
def capture_calibration(
    model: nn.Module, batches: torch.Tensor, config: PruneConfig, adapter: ModelAdapter | None = None
) -> Calibration:
    """Embed ``batches`` (nsamples, seqlen) int64 into the layer-0 inputs on ``config.device``.

    Only the embedding runs (on its own device); the result is (nsamples, seqlen, hidden) in the
    embedding's dtype. Under ``torch.distributed`` only this rank's samples
    (:func:`gradprobe.distributed.sample_range`) are embedded: nsamples is then the local count.
    """
    batches = distributed.local_slice(batches)
    adapter = adapter or get_adapter(model)
    embed = adapter.embed(model)
    dev = torch.device(config.device)
    n, seqlen = batches.shape
    inputs = torch.empty((n, seqlen, embed.embedding_dim), dtype=embed.weight.dtype, device=dev)
    for b0 in range(0, n, config.batch_size):
        ids = batches[b0 : b0 + config.batch_size].to(embed.weight.device)
        inputs[b0 : b0 + ids.shape[0]].copy_(embed(ids))
    return Calibration(model=model, adapter=adapter, inputs=inputs, batch_size=config.batch_size)


# --------------------------------------------------------------------------------------------------
# pluggable steps
# --------------------------------------------------------------------------------------------------
@dataclass
class TensorContext:
    """What a ``mask_fn`` / ``sparsity_fn`` may need besides the weight."""

    layer_idx: int
    name: str
    config: PruneConfig
    module: nn.Linear
    stats: ChannelStats | None = None


def default_mask_fn(
    weight: torch.Tensor, norm: torch.Tensor | None, sparsity: float | None, ctx: TensorContext
) -> torch.Tensor:
    """Built-in select-and-prune: :func:`gradprobe.prune_` with the config's scope / structure."""
    if ctx.config.structure is not None:
        return prune_(weight, None, norm=norm, structure=ctx.config.structure)
    return prune_(weight, sparsity, norm=norm, scope=ctx.config.scope)


def resolve_sparsity(
    config: PruneConfig, names: list[tuple[int, str]], num_layers: int
) -> dict[tuple[int, str], float | None]:
    """Target sparsity of every (layer index, tensor name), fixed before the loop.

    lm_head has layer index ``num_layers``. A per-layer list needs ``num_layers`` entries (one more
    when lm_head is pruned); a mapping may omit layers (they stay dense). Under N:M every target is
    None. ``config.sparsity_fn(layer_idx, name, config)`` overrides all of this.
    """
    has_head = any(i == num_layers for i, _ in names)
    n_expected = num_layers + int(has_head)
    s = config.sparsity
    out: dict[tuple[int, str], float | None] = {}
    if isinstance(s, tuple) and len(s) != n_expected:
        raise ValueError(
            f"PruneConfig.sparsity has {len(s)} entries but the model has {num_layers} decoder layers"
            + (" (+1 for lm_head)" if has_head else "")
            + f"; give {n_expected}"
        )
    if isinstance(s, dict):
        bad = [k for k in s if k >= n_expected]
        if bad:
            raise ValueError(
                f"PruneConfig.sparsity has layer indices {bad} but the model has layers 0..{n_expected - 1}"
            )
    for i, name in names:
        if config.structure is not None:
            v: float | None = None
        elif config.sparsity_fn is not None:
            from gradprobe.config import _check_fraction

            v = _check_fraction(config.sparsity_fn(i, name, config), f"sparsity_fn({i}, {name!r})")
        elif isinstance(s, tuple):
            v = s[i]
        elif isinstance(s, dict):
            v = s.get(i, 0.0)
        else:
            v = s
        out[(i, name)] = v
    return out


# --------------------------------------------------------------------------------------------------
# resume state
# --------------------------------------------------------------------------------------------------
def _sample_checksum(w: torch.Tensor) -> float:
    """Cheap identity of a weight: float64 sum of ~4096 strided elements (no full copy)."""
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    return float(flat[::step].to(torch.float64).sum())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        from safetensors.torch import save_file

        record = {"kind": kind, "rows": [r.to_dict() for r in rows], "seconds": seconds}
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
        path = self.dir / f"{kind}_{i:04d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(cpu, str(tmp), metadata=meta)
        os.replace(tmp, path)
        self.state["finished"][str(i)] = record
        self.flush()

    def flush(self) -> None:
        if not distributed.is_writer():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        body = {k: v for k, v in self.state.items() if k != "sha256"}
        self.state = body | {"sha256": json_digest(body)}
        _atomic_write_text(self.path, json.dumps(self.state, indent=1))

    def check_model(self, groups: dict[int, dict[str, nn.Linear]]) -> None:
        """Every layer must be dense (checksum) or, if finished, equal to its saved pruned weights."""
        saved = self.state["checksums"]
        for i, linears in groups.items():
            for name, lin in linears.items():
                key = f"{i}.{name}"
                if _sample_checksum(lin.weight) == saved.get(key):
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


# --------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------
EMBEDDINGS = -1  # LayerProvider group of the input embeddings (needed only by the calibration capture)


class LayerProvider(Protocol):
    """Supplies weights on demand, so the whole model need not be in memory (:mod:`gradprobe.stream`).

    The model given to :class:`LayerwisePruner` may then hold its decoder layers, lm_head and input
    embeddings on the meta device. Group ``i`` is decoder layer ``i`` for ``0 <= i < num_layers``,
    lm_head for ``i == num_layers`` (only when pruned) and the input embeddings for
    ``i == EMBEDDINGS`` (only around the calibration capture). The driver calls ``materialize(i)``
    before it touches group ``i`` (its dense weights must then be real CPU tensors) and ``release(i)``
    once the group is finished and its pruned weights are in the resume checkpoint.
    ``fingerprint`` identifies the source weights in the resume identity (it replaces the dense
    weights' checksums, which would need every weight in memory).
    """

    fingerprint: str

    def materialize(self, i: int) -> None: ...

    def release(self, i: int) -> None: ...


def _row(
    i: int, name: str, w: torch.Tensor, mask: torch.Tensor, target: float | None, secs: float
) -> TensorRow:
    return TensorRow(
        layer=i,
        name=name,
        shape=(int(w.shape[0]), int(w.shape[1])),
        numel=w.numel(),
        pruned=int(mask.sum()),
        target=target,
        seconds=secs,
    )


def _batches_digest(batches: torch.Tensor | None) -> str | None:
    if batches is None:
        return None
    return hashlib.sha256(batches.contiguous().numpy().tobytes()).hexdigest()


def restored_note(layers: list[int]) -> str:
    """``"restored 0-3, 5"``: the layers taken from the resume checkpoint, as ranges (progress bar text)."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return "restored " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class LayerwisePruner:
    """One pruning run. Build with the model, validated config and (for Wanda) calibration ids.

    All validation happens in ``__init__``; :meth:`run` is the only method that modifies the model.
    With a ``layer_provider`` (:class:`LayerProvider`) the model may live on the meta device: the loop
    asks the provider for each layer's weights and hands them back once the layer is checkpointed.
    """

    def __init__(
        self,
        model: nn.Module,
        config: PruneConfig,
        batches: torch.Tensor | None,
        resume_dir: str | os.PathLike | None = None,
        callback: Callable[[int, list[TensorRow]], None] | None = None,
        layer_provider: LayerProvider | None = None,
    ):
        self.model, self.config, self.callback = model, config, callback
        self.provider = layer_provider
        self.adapter = get_adapter(model)
        self.layers = self.adapter.decoder_layers(model)
        self.num_layers = len(self.layers)
        if self.num_layers == 0:
            raise ValueError("the model has no decoder layers to prune")
        self.groups: dict[int, dict[str, nn.Linear]] = {
            i: self.adapter.prunable_linears(layer) for i, layer in enumerate(self.layers)
        }
        if config.include_lm_head:
            head = self.adapter.lm_head(model)
            if head is None:
                raise ValueError("PruneConfig.include_lm_head=True but the model has no lm_head")
            if self.adapter.lm_head_tied(model):
                raise ValueError(
                    "PruneConfig.include_lm_head=True but lm_head is tied to the input embeddings "
                    "(pruning it would prune embed_tokens too); untie it or leave include_lm_head=False"
                )
            self.groups[self.num_layers] = {LM_HEAD: head}
        names = [(i, n) for i, g in self.groups.items() for n in g]
        self.targets = resolve_sparsity(config, names, self.num_layers)
        if config.nm is not None:
            m = config.nm[1]
            for (i, n), lin in ((k, self.groups[k[0]][k[1]]) for k in names):
                if lin.in_features % m:
                    raise ValueError(
                        f"structure={config.structure!r} needs in_features divisible by {m}; "
                        f"layer {i} {n} has in_features={lin.in_features}"
                    )
        if layer_provider is not None and config.scope == "global":
            raise ValueError(
                "scope='global' needs every layer's scores at once and cannot stream one layer at a time; "
                "use scope='row' or 'layer', or prune in memory"
            )
        if config.scope == "global" and config.mask_fn is not None:
            raise ValueError("PruneConfig.mask_fn is per tensor and cannot be combined with scope='global'")
        self.wanda = config.needs_calibration
        if self.wanda:
            if batches is None:
                raise ValueError(
                    f"method={config.method!r} needs calibration batches (int64 (nsamples, seqlen)) or a tokenizer"
                )
            batches = check_batches(batches, getattr(model.config, "vocab_size", None))
        self.batches = batches if self.wanda else None
        self.mask_fn = config.mask_fn or default_mask_fn
        self.hessian = config.method == "sparsegpt"
        if self.hessian and distributed.active():
            raise ValueError(
                "method='sparsegpt' is not supported with several processes (torch.distributed): its "
                "in_features^2 Hessian sum depends on the summation order, so masks would differ between "
                "world sizes; run it in one process"
            )
        if self.hessian and config.mask_fn is None:
            from gradprobe.sparsegpt import SparseGPTMaskFn

            self.mask_fn = SparseGPTMaskFn()
        self.resume = None
        if resume_dir is not None:
            identity = {
                "version": STATE_VERSION,
                "config": config.fingerprint(),
                "model_type": model.config.model_type,
                "num_layers": self.num_layers,
                "shapes": {
                    f"{i}.{n}": list(lin.weight.shape) for i, g in self.groups.items() for n, lin in g.items()
                },
                "batches_sha256": _batches_digest(self.batches),
            }
            if layer_provider is not None:  # weights are loaded dense from the source on every materialize
                identity["source"] = layer_provider.fingerprint
            checksums = {
                f"{i}.{n}": _sample_checksum(lin.weight)
                for i, g in self.groups.items()
                for n, lin in g.items()
                if layer_provider is None
            }
            self.resume = ResumeState(resume_dir, identity, checksums)
            if layer_provider is None:
                self.resume.check_model(self.groups)

    # -- helpers --------------------------------------------------------------------------------
    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="layer", disable=not self.config.progress)

    def _prune_group(
        self, i: int, norms: dict[str, torch.Tensor] | None, stats: dict[str, ChannelStats] | None
    ) -> list[TensorRow]:
        rows, masks = [], []
        for name, lin in self.groups[i].items():
            target = self.targets[(i, name)]
            norm = None if norms is None else norms[name].to(lin.weight.device)
            ctx = TensorContext(
                layer_idx=i,
                name=name,
                config=self.config,
                module=lin,
                stats=None if stats is None else stats[name],
            )
            t0 = time.perf_counter()
            mask = self.mask_fn(lin.weight.data, norm, target, ctx)
            rows.append(_row(i, name, lin.weight, mask, target, time.perf_counter() - t0))
            if distributed.active():
                masks.append(mask)
        distributed.agree(f"masks of layer {i}", distributed.masks_digest(masks))  # before anything is written
        return rows

    def _materialize(self, i: int) -> None:
        if self.provider is not None:
            self.provider.materialize(i)

    def _release(self, i: int) -> None:
        if self.provider is not None:
            self.provider.release(i)

    def _restore(self, i: int) -> None:
        saved = self.resume.tensors("layer", i)
        for name, lin in self.groups[i].items():
            lin.weight.data.copy_(saved[name].to(lin.weight.device, lin.weight.dtype))

    def _finish_layer(
        self,
        i: int,
        rows: list[TensorRow],
        secs: float,
        kind: str = "layer",
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if self.resume is not None:
            if tensors is None:
                tensors = {n: lin.weight for n, lin in self.groups[i].items()}
            self.resume.mark(kind, i, tensors, rows, secs)
        if self.callback is not None:
            self.callback(i, rows)

    def _head_norms(self, hidden: torch.Tensor, calib: Calibration) -> dict[str, ChannelStats]:
        """lm_head input stats = final_norm(last layer output), without running lm_head (vocab-wide)."""
        fnorm = self.adapter.final_norm(self.model)
        orig = next(fnorm.parameters()).device
        fnorm.to(hidden.device)
        st = ChannelStats(hidden.shape[-1], hidden.device)
        if self.hessian:
            from gradprobe.stats import HessianStats

            st.hessian = HessianStats(hidden.shape[-1], hidden.device)
        for b0 in range(0, hidden.shape[0], calib.batch_size):
            x = fnorm(hidden[b0 : b0 + calib.batch_size])
            st.add(x)
            if st.hessian is not None:
                st.hessian.add(x)
        st.all_reduce()
        fnorm.to(orig)
        return {LM_HEAD: st}

    # -- main -----------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> PruneReport:
        t_start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        rows: list[TensorRow] = []
        layer_seconds: dict[int, float] = {}
        resumed: list[int] = []
        try:
            with distributed.guard():  # an error on one rank stops every rank
                if self.config.scope == "global":
                    rows = self._run_global(layer_seconds, resumed)
                else:
                    rows = self._run_sequential(layer_seconds, resumed)
                distributed.barrier()
        finally:
            self.model.train(was_training)
        n, L = tuple(self.batches.shape) if self.batches is not None else (0, 0)
        return PruneReport(
            rows=rows,
            config=self.config,
            layer_seconds=layer_seconds,
            nsamples=n,
            seqlen=L,
            seconds=time.perf_counter() - t_start,
            model_type=self.model.config.model_type,
            resumed_layers=resumed,
        )

    def _run_sequential(self, layer_seconds: dict[int, float], resumed: list[int]) -> list[TensorRow]:
        dev = torch.device(self.config.device)
        rows: list[TensorRow] = []
        calib = None
        if self.wanda:
            self._materialize(EMBEDDINGS)
            calib = capture_calibration(self.model, self.batches, self.config, self.adapter)
            self._release(EMBEDDINGS)
        inps = calib.inputs if calib is not None else None
        outs = torch.empty_like(inps) if inps is not None else None
        bar = self._progress(
            len(self.groups), f"{self.config.method} {self.config.structure or self.config.scope}"
        )
        for i, layer in enumerate(self.layers):
            t0 = time.perf_counter()
            self._materialize(i)
            orig = next(layer.parameters()).device
            layer.to(dev)
            done = self.resume is not None and distributed.all_true(self.resume.finished(i))
            if done:
                self._restore(i)
                layer_rows = self.resume.rows(i)
                if calib is not None:
                    calib.run_layer(layer, i, inps, outs)
            else:
                norms = stats = None
                if calib is not None:
                    with LayerStats(self.groups[i], hessian=self.hessian) as st:
                        calib.run_layer(layer, i, inps, None)
                    norms, stats = st.norms(), st.stats
                layer_rows = self._prune_group(i, norms, stats)
                if calib is not None:
                    calib.run_layer(layer, i, inps, outs)  # outputs of the pruned layer feed layer i + 1
            layer.to(orig)
            if calib is not None:
                inps, outs = outs, inps
            rows += layer_rows
            if done:
                resumed.append(i)
                bar.set_postfix_str(restored_note(resumed), refresh=False)
                layer_seconds[i] = self.resume.seconds(i)
            else:
                layer_seconds[i] = time.perf_counter() - t0
                self._finish_layer(i, layer_rows, layer_seconds[i])
            self._release(i)
            bar.update(1)
        if self.num_layers in self.groups:  # lm_head
            i = self.num_layers
            t0 = time.perf_counter()
            self._materialize(i)
            if self.resume is not None and distributed.all_true(self.resume.finished(i)):
                self._restore(i)
                rows += self.resume.rows(i)
                resumed.append(i)
                bar.set_postfix_str(restored_note(resumed), refresh=False)
                layer_seconds[i] = self.resume.seconds(i)
            else:
                stats = self._head_norms(inps, calib) if calib is not None else None
                norms = None if stats is None else {k: s.norm() for k, s in stats.items()}
                head_rows = self._prune_group(i, norms, stats)
                rows += head_rows
                layer_seconds[i] = time.perf_counter() - t0
                self._finish_layer(i, head_rows, layer_seconds[i])
            self._release(i)
            bar.update(1)
        bar.close()
        return rows

    def _run_global(self, layer_seconds: dict[int, float], resumed: list[int]) -> list[TensorRow]:
        dev = torch.device(self.config.device)
        all_norms: dict[tuple[int, str], torch.Tensor] = {}
        if self.wanda:
            calib = capture_calibration(self.model, self.batches, self.config, self.adapter)
            inps, outs = calib.inputs, torch.empty_like(calib.inputs)
            bar = self._progress(len(self.groups), "wanda global: dense norms")
            for i, layer in enumerate(self.layers):
                t0 = time.perf_counter()
                orig = next(layer.parameters()).device
                layer.to(dev)
                done = self.resume is not None and distributed.all_true(self.resume.finished(i))
                if done:
                    norms = self.resume.tensors("norms", i)
                    calib.run_layer(layer, i, inps, outs)
                    resumed.append(i)
                    bar.set_postfix_str(restored_note(resumed), refresh=False)
                else:
                    with LayerStats(self.groups[i]) as st:
                        calib.run_layer(layer, i, inps, outs)  # dense outputs feed layer i + 1
                    norms = {k: v.cpu() for k, v in st.norms().items()}
                layer.to(orig)
                inps, outs = outs, inps
                for name, v in norms.items():
                    all_norms[(i, name)] = v
                layer_seconds[i] = time.perf_counter() - t0
                if not done:
                    self._finish_layer(i, [], layer_seconds[i], kind="norms", tensors=norms)
                bar.update(1)
            if self.num_layers in self.groups:
                st = self._head_norms(inps, calib)
                all_norms[(self.num_layers, LM_HEAD)] = st[LM_HEAD].norm().cpu()
                bar.update(1)
            bar.close()
            del calib, inps, outs
        keys = [(i, n) for i, g in self.groups.items() for n in g]
        weights = [self.groups[i][n].weight.data for i, n in keys]
        norms = (
            [all_norms[k].to(w.device) for k, w in zip(keys, weights, strict=True)] if self.wanda else None
        )
        t0 = time.perf_counter()
        masks = global_prune_(weights, self.config.sparsity, norms=norms)
        secs = time.perf_counter() - t0
        if distributed.active():
            distributed.agree("global masks", distributed.masks_digest(masks))
        total = sum(w.numel() for w in weights)
        return [
            _row(i, n, w, m, self.config.sparsity, secs * w.numel() / total)
            for (i, n), w, m in zip(keys, weights, masks, strict=True)
        ]
