"""Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1), one op family per module.

Imported lazily by the backend registry the first time the ``triton`` backend is chosen, so that
``import gradprobe`` never imports Triton. Importing this package registers each kernel module's
implementations with :func:`gradprobe._backend.impl`:

* ``radix_select``: row_threshold, row_mask, row_prune_, global_threshold;
* ``mask``: global_mask, global_prune_;
* ``nm_mask``: nm_mask, nm_prune_;
* ``probe_update``: probe_accumulate_, probe_apply_ (the gradient probe's statistics and decision);
* ``wanda_score``: the fp32 score and its order-preserving key (device functions used by the above);
* ``_configs``: autotune lists, log2 bucketing, ``GRADPROBE_AUTOTUNE``.
"""

import triton  # noqa: F401  (ImportError marks the backend unavailable, with the reason)

from gradprobe.kernels import mask, nm_mask, probe_update, radix_select  # noqa: E402,F401
