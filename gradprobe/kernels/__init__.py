"""Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1), one op per module.

Imported lazily by the backend registry the first time the ``triton`` backend is chosen, so that
``import gradprobe`` never imports Triton. Importing this package registers each kernel module's
implementations with :func:`gradprobe._backend.impl`.
"""

import triton  # noqa: F401  (ImportError marks the backend unavailable, with the reason)
