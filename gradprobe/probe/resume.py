"""The probe's resume checkpoint: each finished step saved in ``resume_dir`` and restored by a rerun."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from gradprobe.probe.rule import _Exact

if TYPE_CHECKING:
    from gradprobe.probe.modes import _Runner
    from gradprobe.probe.targets import _Target


def _norms_digest(norms: Mapping[str, torch.Tensor], targets: Sequence[_Target]) -> str:
    from gradprobe._checkpoint import tensors_digest

    return tensors_digest({t.name: norms[t.name].detach().to("cpu", torch.float32) for t in targets})


class _Resume:
    """The probe's resume checkpoint (:class:`gradprobe._checkpoint.ResumeState`): step ``pos`` of the probe
    order (one decoder layer; model mode: one step of every tensor) saved as its pruned weights and masks.

    A rerun with the same identity restores the longest verified prefix of steps; the model it is given
    must be the dense one the checkpoint was started on (per-tensor checksums).
    """

    def __init__(self, directory, identity: dict, targets: Sequence[_Target], sparsity: float):
        from gradprobe._checkpoint import ResumeState, sample_checksum

        checksums = {t.name: sample_checksum(t.param) for t in targets}
        self.state = ResumeState(directory, identity, checksums)
        self.sparsity = sparsity
        saved = self.state.state["checksums"]
        bad = [n for n, c in checksums.items() if saved.get(n) != c]
        if bad:
            raise ValueError(f"resume_dir {str(directory)!r}: the weights of {bad[:3]} differ from the dense model "
                             "the checkpoint was started on; pass that (unpruned) model, or a new resume_dir")

    def done(self, steps: Sequence[Sequence[_Target]]) -> int:
        """How many leading steps are finished with a checkpoint that verifies."""
        n = 0
        while n < len(steps) and self.state.finished(n):
            n += 1
        return n

    def restore(self, steps: Sequence[Sequence[_Target]], runner: _Runner, final: int = 0) -> dict[str, torch.Tensor]:
        """Copy the pruned weights of ``steps[final:]`` (finished ones) into the model; returns their masks.
        The dense values they replace go to ``runner.changed`` (undone on an error)."""
        masks: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for pos, targets in enumerate(steps):
                if not self.state.finished(pos):
                    raise ValueError(f"resume_dir {str(self.state.dir)!r}: step {pos} has no verified checkpoint")
                if pos < final:
                    continue
                saved = self.state.tensors("layer", pos)
                for t in targets:
                    m = saved[t.name + ".mask"].to(t.param.device)
                    runner.changed.append((t.param, m, t.param.data[m]))
                    t.param.data.copy_(saved[t.name])
                    masks[t.name] = m
        return masks

    def save_g0(self, targets: Sequence[_Target], chosen: list, g0c: list[torch.Tensor]) -> None:
        """Model mode, step 0: each tensor's candidates (bool), their fp32 G0 and, for target="exact",
        the plan (scores; count and per-row flag as an int64 pair)."""
        from gradprobe.report import TensorRow

        tensors, rows = {}, []
        for t, (m, plan), g in zip(targets, chosen, g0c, strict=True):
            tensors[t.name + ".candidates"] = m
            tensors[t.name + ".g0"] = g
            if plan is not None:
                tensors[t.name + ".score"] = plan.score
                tensors[t.name + ".plan"] = torch.tensor([plan.count, int(plan.per_row)], dtype=torch.int64)
            rows.append(TensorRow(layer=t.layer, name=t.name, shape=tuple(t.param.shape), numel=t.param.numel(),
                                  pruned=int(m.sum()), target=self.sparsity, seconds=0.0))
        self.state.mark("layer", 0, tensors, rows, 0.0)

    def g0_state(self, targets: Sequence[_Target], device: torch.device) -> tuple[list, list[torch.Tensor]]:
        """What :meth:`save_g0` saved, as ``_probe_group``'s (chosen, g0c) on ``device``."""
        saved = self.state.tensors("layer", 0)
        chosen, g0c = [], []
        for t in targets:
            plan = None
            if t.name + ".plan" in saved:
                count, per_row = (int(v) for v in saved[t.name + ".plan"])
                plan = _Exact(count, bool(per_row), saved[t.name + ".score"].to(device))
            chosen.append((saved[t.name + ".candidates"].to(device), plan))
            g0c.append(saved[t.name + ".g0"].to(device))
        return chosen, g0c

    def save(self, pos: int, targets: Sequence[_Target], masks: Mapping[str, torch.Tensor], seconds: float) -> None:
        """Checkpoint step ``pos``: the pruned weights (as they are in the model now) and masks."""
        from gradprobe.report import TensorRow

        tensors, rows = {}, []
        for t in targets:
            tensors[t.name] = t.param.data
            tensors[t.name + ".mask"] = masks[t.name]
            rows.append(TensorRow(layer=t.layer, name=t.name, shape=tuple(t.param.shape), numel=t.param.numel(),
                                  pruned=int(masks[t.name].sum()), target=self.sparsity, seconds=seconds))
        self.state.mark("layer", pos, tensors, rows, seconds)
