"""invalid_rows against its literal definition (a zero row, or any NaN/inf) on every implementation, dtype, shape."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from cfbd_fast import ops
from cfbd_fast.errors import InputError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("triton", "cpu", "ref")
# 1 row, 1023 rows, a dim that is not a multiple of the Triton column step (128) and several CPU blocks.
SHAPES = {"triton": ((1, 64), (1023, 512), (97, 200)),
          "cpu": ((1, 64), (1023, 512), (97, 200), (5000, 768))}
SHAPES["ref"] = SHAPES["cpu"]
CASES = [(impl, dtype, shape) for impl in IMPLS for dtype in DTYPES for shape in SHAPES[impl]]

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter, NaN rows


def _with_invalid_rows(n, dim, dtype, seed):
    """Random rows with about one in eight spoiled: zeroed, or one NaN, +inf or -inf at a random column."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    spoiled = torch.randperm(n, generator=gen)[: max(1, n // 8)] if n > 1 else torch.tensor([0])
    for i, row in enumerate(spoiled.tolist()):
        col = int(torch.randint(0, dim, (1,), generator=gen))
        if i % 4 == 0:
            x[row] = 0
        else:
            x[row, col] = (float("nan"), float("inf"), float("-inf"))[i % 4 - 1]
    return x.to(dtype)


def _literal(x):
    x = x.cpu().double()
    return ~torch.isfinite(x).all(1) | (x == 0).all(1)


def _run(impl, monkeypatch, x):
    monkeypatch.setenv("CFBD_FAST_IMPL", impl)
    return ops.invalid_rows(x)


@pytest.mark.parametrize("impl,dtype,shape", CASES, ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v))
def test_matches_literal_definition(impl, dtype, shape, monkeypatch, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    x = _with_invalid_rows(*shape, dtype, seed=shape[0] + shape[1]).to(device)
    mask = _run(impl, monkeypatch, x)
    assert mask.dtype == torch.bool and mask.shape == (shape[0],) and mask.device.type == device
    want = _literal(x)
    assert want.any()
    assert torch.equal(mask.cpu(), want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_marks_the_rows_consistency_reports_as_nan(impl, dtype, monkeypatch, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    gen = torch.Generator().manual_seed(7)
    image, text, generated = (torch.randn(40, 96, generator=gen).to(dtype) for _ in range(3))
    image[3] = 0
    text[5, 17] = float("nan")
    generated[9, 95] = float("inf")
    text[11, 0] = float("-inf")
    generated[20] = 0
    image, text, generated = (x.to(device) for x in (image, text, generated))
    masks = [_run(impl, monkeypatch, x) for x in (image, text, generated)]
    assert [set(torch.nonzero(m).flatten().tolist()) for m in masks] == [{3}, {5, 11}, {9, 20}]
    assert all(m.dtype == torch.bool and m.shape == (40,) for m in masks)
    c, _, _ = ops.consistency(image, text, generated)
    assert torch.equal(c.isnan(), masks[0] | masks[1] | masks[2])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter squares 1e20
@pytest.mark.parametrize("impl", ("triton", "cpu"))
def test_float32_squared_norm_overflow_counts_as_invalid(impl, monkeypatch, triton_device):
    # Documented: the kernels test the float32 squared norm, so a finite row whose squared norm overflows is invalid.
    x = torch.ones(4, 64, device=triton_device if impl == "triton" else "cpu")
    x[2] = 1e20
    assert _run(impl, monkeypatch, x).tolist() == [False, False, True, False]
    assert not _run("ref", monkeypatch, x).any()  # the literal definition sees a finite, non-zero row


def test_numpy_in_numpy_out_including_bfloat16(monkeypatch):
    monkeypatch.delenv("CFBD_FAST_IMPL", raising=False)
    x = _with_invalid_rows(200, 64, torch.float32, seed=1)
    for np_dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        array = x.numpy().astype(np_dtype)
        mask = ops.invalid_rows(array)
        assert isinstance(mask, np.ndarray) and mask.dtype == bool
        np.testing.assert_array_equal(mask, _literal(torch.from_numpy(array.astype(np.float32))).numpy())
    clean = ops.invalid_rows(np.ones((50, 64), dtype=ml_dtypes.bfloat16))
    assert isinstance(clean, np.ndarray) and clean.dtype == bool and not clean.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_rows_and_empty_input(impl, monkeypatch, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    wide = _with_invalid_rows(33, 160, torch.float16, seed=9).to(device)
    narrow = wide[:, :96]  # row stride 160, unit column stride
    assert torch.equal(_run(impl, monkeypatch, narrow).cpu(), _literal(narrow))
    assert _run(impl, monkeypatch, wide[:0]).shape == (0,)


def test_errors_say_what_to_do(monkeypatch, triton_device):
    x = torch.randn(8, 64, device=triton_device)
    monkeypatch.setenv("CFBD_FAST_IMPL", "triton")
    with pytest.raises(InputError, match=r"\.contiguous\(\)"):
        ops.invalid_rows(x.T.contiguous().T)
    with pytest.raises(InputError, match="float32"):
        ops.invalid_rows(x.double())
    with pytest.raises(InputError, match="2-D"):
        ops.invalid_rows(x[0])
    with pytest.raises(InputError, match="numpy array or a torch tensor"):
        ops.invalid_rows(x.tolist())
