"""Mask-regression cases: every method's masks on fixed models and calibration, hashed.

``masks.json`` holds the SHA-256 of each case's masks, recorded from the code before the layerwise
pipeline was unified (``python -m tests.golden.cases --record``). A case returns {tensor name: bool mask};
the digest covers names, shapes and mask bits, so any change to any selected weight changes it.
Cases call only public entry points, so they stay valid when the layers beneath them are rebuilt.
Calibration runs one window per forward (``batch_size=1``): the Wanda statistic is a sum of per-window
fp32 partials in window order (independent of batch size and world size), which at one window per
batch is bit for bit the pre-pipeline per-batch sum.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MASKS_JSON = HERE / "masks.json"


def _decoder_masks(model) -> dict[str, torch.Tensor]:
    """{parameter name: weight == 0} for every decoder linear (random weights have no exact zeros)."""
    from gradprobe.models import get_adapter

    ad = get_adapter(model)
    out = {}
    for i, layer in enumerate(ad.decoder_layers(model)):
        for name, lin in ad.prunable_linears(layer).items():
            out[f"{i}.{name}"] = lin.weight.detach() == 0
    return out


def digest(masks: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].to(torch.bool).cpu().contiguous()
        h.update(f"{name}:{tuple(m.shape)}:".encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()


def _tiny(family: str):
    sys.path.insert(0, str(HERE.parent))
    from tiny_models import tiny_model

    return tiny_model(family, num_layers=3)


def _tiny_ids(vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (4, 32), generator=g)


def _embedded():
    from gradprobe.data import calibration_batches
    from gradprobe.embedded import load_default_model

    model, tok = load_default_model()
    return model, calibration_batches(tok, nsamples=4, seqlen=64, seed=0)


def _prune(model, ids, **cfg) -> dict[str, torch.Tensor]:
    import gradprobe

    gradprobe.prune(model, ids, gradprobe.PruneConfig(progress=False, batch_size=1, **cfg))
    return _decoder_masks(model)


def _variant(model, ids) -> dict[str, torch.Tensor]:
    from gradprobe.variant import VariantMaskFn

    return _prune(model, ids, method="wanda", sparsity=0.5, mask_fn=VariantMaskFn())


def _owl_old_mapping(model, ids) -> dict[str, torch.Tensor]:
    """OWL with gradprobe's original mapping (layer deviations rescaled to +-lambda)."""
    from gradprobe import allocation

    kw = {"m": 5.0, "lam": 0.08}
    if "mapping" in allocation.owl_from_model.__code__.co_varnames:
        kw["mapping"] = "rescaled"
    alloc = allocation.owl_from_model(model, ids, 0.5, **kw)
    import gradprobe

    gradprobe.prune(model, ids, alloc.config(progress=False, batch_size=1))
    return _decoder_masks(model)


def _probe(model, ids, mode: str) -> dict[str, torch.Tensor]:
    import gradprobe

    gradprobe.probe_prune_(model, ids, 0.5, method="wanda", scope="row", reduction_factor=0.1,
                           gradient_threshold=0.0, mode=mode)
    return _decoder_masks(model)


def _cases() -> dict[str, tuple[Callable, Callable, bool]]:
    """name -> (model factory, run(model, ids) -> masks, needs the embedded model)."""
    out: dict[str, tuple[Callable, Callable, bool]] = {}
    runs: dict[str, Callable] = {
        "magnitude-row-50": lambda m, ids: _prune(m, None, method="magnitude", sparsity=0.5),
        "wanda-row-50": lambda m, ids: _prune(m, ids, method="wanda", sparsity=0.5),
        "wanda-layer-60": lambda m, ids: _prune(m, ids, method="wanda", sparsity=0.6, scope="layer"),
        "wanda-global-50": lambda m, ids: _prune(m, ids, method="wanda", sparsity=0.5, scope="global"),
        "wanda-2:4": lambda m, ids: _prune(m, ids, method="wanda", sparsity=None, structure="2:4"),
        "variant-50": _variant,
        "owl-rescaled-50": _owl_old_mapping,
        "probe-model-50": lambda m, ids: _probe(m, ids, "model"),
        "probe-layerwise-50": lambda m, ids: _probe(m, ids, "layerwise"),
    }
    for family in ("llama", "qwen2"):
        for name, run in runs.items():
            out[f"tiny-{family}/{name}"] = (lambda f=family: (_tiny(f), _tiny_ids()), run, False)
    for name in ("magnitude-row-50", "wanda-row-50", "wanda-2:4", "owl-rescaled-50", "probe-model-50"):
        out[f"smollm2/{name}"] = (_embedded, runs[name], True)
    return out


CASES = _cases()


def run_case(name: str) -> str:
    make, run, _slow = CASES[name]
    model, ids = make()
    return digest(run(model, ids))


def recorded() -> dict[str, str]:
    return json.loads(MASKS_JSON.read_text())


if __name__ == "__main__":
    if "--record" not in sys.argv:
        raise SystemExit("usage: python -m tests.golden.cases --record [--only PREFIX]")
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    table = recorded() if MASKS_JSON.exists() else {}
    for name in CASES:
        if name.startswith(only):
            table[name] = run_case(name)
            print(name, table[name][:16], flush=True)
    MASKS_JSON.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
