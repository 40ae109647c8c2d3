"""The MLP mapper in half precision (the CUDA scan's default): how far it moves c from the float32 mapper's."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cfbd_fast import ops
from cfbd_fast.mapper import load_mapper
from cfbd_fast.pipeline.mapping import with_precision
from cfbd_fast.pipeline.options import ScanConfig
from cfbd_fast.store import EmbeddingStore

GOLDEN = Path(__file__).parent / "data" / "scan_golden"
sys.path.insert(0, str(GOLDEN))
import record  # noqa: E402  (the golden store's options)

# Largest change of c = |s_g - s_o| over the golden store's 6,000 rows as the mapper's matmuls drop from float32
# (fp16 keeps 11 significant bits, bf16 8). Measured on CPU: fp16 7.7e-5, bf16 5.8e-4 (mean 1.5e-5, 1.3e-4); the
# bounds leave room for CUDA's reduced-precision reductions.
BOUNDS = {torch.float16: 5e-4, torch.bfloat16: 4e-3}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path, mapper_path = record.make_inputs(tmp_path_factory.mktemp("precision"))
    store = EmbeddingStore.open(path)
    return np.asarray(store.matrix("image")), np.asarray(store.matrix("text")), load_mapper(mapper_path)


def _c(mapper, image, text, device):
    img = ops.as_tensor(image, "image").to(device)
    gen = mapper.to(device).map(img.float())
    c, _, _ = ops.consistency(img, ops.as_tensor(text, "text").to(device), gen)
    return c.cpu().numpy()


def _check_bound(pairs, dtype, device):
    image, text, mapper = pairs
    full = _c(mapper, image, text, device)
    half = mapper.with_precision(dtype)
    assert half is not mapper and half.layers[0].weight.dtype == dtype
    assert mapper.layers[0].weight.dtype == torch.float32  # the float32 mapper is left as it was
    change = np.abs(_c(half, image, text, device) - full)
    assert np.isfinite(change).all()
    assert change.max() <= BOUNDS[dtype], f"{dtype}: max change of c {change.max():.2e}"
    return change


@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_half_precision_mapper_moves_c_within_the_bound_on_cpu(pairs, dtype):
    _check_bound(pairs, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_half_precision_mapper_moves_c_within_the_bound_on_cuda(pairs, dtype):
    _check_bound(pairs, dtype, "cuda")


def test_scan_precision_choice():
    mapper = load_mapper(GOLDEN / "mapper.safetensors")
    dtype = lambda **o: with_precision(mapper, ScanConfig(**o)).layers[0].weight.dtype  # noqa: E731
    assert dtype(device="cpu") == torch.float32
    assert dtype(device="cuda") == torch.float16
    assert dtype(device="cuda", mapper_precision="fp32") == torch.float32
    assert dtype(device="cpu", mapper_precision="bf16") == torch.bfloat16
    assert with_precision(mapper, ScanConfig(mapper_precision="fp32")) is mapper
