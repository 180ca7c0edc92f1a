"""Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1), one op family per module.

Imported lazily by the backend registry the first time the ``triton`` backend is chosen, so that
``import gradprobe`` never imports Triton. Importing this package registers each kernel module's
implementations with :func:`gradprobe._backend.impl`:

* ``row_select``: row_threshold, row_mask, row_prune_;
* ``global_select``: global_threshold, global_mask, global_prune_;
* ``nm_mask``: nm_mask, nm_prune_;
* ``probe_update``: probe_accumulate_, probe_apply_ (the gradient probe's statistics and decision);
* ``_radix``: bucket search, tie-rule mask write and host checks shared by the two selection modules;
* ``_score``: the fp32 score and its order-preserving key (device functions used by the above);
* ``_configs``: autotune lists, log2 bucketing, ``GRADPROBE_AUTOTUNE``.

pack_24 and cumsum_cut have no Triton kernels (2:4 packing on CUDA is ``csrc/pack_24.cu``).
"""

import triton  # noqa: F401  (ImportError marks the backend unavailable, with the reason)

from gradprobe.kernels import global_select, nm_mask, probe_update, row_select  # noqa: E402,F401
