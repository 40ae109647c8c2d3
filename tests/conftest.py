"""Shared test set-up: Triton kernels run interpreted on machines without CUDA; `gpu` tests skip there."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Read when the kernels are decorated, so it must be set before cfbd_fast.ops is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_device() -> str:
    """Where the Triton kernels run in tests: the GPU when there is one, else CPU tensors under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"
