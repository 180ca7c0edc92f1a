"""Shared set-up of the quality benches: the embedded model, calibration, a dense snapshot, perplexity."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gradprobe.data import calibration_batches, eval_ids  # noqa: E402
from gradprobe.embedded import load_default_model  # noqa: E402
from gradprobe.eval import perplexity  # noqa: E402


def embedded_setup(nsamples: int, seqlen: int, windows: int | None):
    """(model, calibration ids (nsamples, seqlen) int64, dense state dict, ppl()) for the embedded model.

    ``ppl()`` is the perplexity of the model as it is now on ``windows`` x 256 tokens of lee_background;
    restore the dense weights between methods with ``model.load_state_dict(dense)``.
    """
    torch.manual_seed(0)
    model, tok = load_default_model()
    batches = calibration_batches(tok, nsamples=nsamples, seqlen=seqlen, seed=0)
    ids = eval_ids(tok)
    dense = {k: v.clone() for k, v in model.state_dict().items()}

    def ppl() -> float:
        return perplexity(model, ids, context=256, max_windows=windows, progress=False).value

    ppl_fn: Callable[[], float] = ppl
    return model, batches, dense, ppl_fn
