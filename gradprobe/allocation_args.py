"""The ``--allocation`` options of ``gradprobe prune`` as a typed request (:class:`AllocationSpec`).

:mod:`gradprobe.allocation` holds the allocation math (layout, exact rounding, :class:`Allocation`,
explicit and OWL plans); this module turns the command-line options into one of those plans:
:func:`add_cli_args` declares them, :meth:`AllocationSpec.from_args` reads them once,
:meth:`AllocationSpec.check` validates them against the prune config before anything is loaded, and
:meth:`AllocationSpec.apply` builds the plan from the loaded model and the calibration batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradprobe.allocation import (
    Allocation,
    check_owl,
    explicit_allocation,
    model_layout,
    owl_from_model,
    report_allocation,
)
from gradprobe.select import check_sparsity

ALLOCATIONS = ("uniform", "variant", "owl", "owl-rescaled", "explicit")


def add_cli_args(p: Any) -> None:
    """Add the allocation options to the ``prune`` argparse parser."""
    p.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default="uniform",
        help="how the sparsity budget is spread: uniform (every row the same), variant (Wanda's "
        "cumulative-score cut, alpha bisected per tensor), owl (outlier-weighted layer ratios as "
        "published: target - (r - mean r), r = LOD scaled to [0, 2 lambda]; exact total), owl-rescaled "
        "(the same ratios scaled to stay within +-lambda), explicit (--layer-sparsity); "
        "--scope global is the global threshold",
    )
    p.add_argument(
        "--owl-m", type=float, default=5.0, help="OWL outlier multiple of the layer mean (default 5)"
    )
    p.add_argument(
        "--owl-lambda",
        type=float,
        default=0.08,
        help="OWL lambda (default 0.08): owl moves a layer's sparsity up to 2 lambda from the target, "
        "owl-rescaled up to lambda",
    )
    p.add_argument(
        "--variant-tol",
        type=float,
        default=1e-3,
        help="variant: allowed |achieved - target| per tensor, as a fraction (default 0.001)",
    )
    p.add_argument(
        "--layer-sparsity",
        default=None,
        metavar="SPEC",
        help='explicit: comma-separated per-layer fractions ("0.4,0.5,...") or per kind/name '
        '("attn=0.4,mlp=0.6"); with --sparsity the total must fit that target',
    )


def parse_layer_sparsity(text: str) -> list[float] | dict[str, float]:
    """``"0.4,0.5"`` -> [0.4, 0.5]; ``"attn=0.4,mlp=0.6"`` -> {"attn": 0.4, "mlp": 0.6}."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if parts and all("=" in p for p in parts):
            return {
                k.strip(): check_sparsity(float(v), f"--layer-sparsity {k.strip()}")
                for k, v in (p.split("=", 1) for p in parts)
            }
        if parts and not any("=" in p for p in parts):
            return [check_sparsity(float(p), "--layer-sparsity") for p in parts]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--layer-sparsity {text!r}: {exc}") from None
    raise ValueError(f'--layer-sparsity {text!r} must be "0.4,0.5,..." or "attn=0.4,mlp=0.6"')


@dataclass(frozen=True)
class AllocationSpec:
    """The allocation request of one prune run.

    ``target`` is the ``--sparsity`` given on the command line (None when omitted): an explicit
    allocation must then fit that total; without it the explicit fractions define the total.
    """

    kind: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    variant_tol: float = 1e-3
    layer_sparsity: str | None = None
    target: float | None = None

    @classmethod
    def from_args(cls, args: Any) -> AllocationSpec:
        return cls(
            kind=getattr(args, "allocation", "uniform"),
            owl_m=getattr(args, "owl_m", 5.0),
            owl_lambda=getattr(args, "owl_lambda", 0.08),
            variant_tol=getattr(args, "variant_tol", 1e-3),
            layer_sparsity=getattr(args, "layer_sparsity", None),
            target=getattr(args, "sparsity", None),
        )

    @property
    def owl_mapping(self) -> str:
        return "published" if self.kind == "owl" else self.kind.removeprefix("owl-")

    def check(self, config: Any) -> None:
        """Validate against the prune config before anything is loaded (ValueError with the fix)."""
        from gradprobe.variant import check_tol

        kind = self.kind
        if kind == "variant" and config.method == "sparsegpt":
            raise ValueError("--allocation variant is Wanda's cumulative-score cut; use --method wanda with it")
        if kind != "uniform" and (config.structure is not None or config.scope != "row"):
            raise ValueError(f"--allocation {kind} needs --scope row and no N:M --structure")
        if kind in ("owl", "owl-rescaled"):
            if config.method not in ("wanda", "sparsegpt"):
                raise ValueError(
                    f"--allocation {kind} needs --method wanda or sparsegpt (layer ratios from the outliers of "
                    "the Wanda scores)"
                )
            check_owl(config.sparsity, self.owl_m, self.owl_lambda, self.owl_mapping)
        if kind == "variant":
            check_tol(self.variant_tol)
        if kind == "explicit":
            if self.layer_sparsity is None:
                raise ValueError("--allocation explicit needs --layer-sparsity")
            parse_layer_sparsity(self.layer_sparsity)
        elif self.layer_sparsity is not None:
            raise ValueError("--layer-sparsity needs --allocation explicit")

    def settings(self) -> dict[str, Any]:
        """The allocation options as the run record writes them (gradprobe_run.json ``allocation``)."""
        return {"allocation": self.kind, "owl_m": self.owl_m, "owl_lambda": self.owl_lambda,
                "variant_tol": self.variant_tol, "layer_sparsity": self.layer_sparsity}

    def apply(self, config: Any, model: torch.nn.Module, batches: torch.Tensor | None):
        """(config with the allocation's hooks, :class:`Allocation` or None). ``model`` may be a meta-device
        skeleton for uniform, variant and explicit; OWL needs the dense weights and ``batches``
        (int64, nsamples x seqlen)."""
        kind = self.kind
        if kind == "uniform":
            return config, None
        if kind == "variant":
            from gradprobe.variant import VariantMaskFn

            return config.replace(mask_fn=VariantMaskFn(self.variant_tol)), None
        if kind in ("owl", "owl-rescaled"):
            alloc = owl_from_model(
                model,
                batches,
                config.sparsity,
                m=self.owl_m,
                lam=self.owl_lambda,
                config=config,
                mapping=self.owl_mapping,
            )
        else:
            target = config.sparsity if self.target is not None else None
            alloc = explicit_allocation(model_layout(model), parse_layer_sparsity(self.layer_sparsity), target=target)
        nominal = alloc.target if alloc.target is not None else alloc.sparsity  # what the summary prints
        return config.replace(sparsity=nominal, allocation=alloc), alloc

    def write_files(self, stage: str | Path, report: Any, alloc: Allocation | None, *, plots: bool = True) -> None:
        """``allocation.md`` (per-layer table) and, with ``plots``, ``allocation.png`` into ``stage``: the
        plan when there is one, else what the finished run (uniform, variant, global) pruned per layer."""
        from gradprobe.report import optional_plot

        a = report_allocation(report, self.kind, report.config.sparsity) if alloc is None else alloc
        Path(stage, "allocation.md").write_text(a.table() + "\n")
        if plots:
            optional_plot(a.save_plot, Path(stage, "allocation.png"))


__all__ = ["ALLOCATIONS", "AllocationSpec", "add_cli_args", "parse_layer_sparsity"]
