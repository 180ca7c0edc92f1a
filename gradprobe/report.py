"""``PruneReport``: the one result type of every pruning entry point (:func:`gradprobe.prune`,
:func:`gradprobe.probe_prune_`, :func:`gradprobe.iterative.iterative_prune_`): what a run did, per
tensor, with the masks where the method keeps them; as a Markdown table, JSON and a PNG plot."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradprobe.config import PruneConfig


@dataclass
class TensorRow:
    """One pruned tensor. ``layer`` is the decoder-layer index (``num_layers`` for lm_head)."""

    layer: int
    name: str
    shape: tuple[int, int]
    numel: int
    pruned: int
    target: float | None
    seconds: float

    @property
    def sparsity(self) -> float:
        """Achieved fraction of pruned weights."""
        return self.pruned / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["sparsity"] = self.sparsity
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorRow:
        return cls(
            layer=int(d["layer"]),
            name=d["name"],
            shape=tuple(d["shape"]),
            numel=int(d["numel"]),
            pruned=int(d["pruned"]),
            target=d["target"],
            seconds=float(d["seconds"]),
        )


@dataclass
class PruneReport:
    """Result of a pruning run (:func:`gradprobe.prune`, :func:`gradprobe.probe_prune_`, ...).

    Attributes:
        rows: one :class:`TensorRow` per pruned tensor, in (layer, q..down) order.
        masks: {parameter name: bool mask of the weight's shape, True = pruned} where the method keeps
            them (the gradient probe, iterative runs); empty for :func:`gradprobe.prune`, whose masks
            are the zeros of the pruned weights (keeping them would cost one byte per weight).
        config: the effective :class:`PruneConfig`.
        layer_seconds: wall time per decoder layer (calibration forwards + selection + propagation).
        nsamples, seqlen: calibration actually used (0 for magnitude, which needs none).
        seconds: total wall time. resumed_layers: layers restored from ``resume_dir``.
        run: what else determined the result (the CLI records the method and probe settings, the
            allocation, calibration, seed, every option and the versions); shown in both outputs.
    """

    rows: list[TensorRow]
    config: PruneConfig
    layer_seconds: dict[int, float] = field(default_factory=dict)
    nsamples: int = 0
    seqlen: int = 0
    seconds: float = 0.0
    model_type: str = ""
    resumed_layers: list[int] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)
    zeroshot: dict[str, Any] | None = None  # gradprobe.zeroshot.record(dense=..., pruned=...)
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_masks(
        cls, model: Any, masks: dict[str, torch.Tensor], config: PruneConfig, *, target: float | None = None, **fields_: Any
    ) -> PruneReport:
        """The report of ``masks`` ({parameter name: bool mask}) of ``model``'s decoder linears: one row
        per masked tensor in model order (decoder layer index, the linear's name within the layer)."""
        from gradprobe.models import get_adapter

        adapter = get_adapter(model)
        where = {}
        for i, layer in enumerate(adapter.decoder_layers(model)):
            for short, lin in adapter.prunable_linears(layer).items():
                where[id(lin.weight)] = (i, short)
        rows = []
        for name, param in model.named_parameters():
            m = masks.get(name)
            if m is None:
                continue
            layer, short = where.get(id(param), (-1, name))
            rows.append(TensorRow(layer=layer, name=short, shape=tuple(m.shape), numel=m.numel(),
                                  pruned=int(m.sum()), target=target, seconds=0.0))
        return cls(rows=rows, config=config, masks=dict(masks), model_type=getattr(model.config, "model_type", ""),
                   **fields_)

    @property
    def total_params(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def total_pruned(self) -> int:
        return sum(r.pruned for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all prunable tensors."""
        return self.total_pruned / self.total_params if self.total_params else 0.0

    def layer_sparsity(self) -> dict[int, float]:
        out: dict[int, list[int]] = {}
        for r in self.rows:
            acc = out.setdefault(r.layer, [0, 0])
            acc[0] += r.pruned
            acc[1] += r.numel
        return {k: p / n if n else 0.0 for k, (p, n) in sorted(out.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "config": self.config.fingerprint() | {"device": str(self.config.device)},
            "calibration": {
                "nsamples": self.nsamples,
                "seqlen": self.seqlen,
                "tokens": self.nsamples * self.seqlen,
            },
            "totals": {
                "params": self.total_params,
                "pruned": self.total_pruned,
                "sparsity": self.sparsity,
                "seconds": self.seconds,
            },
            "layer_seconds": {str(k): v for k, v in sorted(self.layer_seconds.items())},
            "resumed_layers": list(self.resumed_layers),
            "run": self.run,
            "zeroshot": self.zeroshot,
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        c = self.config
        what = c.structure or f"{c.scope} scope"
        lines = [
            f"# gradprobe prune report ({self.model_type or 'model'})",
            "",
            f"method **{self.run.get('method', c.method)}**, {what}, calibration {self.nsamples} x {self.seqlen} tokens; "
            f"achieved sparsity **{self.sparsity:.4%}** ({self.total_pruned:,} / {self.total_params:,}) in {self.seconds:.2f} s",
            "",
            *_run_lines(self.run),
            *_zeroshot_lines(self.zeroshot),
            "| layer | tensor | shape | target | achieved | pruned | select s |",
            "|---:|---|---|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            tgt = "-" if r.target is None else f"{r.target:.4f}"
            lines.append(
                f"| {r.layer} | {r.name} | {r.shape[0]}x{r.shape[1]} | {tgt} | {r.sparsity:.4f} | "
                f"{r.pruned:,} | {r.seconds:.4f} |"
            )
        if self.layer_seconds:
            lines += ["", "| layer | seconds | sparsity |", "|---:|---:|---:|"]
            ls = self.layer_sparsity()
            for k, v in sorted(self.layer_seconds.items()):
                lines.append(f"| {k} | {v:.3f} | {ls.get(k, 0.0):.4f} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG: achieved sparsity per layer (bars) and seconds per layer (line)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ls = self.layer_sparsity()
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(ls) + 3), 3.5))
        ax.bar(list(ls), list(ls.values()), color="tab:blue", label="achieved sparsity")
        ax.set_xlabel("layer")
        ax.set_ylabel("sparsity")
        ax.set_ylim(0, 1)
        if self.layer_seconds:
            ax2 = ax.twinx()
            ks = sorted(self.layer_seconds)
            ax2.plot(ks, [self.layer_seconds[k] for k in ks], color="tab:red", marker=".", label="seconds")
            ax2.set_ylabel("seconds")
        ax.set_title(f"{self.model_type} {self.config.method} {self.config.structure or self.config.scope}")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def save(self, directory: str | os.PathLike, stem: str = "prune_report", plot: bool = True) -> dict[str, Path]:
        """Write ``<stem>.md``, ``<stem>.json`` and (``plot``) ``<stem>.png`` into ``directory``; returns
        the paths written. A plot that fails (e.g. matplotlib missing) is a warning: the table and the
        JSON hold everything the plot shows."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        md, js, png = d / f"{stem}.md", d / f"{stem}.json", d / f"{stem}.png"
        md.write_text(self.to_markdown())
        js.write_text(self.to_json())
        out = {"markdown": md, "json": js}
        if plot and optional_plot(self.plot, png):
            out["png"] = png
        return out


def _zeroshot_lines(record: dict[str, Any] | None) -> list[str]:
    from gradprobe.zeroshot import markdown

    return markdown(record)


def _run_lines(run: dict[str, Any]) -> list[str]:
    """Markdown for :attr:`PruneReport.run`: one bullet per section, nested mappings as ``k=v``."""
    if not run:
        return []

    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k}={fmt(x)}" for k, x in v.items())
        if isinstance(v, list):
            return "`" + " ".join(map(str, v)) + "`"
        return f"`{v}`" if isinstance(v, str) and " " in v else str(v)

    return ["## what determined this result", "", *(f"- **{k}**: {fmt(v)}" for k, v in run.items()), ""]


def optional_plot(fn, path: Path) -> bool:
    """Run ``fn(path)``; on any error warn (naming the file and the cause) and return False."""
    try:
        fn(path)
        return True
    except Exception as exc:  # a plot is never worth the result: matplotlib missing, backend errors, ...
        Path(path).unlink(missing_ok=True)
        warnings.warn(f"{Path(path).name} not written: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
        return False
