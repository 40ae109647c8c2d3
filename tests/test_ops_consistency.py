"""consistency against a float64 reference, on every implementation, dtype and odd shape."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfbd_fast import ops
from cfbd_fast.errors import CfbdError, InputError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("triton", "cpu", "ref")
# 1 row, 1023 rows, and shapes spanning several blocks: 16-32 rows per Triton tile, ~680 rows per CPU block at dim 768.
# The interpreter is slow, so the Triton cases keep to fewer rows at dim 768.
SHAPES = {"triton": ((1, 64), (1023, 512), (161, 768), (300, 1024)),
          "cpu": ((1, 64), (1023, 512), (1500, 768), (300, 1024))}
SHAPES["ref"] = SHAPES["cpu"]
CASES = [(impl, dtype, shape) for impl in IMPLS for dtype in DTYPES for shape in SHAPES[impl]]

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter, NaN rows


def _inputs(n, dim, dtype, seed, device="cpu"):
    """Three rounded (N, D) matrices, un-normalised, with correlated pairs so cosines cover [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, dim, generator=gen) * 3
    text = 0.6 * image + torch.randn(n, dim, generator=gen)
    generated = -0.3 * image + torch.randn(n, dim, generator=gen) * 0.5
    return [x.to(dtype).to(device) for x in (image, text, generated)]


def _float64_reference(image, text, generated):
    """(c, s_o, s_g) in float64 from the exact values of the rounded inputs; NaN on invalid rows."""
    i, t, g = (x.cpu().double() for x in (image, text, generated))
    s_o = ((i * t).sum(1) / (i.norm(dim=1) * t.norm(dim=1))).clamp_min(0)
    s_g = ((i * g).sum(1) / (i.norm(dim=1) * g.norm(dim=1))).clamp_min(0)
    bad = torch.zeros(len(i), dtype=torch.bool)
    for x in (i, t, g):
        bad |= ~torch.isfinite(x).all(1) | (x == 0).all(1)
    s_o, s_g = s_o.masked_fill(bad, float("nan")), s_g.masked_fill(bad, float("nan"))
    return (s_g - s_o).abs(), s_o, s_g


def _eager_same_dtype(image, text, generated):
    """What torch eager gives in the inputs' own dtype: normalise, then a row-wise dot."""
    i, t, g = (F.normalize(x.cpu(), dim=1) for x in (image, text, generated))
    s_o, s_g = (i * t).sum(1).clamp_min(0), (i * g).sum(1).clamp_min(0)
    return (s_g - s_o).abs(), s_o, s_g


def _run(impl, monkeypatch, *args):
    monkeypatch.setenv("CFBD_FAST_IMPL", impl)
    return ops.consistency(*args)


@pytest.mark.parametrize("impl,dtype,shape", CASES, ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v))
def test_matches_float64_reference(impl, dtype, shape, monkeypatch, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    inputs = _inputs(*shape, dtype, seed=shape[0] + shape[1], device=device)
    got = _run(impl, monkeypatch, *inputs)
    want = _float64_reference(*inputs)
    for name, ours, ref in zip(("c", "s_o", "s_g"), got, want):
        assert ours.dtype == torch.float32 and ours.shape == (shape[0],) and ours.device.type == device
        err = (ours.cpu().double() - ref).abs()
        if dtype == torch.float32:
            assert (err <= 1e-6 + 1e-5 * ref.abs()).all(), f"{name}: max err {err.max():.3g}"
        else:
            eager = _eager_same_dtype(*inputs)[("c", "s_o", "s_g").index(name)]
            bound = max(2 * (eager.double() - ref).abs().max().item(), 1e-4)
            assert err.max() <= bound, f"{name}: max err {err.max():.3g} > {bound:.3g} (2x torch eager {dtype})"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_invalid_rows_give_nan(impl, dtype, monkeypatch, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    image, text, generated = _inputs(40, 96, dtype, seed=7)
    image[3] = 0
    text[5, 17] = float("nan")
    generated[9, 95] = float("inf")
    text[11, 0] = float("-inf")
    generated[20] = 0
    image, text, generated = (x.to(device) for x in (image, text, generated))
    invalid = {3, 5, 9, 11, 20}
    c, s_o, s_g = _run(impl, monkeypatch, image, text, generated)
    for out in (c, s_o, s_g):
        assert set(torch.nonzero(out.isnan()).flatten().tolist()) == invalid


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_shape_on_gpu(dtype, monkeypatch):
    inputs = _inputs(300_000, 1024, dtype, seed=3, device="cuda")
    got = _run("triton", monkeypatch, *inputs)
    want = _float64_reference(*inputs)
    eager = _eager_same_dtype(*inputs)
    for ours, ref, theirs in zip(got, want, eager):
        bound = 1e-5 if dtype == torch.float32 else max(2 * (theirs.double() - ref).abs().max().item(), 1e-4)
        assert (ours.cpu().double() - ref).abs().max() <= bound


def test_numpy_in_numpy_out_including_bfloat16(monkeypatch):
    monkeypatch.delenv("CFBD_FAST_IMPL", raising=False)
    tensors = _inputs(50, 64, torch.float32, seed=1)
    for np_dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        arrays = [x.numpy().astype(np_dtype) for x in tensors]
        got = ops.consistency(*arrays)
        want = _float64_reference(*(torch.from_numpy(a.astype(np.float32)) for a in arrays))
        for ours, ref in zip(got, want):
            assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
            np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_read_only_memmap_is_read_in_place(tmp_path, monkeypatch):
    monkeypatch.delenv("CFBD_FAST_IMPL", raising=False)
    arrays = [x.numpy() for x in _inputs(2000, 128, torch.float16, seed=5)]
    maps = []
    for name, array in zip("itg", arrays):
        np.save(tmp_path / f"{name}.npy", array)
        maps.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    assert not maps[0].flags.writeable
    view = ops.as_tensor(maps[0], "image")
    assert view.data_ptr() == maps[0].ctypes.data  # shared, not copied
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ops.consistency(*maps)
    for ours, theirs in zip(got, ops.consistency(*arrays)):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_rows_and_empty_input(impl, monkeypatch, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    wide = _inputs(33, 160, torch.float16, seed=9, device=device)
    narrow = [x[:, :96] for x in wide]  # row stride 160, unit column stride
    got = _run(impl, monkeypatch, *narrow)
    want = _float64_reference(*narrow)
    for ours, ref in zip(got, want):
        assert (ours.cpu().double() - ref).abs().max() <= 1e-4
    empty = [x[:0] for x in wide]
    assert all(out.shape == (0,) for out in _run(impl, monkeypatch, *empty))


def test_launcher_and_api_errors_say_what_to_do(monkeypatch, triton_device):
    image, text, generated = _inputs(8, 64, torch.float32, seed=2, device=triton_device)
    monkeypatch.setenv("CFBD_FAST_IMPL", "triton")
    with pytest.raises(InputError, match=r"\.contiguous\(\)"):
        ops.consistency(image.T.contiguous().T, text, generated)
    with pytest.raises(InputError, match="shape"):
        ops.consistency(image, text[:4], generated)
    with pytest.raises(InputError, match="float32"):
        ops.consistency(image.double(), text, generated)
    with pytest.raises(InputError, match="2-D"):
        ops.consistency(image[0], text[0], generated[0])
    with pytest.raises(InputError, match="numpy array or a torch tensor"):
        ops.consistency(image.tolist(), text, generated)
    monkeypatch.setenv("CFBD_FAST_IMPL", "fastest")
    with pytest.raises(InputError, match="CFBD_FAST_IMPL"):
        ops.consistency(image, text, generated)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_forced_triton_without_cuda_raises_instead_of_falling_back():
    code = ("import torch; from cfbd_fast import ops; from cfbd_fast.errors import CfbdError\n"
            "x = torch.randn(4, 8)\n"
            "try:\n    ops.consistency(x, x, x)\nexcept CfbdError as exc:\n    print('raised:', exc)\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CFBD_FAST_IMPL"] = "triton"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised:" in proc.stdout and "CUDA tensors" in proc.stdout and ".cuda()" in proc.stdout


def test_forced_cpu_rejects_other_devices(monkeypatch):
    monkeypatch.setenv("CFBD_FAST_IMPL", "cpu")
    x = torch.randn(4, 8, device="meta")
    with pytest.raises(CfbdError, match=r"\.cpu\(\)"):
        ops.consistency(x, x, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_path_is_the_same_on_any_thread_count(dtype, monkeypatch):
    # Each row is summed by one kernel call whatever the blocks: 1 and 3 threads (several blocks each) agree bitwise.
    monkeypatch.setenv("CFBD_FAST_IMPL", "cpu")
    inputs = _inputs(20_000, 96, dtype, seed=12)
    inputs[1][7] = 0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.consistency(*inputs)
        torch.set_num_threads(3)
        three = ops.consistency(*inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a.isnan(), b.isnan()) and a.isnan().sum() == 1
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_cpu_path_without_hardware_half_conversion(monkeypatch):
    # Where the CPU cannot convert float16 (no F16C), blocks are widened by torch first: same values.
    monkeypatch.setenv("CFBD_FAST_IMPL", "cpu")
    inputs = _inputs(3000, 200, torch.float16, seed=13)
    native = ops.consistency(*inputs)
    monkeypatch.setattr(ops._common, "NATIVE_HALF", False)
    widened = ops.consistency(*inputs)
    for a, b in zip(native, widened):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
