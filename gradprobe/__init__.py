"""gradprobe: exact, fast pruning of LLM linear layers.

Public API (tensor level): :func:`prune_mask`, :func:`prune_`, :func:`global_prune_masks`,
:func:`global_prune_`, :func:`kth_threshold`. Backends are picked by tensor device; force one with
``GRADPROBE_BACKEND`` = auto | reference | cpp | triton.
"""

from gradprobe import ops  # noqa: F401  (defines the gradprobe:: ops on import)
from gradprobe.api import prune  # noqa: E402
from gradprobe.config import PruneConfig  # noqa: E402
from gradprobe.pack import pack_24, unpack_24
from gradprobe.probe import probe_prune_  # noqa: E402
from gradprobe.report import PruneReport  # noqa: E402
from gradprobe.select import (
    Threshold,
    global_prune_,
    global_prune_masks,
    kth_threshold,
    prune_,
    prune_mask,
)

__version__ = "0.1.0"

__all__ = [
    "PruneConfig",
    "PruneReport",
    "prune",
    "probe_prune_",
    "Threshold",
    "global_prune_",
    "global_prune_masks",
    "kth_threshold",
    "pack_24",
    "prune_",
    "prune_mask",
    "unpack_24",
]
