"""Sparsity allocation: how a model-wide budget is spread over decoder layers and tensors.

An :class:`Allocation` is an exact plan: the number of weights each prunable tensor loses. The
pipeline consumes the counts directly (``PruneConfig(allocation=alloc)``, :meth:`Allocation.config`;
:func:`gradprobe.plan.build_plan`): each tensor's count is spread over its rows (the first ``k % rows``
rows prune ``k // rows + 1``, the others ``k // rows``, :func:`gradprobe.methods.prune_rows_`), and
every row prunes its smallest scores exactly as :func:`gradprobe.prune_` does (ties -> lower index).

Allocations:

* :func:`owl_allocation` / :func:`owl_from_model` — OWL (Yin et al., "Outlier Weighed Layerwise
  sparsity", https://github.com/luuyin/OWL). Layer outlier ratio ``LOD_l`` = share of the layer's Wanda
  scores (all its tensors, dense model) strictly above ``m`` x their exact arithmetic mean. Two
  mappings from LOD to layer sparsity (more outliers -> lower sparsity, linear in LOD):

  - ``mapping="published"`` (the default; CLI ``--allocation owl``): the formula of the OWL code
    (``lib/prune_all.py``) and of llm-compressor's ``_infer_owl_layer_sparsity``:
    ``r_l = (LOD_l - min) / (max - min) * 2 lambda`` (min-max to [0, 2 lambda]) and
    ``s_l = target - (r_l - mean_l r_l)``; a layer may sit up to 2 lambda from the target. The
    published mean is unweighted; when decoder layers differ in size it is replaced by the
    size-weighted mean (one common shift of every ``s_l``) so that the fractions sum to the budget.
    Every supported family has equal-sized decoder layers, where both means coincide and ``s_l`` is
    exactly the published value. If max == min (or lambda == 0) every layer gets the target.
  - ``mapping="rescaled"`` (CLI ``--allocation owl-rescaled``): ``s_l = target - beta * (u_l - u_bar)``,
    ``u_l = (LOD_l - min) / (max - min)``, ``u_bar`` the size-weighted mean of ``u``,
    ``beta = lambda / max_l |u_l - u_bar|``: every layer within ``+-lambda`` of the target (before
    rounding), the most extreme layer exactly at ``+-lambda``.

  Either way the real fractions are turned into exact counts by :func:`round_counts`.
* :func:`explicit_allocation` — one float, a per-layer list / mapping, or per tensor kind
  (``{"attn": 0.4, "mlp": 0.6}``, or short names such as ``"down_proj"``).
* :func:`report_allocation` — the table/plot of any finished run (uniform, global threshold).

Exact rounding (:func:`round_counts`): for real fractions ``s_i`` over sizes ``n_i`` and a budget
``K = floor(target * N)``, ``k_i = floor(s_i * n_i)`` (fp64), then the deficit ``K - sum k_i`` is
added one by one to the largest fractional parts ``s_i * n_i - k_i`` (ties -> lower index; a surplus is
removed from the smallest). Layer counts are spread over tensors by the same rule in integer
arithmetic (ideal ``k_l * n_t / N_l``). So ``sum of tensor counts == floor(target * N)`` exactly, and the
per-layer fractions :attr:`Allocation.layer_sparsity` reported are ``k_l / N_l``; a fraction ``f_l`` for
which ``floor(f_l * N_l) == k_l`` holds robustly is ``(k_l + 0.5) / N_l`` (:meth:`Allocation.layer_fractions`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from gradprobe.select import check_sparsity, num_pruned

KINDS = {"attn": "self_attn.", "mlp": "mlp."}


# --------------------------------------------------------------------------------------------------
# layout and exact rounding
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One prunable tensor: decoder-layer index, name relative to the layer, weight (rows, cols)."""

    layer: int
    name: str
    rows: int
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def model_layout(model: torch.nn.Module) -> list[TensorSpec]:
    """The prunable tensors of a Hugging Face decoder (adapter order: layer, then q..down)."""
    from gradprobe.models import get_adapter

    ad = get_adapter(model)
    return [
        TensorSpec(i, n, *lin.weight.shape)
        for i, layer in enumerate(ad.decoder_layers(model))
        for n, lin in ad.prunable_linears(layer).items()
    ]


def _largest_remainder(base: list[int], frac: list[float], deficit: int, cap: list[int]) -> list[int]:
    out = list(base)
    if deficit > 0:
        order = sorted(range(len(out)), key=lambda i: (-frac[i], i))
        order = [i for i in order if out[i] < cap[i]]
        if deficit > len(order):
            raise ValueError(f"cannot place {deficit} more pruned weights: the tensors are full")
        for i in order[:deficit]:
            out[i] += 1
    elif deficit < 0:
        order = [i for i in sorted(range(len(out)), key=lambda i: (frac[i], i)) if out[i] > 0]
        if -deficit > len(order):
            raise ValueError(f"cannot remove {-deficit} pruned weights: the tensors are empty")
        for i in order[:-deficit]:
            out[i] -= 1
    return out


def round_counts(fractions: Sequence[float], sizes: Sequence[int], total: int) -> list[int]:
    """Integer counts ``k_i`` (0 <= k_i <= n_i) with ``sum k_i == total``, closest to ``s_i * n_i``.

    Args:
        fractions: real fractions s_i (fp64). sizes: n_i. total: the exact budget.

    Raises:
        ValueError: the rounding would move more than one weight per entry (the fractions do not
            fit the budget).
    """
    ideal = [float(s) * n for s, n in zip(fractions, sizes, strict=True)]
    base = [min(n, max(0, math.floor(x))) for x, n in zip(ideal, sizes, strict=True)]
    deficit = total - sum(base)
    if abs(deficit) > len(base):
        have = sum(ideal) / max(1, sum(sizes))
        raise ValueError(
            f"the allocation prunes {have:.6f} of the weights but the budget is "
            f"{total / max(1, sum(sizes)):.6f} ({total} weights); adjust the per-layer sparsities"
        )
    return _largest_remainder(base, [x - b for x, b in zip(ideal, base, strict=True)], deficit, list(sizes))


def split_count(count: int, sizes: Sequence[int]) -> list[int]:
    """Spread ``count`` over parts of ``sizes`` proportionally, in exact integer arithmetic."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    base = [count * n // total for n in sizes]
    rem = [count * n % total for n in sizes]
    return _largest_remainder(base, [float(r) for r in rem], count - sum(base), list(sizes))


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------
@dataclass
class Allocation:
    """Exact per-tensor pruned counts and how they were chosen.

    Attributes:
        method: "owl", "explicit", "uniform", "global", "variant", ...
        layout: the prunable tensors. counts: (layer, name) -> weights to prune.
        target: the model-wide target fraction, or None (explicit without a budget).
        params: method parameters (m, lambda, ...). layer_values: per-layer diagnostics (e.g. LOD).
    """

    method: str
    layout: list[TensorSpec]
    counts: dict[tuple[int, str], int]
    target: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    layer_values: dict[int, float] = field(default_factory=dict)

    # -- totals --------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.layout)

    @property
    def pruned(self) -> int:
        return sum(self.counts.values())

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0

    def layer_sizes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for t in self.layout:
            out[t.layer] = out.get(t.layer, 0) + t.numel
        return out

    def layer_counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for t in self.layout:
            out[t.layer] = out.get(t.layer, 0) + self.counts[(t.layer, t.name)]
        return out

    @property
    def layer_sparsity(self) -> dict[int, float]:
        sizes = self.layer_sizes()
        return {i: k / sizes[i] for i, k in self.layer_counts().items()}

    def layer_fractions(self) -> list[float]:
        """Per-layer fractions f_l with floor(f_l * N_l) == k_l robustly: (k_l + 0.5) / N_l."""
        sizes = self.layer_sizes()
        return [(k + 0.5) / sizes[i] for i, k in sorted(self.layer_counts().items())]

    # -- applying the plan ------------------------------------------------------------------------
    def config(self, **overrides: Any):
        """A :class:`gradprobe.PruneConfig` pruning exactly these counts (``allocation=self``, per row).

        ``alloc.config(method="sparsegpt")`` prunes the planned counts with SparseGPT (OWL + SparseGPT).
        ``sparsity`` is the nominal budget the summary reports (the target, else the achieved fraction).
        """
        from gradprobe.config import PruneConfig

        nominal = self.target if self.target is not None else self.sparsity
        base = dict(sparsity=nominal, allocation=self, scope="row")
        base.update(overrides)
        return PruneConfig(**base)

    def check(self, model_report: Any) -> None:
        """Raise AssertionError unless a finished run's report pruned exactly these counts."""
        got = {(r.layer, r.name): r.pruned for r in model_report.rows}
        if got != self.counts:
            bad = [k for k in self.counts if got.get(k) != self.counts[k]][:3]
            raise AssertionError(f"run does not match the allocation at {bad}")

    # -- output ----------------------------------------------------------------------------------
    def table(self) -> str:
        """Markdown table: one row per decoder layer (weights, pruned, sparsity, extra value)."""
        extra = self.params.get("value_name", "")
        head = "| layer | weights | pruned | sparsity |" + (f" {extra} |" if extra else "")
        lines = [
            f"**{self.method}** — total {self.pruned}/{self.numel} = {self.sparsity:.6f}"
            + (
                ""
                if self.target is None
                else f" (target {self.target}, budget {num_pruned(self.numel, self.target)})"
            ),
            "",
            head,
            "|---|---:|---:|---:|" + ("---:|" if extra else ""),
        ]
        sizes, counts = self.layer_sizes(), self.layer_counts()
        for i in sorted(sizes):
            row = f"| {i} | {sizes[i]} | {counts[i]} | {counts[i] / sizes[i]:.4f} |"
            if extra:
                row += f" {self.layer_values.get(i, float('nan')):.4f} |"
            lines.append(row)
        return "\n".join(lines)

    def save_plot(self, path: str | Path) -> Path:
        """PNG bar chart of the per-layer sparsity (matplotlib, Agg backend)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ls = self.layer_sparsity
        fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(ls) + 2), 3))
        ax.bar(list(ls), list(ls.values()), color="tab:blue")
        if self.target is not None:
            ax.axhline(self.target, color="tab:red", ls="--", lw=1, label=f"target {self.target}")
            ax.legend(loc="lower right")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("sparsity")
        ax.set_title(f"{self.method}: total {self.sparsity:.4f}")
        lo = min(ls.values()) if ls else 0.0
        ax.set_ylim(max(0.0, lo - 0.1), min(1.0, max(ls.values(), default=1.0) + 0.05))
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# --------------------------------------------------------------------------------------------------
# explicit allocations
# --------------------------------------------------------------------------------------------------
def _tensor_fraction(spec: Any, t: TensorSpec) -> float:
    if isinstance(spec, Mapping) and spec and all(isinstance(k, str) for k in spec):
        short = t.name.rsplit(".", 1)[-1]
        for key in (t.name, short):
            if key in spec:
                return check_sparsity(spec[key], f"sparsity[{key!r}]")
        for kind, prefix in KINDS.items():
            if kind in spec and t.name.startswith(prefix):
                return check_sparsity(spec[kind], f"sparsity[{kind!r}]")
        raise ValueError(
            f"sparsity mapping {sorted(spec)} gives no value for tensor {t.name!r} of layer {t.layer}; "
            f"add its name, its short name {short!r} or its kind ({sorted(KINDS)})"
        )
    if isinstance(spec, Mapping):
        for k in spec:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(
                    f"sparsity mapping keys must be layer indices (int >= 0) or tensor kinds, got {k!r}"
                )
        return check_sparsity(spec.get(t.layer, 0.0), f"sparsity[{t.layer}]")
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return check_sparsity(spec[t.layer], f"sparsity[{t.layer}]")
    return check_sparsity(spec)


def explicit_allocation(
    layout: Sequence[TensorSpec], sparsity: Any, *, target: float | None = None
) -> Allocation:
    """Counts from user fractions: one float, a per-layer list, {layer: s} or {kind/name: s}.

    Each tensor prunes floor(s_t * numel_t). With ``target``, the fractions must fit it: their total
    may differ from floor(target * N) by at most one weight per tensor (rounding), and the counts are
    then rounded (:func:`round_counts`) to hit floor(target * N) exactly.

    Raises:
        ValueError / TypeError: a value outside [0, 1), a list of the wrong length, unknown keys, or a
            total that does not fit ``target``.
    """
    layout = list(layout)
    if not layout:
        raise ValueError("layout is empty: nothing to allocate")
    nlayers = max(t.layer for t in layout) + 1
    if isinstance(sparsity, Sequence) and not isinstance(sparsity, str):
        if len(sparsity) != nlayers:
            raise ValueError(
                f"sparsity list has {len(sparsity)} entries for {nlayers} decoder layers; give one per layer"
            )
    if isinstance(sparsity, Mapping) and not sparsity:
        raise ValueError("sparsity mapping is empty")
    if isinstance(sparsity, Mapping) and not all(isinstance(k, str) for k in sparsity):
        bad = [k for k in sparsity if isinstance(k, int) and not isinstance(k, bool) and k >= nlayers]
        if bad:
            raise ValueError(
                f"sparsity mapping has layer indices {bad} but the model has layers 0..{nlayers - 1}"
            )
    fr = [_tensor_fraction(sparsity, t) for t in layout]
    sizes = [t.numel for t in layout]
    if target is None:
        counts = [num_pruned(n, s) for s, n in zip(fr, sizes, strict=True)]
    else:
        target = check_sparsity(target, "target")
        counts = round_counts(fr, sizes, num_pruned(sum(sizes), target))
    return Allocation(
        "explicit",
        layout,
        {(t.layer, t.name): k for t, k in zip(layout, counts, strict=True)},
        target,
        params={"sparsity": sparsity},
    )


# --------------------------------------------------------------------------------------------------
# OWL
# --------------------------------------------------------------------------------------------------
OWL_MAPPINGS = ("published", "rescaled")


def check_owl(
    target: float, m: float, lam: float, mapping: str = "published"
) -> tuple[float, float, float]:
    """Validate OWL arguments (ValueError naming the argument); returns (target, m, lam) as floats.

    The published mapping moves a layer by up to ``2 lam`` from the target, the rescaled one by up to
    ``lam``; the layer sparsities must stay in [0, 1).
    """
    if mapping not in OWL_MAPPINGS:
        raise ValueError(f"mapping must be one of {OWL_MAPPINGS}, got {mapping!r}")
    target = check_sparsity(target, "target")
    for name, v in (("m", m), ("lam", lam)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    if m <= 0:
        raise ValueError(f"m must be > 0 (outliers are scores above m x the layer mean; OWL uses 5), got {m}")
    if mapping == "rescaled" and (lam < 0 or lam >= target or target + lam >= 1):
        raise ValueError(
            f"lam must satisfy 0 <= lam < target and target + lam < 1 (layer sparsities in "
            f"[target - lam, target + lam]), got lam={lam} with target={target}"
        )
    if mapping == "published" and (lam < 0 or 2 * lam > target or target + 2 * lam >= 1):
        raise ValueError(
            f"lam must satisfy 0 <= 2 lam <= target and target + 2 lam < 1 (the published OWL mapping "
            f"puts layer sparsities in [target - 2 lam, target + 2 lam]), got lam={lam} with target={target}"
        )
    return float(target), float(m), float(lam)


def _exact_sum(scores: Sequence[torch.Tensor]) -> Fraction:
    """Exact sum of non-negative fp32 scores: sum over exponents e of (int64 sum of mantissas) * 2^e."""
    total = Fraction(0)
    for s in scores:
        bits = s.reshape(-1).contiguous().view(torch.int32).to(torch.int64)
        expo = bits >> 23  # biased exponent (sign bit is 0)
        mant = (bits & 0x7FFFFF) | torch.where(expo > 0, 1 << 23, 0)  # implicit leading 1 of normals
        sums = torch.zeros(256, dtype=torch.int64).scatter_add_(0, expo, mant)  # < 2^24 * 2^39: exact
        for e in sums.nonzero().flatten().tolist():
            total += Fraction(int(sums[e])) * Fraction(2) ** (max(int(e), 1) - 150)
    return total


def layer_outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """LOD: share of ``scores`` (fp32 >= 0 tensors of one layer) strictly above m x their exact mean."""
    n = sum(s.numel() for s in scores)
    if n == 0:
        return 0.0
    thr = Fraction(m) * _exact_sum(scores) / n
    r = float(thr)
    if Fraction(r) > thr:  # largest fp64 <= thr: for fp32 s, s > thr  <=>  s > r
        r = math.nextafter(r, -math.inf)
    count = sum(int((s.to(torch.float64) > r).sum()) for s in scores)
    return count / n


def owl_layer_sparsity(
    lod: Sequence[float], sizes: Sequence[int], target: float, lam: float, mapping: str = "published"
) -> list[float]:
    """Real per-layer fractions from LODs (fp64, see the module docstring); weighted mean = target.

    Args:
        lod: per-layer outlier ratios. sizes: per-layer weight counts. target: model-wide fraction.
        lam: OWL lambda. mapping: "published" (r = min-max(LOD) * 2 lam, s = target - (r - mean r))
            or "rescaled" (deviation scaled to at most lam).
    """
    lo, hi = min(lod), max(lod)
    if hi == lo or lam == 0:
        return [float(target)] * len(lod)
    if mapping == "published":
        # the published operation order: (x - min) * (1 / (max - min) * lambda * 2)
        r = [(d - lo) * (1.0 / (hi - lo) * lam * 2) for d in lod]
        rbar = math.fsum(r) / len(r)
        fr = [target - (x - rbar) for x in r]
        if len(set(sizes)) > 1:  # unequal layers: centre on the size-weighted mean instead
            shift = target - math.fsum(f * n for f, n in zip(fr, sizes, strict=True)) / sum(sizes)
            fr = [f + shift for f in fr]
        return fr
    u = [(d - lo) / (hi - lo) for d in lod]
    ubar = sum(x * n for x, n in zip(u, sizes, strict=True)) / sum(sizes)
    dev = [x - ubar for x in u]
    beta = lam / max(abs(d) for d in dev)
    return [target - beta * d for d in dev]


def owl_allocation(
    layout: Sequence[TensorSpec],
    scores: Mapping[tuple[int, str], torch.Tensor],
    target: float,
    *,
    m: float = 5.0,
    lam: float = 0.08,
    mapping: str = "published",
) -> Allocation:
    """OWL counts from the dense Wanda scores of every tensor.

    Args:
        layout: prunable tensors. scores: (layer, name) -> fp32 (rows, cols) scores |W| * ||X_j||.
        target: model-wide fraction; exactly floor(target * N) weights are pruned.
        m: outlier multiple of the layer mean (OWL default 5). lam: OWL lambda (default 0.08).
        mapping: "published" (default: the OWL code's / llm-compressor's layer sparsities,
            ``target - (r_l - mean r)`` with r = LOD min-max scaled to [0, 2 lam]) or "rescaled"
            (every layer within +-lam). The :class:`Allocation`'s method is "owl" or "owl-rescaled".
    """
    target, m, lam = check_owl(target, m, lam, mapping)
    layout = list(layout)
    layers = sorted({t.layer for t in layout})
    lod = [
        layer_outlier_ratio([scores[(t.layer, t.name)] for t in layout if t.layer == i], m) for i in layers
    ]
    lsizes = [sum(t.numel for t in layout if t.layer == i) for i in layers]
    fr = owl_layer_sparsity(lod, lsizes, target, lam, mapping)
    lcounts = round_counts(fr, lsizes, num_pruned(sum(lsizes), target))
    counts: dict[tuple[int, str], int] = {}
    for i, k in zip(layers, lcounts, strict=True):
        ts = [t for t in layout if t.layer == i]
        for t, kt in zip(ts, split_count(k, [t.numel for t in ts]), strict=True):
            counts[(t.layer, t.name)] = kt
    return Allocation(
        "owl" if mapping == "published" else f"owl-{mapping}",
        layout,
        counts,
        target,
        params={
            "m": m,
            "lam": lam,
            "mapping": mapping,
            "value_name": "LOD",
            "real_sparsity": dict(zip(layers, fr, strict=True)),
        },
        layer_values=dict(zip(layers, lod, strict=True)),
    )


def owl_from_model(
    model: torch.nn.Module,
    batches: torch.Tensor,
    target: float,
    *,
    m: float = 5.0,
    lam: float = 0.08,
    config: Any = None,
    mapping: str = "published",
) -> Allocation:
    """OWL allocation of ``model`` from calibration ``batches`` (nsamples, seqlen) int64 (dense pass).

    ``mapping``: "published" (default) or "rescaled", see :func:`owl_allocation`. Apply the plan with
    ``gradprobe.prune(model, batches, alloc.config())``.
    """
    check_owl(target, m, lam, mapping)
    from gradprobe.models import get_adapter
    from gradprobe.pipeline.calibration import dense_norms
    from gradprobe.select import score

    norms = dense_norms(model, batches, config)
    ad = get_adapter(model)
    layout = model_layout(model)
    scores = {}
    for i, layer in enumerate(ad.decoder_layers(model)):
        for name, lin in ad.prunable_linears(layer).items():
            scores[(i, name)] = score(lin.weight.data.cpu(), norms[(i, name)])
    return owl_allocation(layout, scores, target, m=m, lam=lam, mapping=mapping)


def report_allocation(report: Any, method: str, target: float | None = None) -> Allocation:
    """An :class:`Allocation` describing a finished run (:class:`gradprobe.report.PruneReport`)."""
    layout = [TensorSpec(r.layer, r.name, *r.shape) for r in report.rows]
    return Allocation(method, layout, {(r.layer, r.name): r.pruned for r in report.rows}, target)
