"""``PruneConfig``: every knob of a layerwise pruning run, validated on construction."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from gradprobe.select import check_nm_sparsity, parse_structure

METHODS = ("wanda", "magnitude", "sparsegpt")
CALIBRATED_METHODS = ("wanda", "sparsegpt")  # methods that need calibration activations
SCOPES = ("row", "layer", "global")


class MaskFn(Protocol):
    """Pluggable per-tensor "select and prune" step (wrapped into a selector by :mod:`gradprobe.methods`).

    Called once per prunable tensor, after the layer's calibration statistics are complete.
    Must zero the pruned weights of ``weight`` in place and return the bool mask (True = pruned).

    Args:
        weight: (out_features, in_features) parameter data on the compute device, model dtype.
        norm: (in_features,) float32 activation norms ||X_j||_2, or None for magnitude.
        sparsity: this tensor's target fraction (from ``sparsity_for``), or None under N:M.
        ctx: :class:`gradprobe.methods.TensorContext` (layer index, name, config, layer stats, target).
    """

    def __call__(
        self, weight: torch.Tensor, norm: torch.Tensor | None, sparsity: float | None, ctx: Any
    ) -> torch.Tensor: ...


def check_fraction(value: Any, where: str) -> float:
    """``value`` as a float in [0, 1); TypeError / ValueError naming ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a float in [0, 1), got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{where} must be in [0, 1) (the fraction of weights to prune), got {value}")
    return value


def _pos_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"PruneConfig.{name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class PruneConfig:
    """Configuration of :func:`gradprobe.prune`.

    Attributes:
        method: "wanda" (score |W| * ||X_j||_2 from calibration activations), "magnitude" (|W|) or
            "sparsegpt" (OBS updates from the calibration Hessian, :mod:`gradprobe.sparsegpt`;
            scopes "row" / "layer" and N:M; blocksize / percdamp via its ``SparseGPTMaskFn``).
        sparsity: fraction in [0, 1) for every tensor; or a per-decoder-layer sequence (one float
            per layer); or a mapping layer index -> float (layers not listed stay dense). Under an
            N:M ``structure`` it must be N/M or None. Stored normalised: float, tuple, or dict.
        scope: "row" (each output row prunes floor(s * in); the Wanda default), "layer" (each
            tensor prunes floor(s * numel)) or "global" (one group over all prunable tensors of
            the model, norms from one dense calibration pass).
        structure: None / "unstructured" or "N:M" (e.g. "2:4": 2 pruned of every 4 inputs).
        nsamples: calibration windows. seqlen: tokens per window (never the model's max context).
        include_lm_head: also prune ``lm_head`` (not allowed when tied to the embeddings).
        device: compute device for the current layer and the calibration activations.
        batch_size: calibration windows per layer forward.
        seed: seed for drawing calibration windows from a tokenizer's text.
        calib_source: passed to ``gradprobe.data.calibration_batches`` (None = its default).
        mask_fn: optional :class:`MaskFn` replacing the built-in select-and-prune step.
        sparsity_fn: optional ``(layer_idx, name, config) -> float`` replacing the resolution of
            ``sparsity``; evaluated for all tensors before the loop (:func:`gradprobe.plan.build_plan`).
        allocation: optional :class:`gradprobe.allocation.Allocation` (OWL, explicit): the exact
            count of every tensor, pruned as counts (per row, as :func:`gradprobe.allocation.prune_rows_`);
            replaces ``sparsity`` / ``sparsity_fn`` (``sparsity`` is then only the reported nominal).
        selector: optional :class:`gradprobe.methods.Selector` replacing the method's built-in one:
            ``needs`` ("weights" / "norms" / "hessian": what the pipeline collects for it) and
            ``select_(layer_idx, linears, stats, targets) -> {name: mask}`` (prunes in place).
        progress: show a tqdm bar per layer.
    """

    method: str = "wanda"
    sparsity: float | Sequence[float] | Mapping[int, float] | None = 0.5
    scope: str = "row"
    structure: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    include_lm_head: bool = False
    device: str | torch.device = "cpu"
    batch_size: int = 1
    seed: int = 0
    calib_source: Any = None
    mask_fn: Callable[..., torch.Tensor] | None = field(default=None, compare=False)
    sparsity_fn: Callable[[int, str, PruneConfig], float] | None = field(default=None, compare=False)
    allocation: Any = field(default=None, compare=False)
    selector: Any = field(default=None, compare=False)
    progress: bool = True

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.method not in METHODS:
            raise ValueError(f"PruneConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"PruneConfig.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.method == "sparsegpt" and self.scope == "global":
            raise ValueError(
                'PruneConfig.scope="global" is not defined for method="sparsegpt" (its weight updates '
                'run one linear at a time); use scope="row" or "layer"'
            )
        nm = parse_structure(self.structure, "PruneConfig.structure")
        set_("structure", None if nm is None else f"{nm[0]}:{nm[1]}")
        s = self.sparsity
        if nm is not None:
            if self.scope == "global":
                raise ValueError(
                    'PruneConfig.scope="global" cannot be combined with an N:M structure; use scope="row"'
                )
            check_nm_sparsity(s, nm, self.structure, names=("PruneConfig.sparsity", "structure"))
            set_("sparsity", None)
        elif s is None:
            raise ValueError(
                "PruneConfig.sparsity is None; give a float in [0, 1) (None is only for N:M structure)"
            )
        elif isinstance(s, Mapping):
            norm: dict[int, float] = {}
            for k, v in s.items():
                if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                    raise ValueError(
                        f"PruneConfig.sparsity mapping keys must be layer indices (int >= 0), got {k!r}"
                    )
                norm[k] = check_fraction(v, f"PruneConfig.sparsity[{k}]")
            if not norm:
                raise ValueError(
                    "PruneConfig.sparsity mapping is empty; give at least one layer index -> fraction"
                )
            set_("sparsity", dict(sorted(norm.items())))
        elif isinstance(s, Sequence) and not isinstance(s, str):
            if len(s) == 0:
                raise ValueError("PruneConfig.sparsity list is empty; give one fraction per decoder layer")
            set_("sparsity", tuple(check_fraction(v, f"PruneConfig.sparsity[{i}]") for i, v in enumerate(s)))
        else:
            set_("sparsity", check_fraction(s, "PruneConfig.sparsity"))
        if self.scope == "global" and not isinstance(self.sparsity, float):
            raise ValueError(
                'PruneConfig.scope="global" needs one float sparsity (per-layer lists/mappings need scope "row" or "layer")'
            )
        _pos_int(self.nsamples, "nsamples")
        _pos_int(self.seqlen, "seqlen")
        _pos_int(self.batch_size, "batch_size")
        if not isinstance(self.include_lm_head, bool):
            raise ValueError(f"PruneConfig.include_lm_head must be a bool, got {self.include_lm_head!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"PruneConfig.device must be a torch device string like 'cpu' or 'cuda:0', got {self.device!r}"
            ) from None
        set_("device", str(dev))
        if self.allocation is not None:
            counts = getattr(self.allocation, "counts", None)
            if not isinstance(counts, Mapping):
                raise TypeError(
                    "PruneConfig.allocation must be a gradprobe.allocation.Allocation (exact counts per tensor), "
                    f"got {type(self.allocation).__name__}"
                )
            if nm is not None or self.scope != "row" or self.sparsity_fn is not None:
                raise ValueError(
                    "PruneConfig.allocation gives exact per-tensor counts (pruned per row); it cannot be combined "
                    'with an N:M structure, scope other than "row" or a sparsity_fn'
                )
        if self.selector is not None:
            needs = getattr(self.selector, "needs", None)
            if not callable(getattr(self.selector, "select_", None)) or needs not in ("weights", "norms", "hessian"):
                raise TypeError(
                    "PruneConfig.selector must have select_(layer_idx, linears, stats, targets) and needs in "
                    f"('weights', 'norms', 'hessian'), got {type(self.selector).__name__} (needs={needs!r})"
                )
            if self.mask_fn is not None:
                raise ValueError("PruneConfig.selector and mask_fn both replace the selection step; give one")
            if self.scope == "global":
                raise ValueError("PruneConfig.selector works per layer and cannot be combined with scope='global'")
        for name in ("mask_fn", "sparsity_fn"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"PruneConfig.{name} must be callable or None, got {type(fn).__name__}")

    @property
    def needs_calibration(self) -> bool:
        """True for methods that read calibration activations (Wanda, SparseGPT, a selector needing them)."""
        if self.selector is not None:  # a selector asking for gradients runs the layers over the windows
            return self.selector.needs != "weights" or bool(getattr(self.selector, "gradients", False))
        return self.method in CALIBRATED_METHODS

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of the structure, or None when unstructured."""
        return parse_structure(self.structure)

    def replace(self, **overrides: Any) -> PruneConfig:
        """A copy with ``overrides`` applied (re-validated); unknown names raise TypeError."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown PruneConfig field(s) {bad}; known: {sorted(known)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if (
            "structure" in overrides
            and "sparsity" not in overrides
            and overrides["structure"] not in (None, "unstructured")
        ):
            values["sparsity"] = None
        values.update(overrides)
        return PruneConfig(**values)

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the settings that decide the result (for resume)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("progress", "device"):
                continue
            v = getattr(self, f.name)
            if f.name == "allocation":
                v = None if v is None else sorted([i, n, k] for (i, n), k in v.counts.items())
            elif callable(v):
                v = f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"
            elif isinstance(v, dict):
                v = {str(k): x for k, x in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            elif v is not None and not isinstance(v, (str, int, float, bool)):
                v = repr(v)
            out[f.name] = v
        return out
