"""Test configuration: offline HF, Triton interpreter on CPU-only machines, seeding, backends.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here, at
collection time, when no CUDA device is present (on a GPU machine Triton compiles for the GPU).
"""

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRADPROBE_AUTOTUNE", "0")

import pytest  # noqa: E402

import gradprobe  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
