"""seed_correlation (mean, max, top-k) against the literal float64 N x q definition, on every implementation."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfbd_fast import ops
from cfbd_fast.errors import InputError
from cfbd_fast.ops.seed_correlation import mean_unit_seed

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("triton", "cpu", "ref")
REDUCES = (("mean", None), ("max", None), ("topk", 1), ("topk", 7), ("topk", "all"))  # (reduce, topk)
# (rows, dim, seeds): 1 row, 1023 rows, several 64-row tiles, several 64-seed tiles with a partial last one.
SHAPES = ((1, 64, 50), (1023, 512, 50), (100, 768, 130), (129, 1024, 20))

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter, NaN rows


def _inputs(n, dim, q, dtype, seed, device="cpu"):
    """Captions correlated with some of the seeds (so max/top-k differ from mean), rounded to `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randn(q, dim, generator=gen) * 2
    pick = torch.randint(0, q, (n,), generator=gen)
    text = 0.8 * seeds[pick] + torch.randn(n, dim, generator=gen)
    return text.to(dtype).to(device), seeds.to(dtype).to(device)


def _literal_float64(text, seeds, reduce, topk):
    """The N x q definition: cosine of every caption with every seed, reduced over the seeds; NaN on invalid rows."""
    t, s = text.cpu().double(), seeds.cpu().double()
    cos = (t @ s.T) / t.norm(dim=1, keepdim=True) / s.norm(dim=1)
    z = {"mean": lambda: cos.mean(1), "max": lambda: cos.max(1).values,
         "topk": lambda: cos.topk(topk or 1, dim=1).values.mean(1)}[reduce]()
    bad = ~torch.isfinite(t).all(1) | (t == 0).all(1)
    return z.masked_fill(bad, float("nan"))


def _eager_same_dtype(text, seeds, reduce, topk):
    cos = F.normalize(text.cpu(), dim=1) @ F.normalize(seeds.cpu(), dim=1).T
    return {"mean": lambda: cos.mean(1), "max": lambda: cos.max(1).values,
            "topk": lambda: cos.topk(topk or 1, dim=1).values.mean(1)}[reduce]()


def test_mean_of_unit_seeds_equals_literal_mean_cosine():
    # mean_j <t, s_j> / (|t| |s_j|) = <t, mean_j s_j / |s_j|> / |t|: checked in float64 on fresh data.
    gen = torch.Generator().manual_seed(11)
    text, seeds = torch.randn(500, 256, generator=gen, dtype=torch.float64), torch.randn(
        77, 256, generator=gen, dtype=torch.float64) * 5
    literal = _literal_float64(text, seeds, "mean", None)
    unit = seeds / seeds.norm(dim=1, keepdim=True)
    through_mean = (text @ unit.mean(0)) / text.norm(dim=1)
    torch.testing.assert_close(through_mean, literal, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mean_unit_seed(seeds).double(), unit.mean(0), rtol=1e-6, atol=1e-7)


def _cases():
    for impl in IMPLS:
        for dtype in DTYPES:
            for shape in SHAPES:
                for reduce, topk in REDUCES:
                    # The interpreter is slow: its topk=1 and topk=q cases run on the shapes with fewer rows.
                    if impl == "triton" and shape[0] == 1023 and reduce == "topk" and topk != 7:
                        continue
                    yield pytest.param(impl, dtype, shape, reduce, topk,
                                       id=f"{impl}-{dtype}-{'x'.join(map(str, shape))}-{reduce}{topk or ''}")


@pytest.mark.parametrize("impl,dtype,shape,reduce,topk", list(_cases()))
def test_matches_float64_reference(impl, dtype, shape, reduce, topk, monkeypatch, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    n, dim, q = shape
    topk = q if topk == "all" else topk
    text, seeds = _inputs(n, dim, q, dtype, seed=n + dim + q, device=device)
    monkeypatch.setenv("CFBD_FAST_IMPL", impl)
    z = ops.seed_correlation(text, seeds, reduce=reduce, topk=topk)
    assert z.dtype == torch.float32 and z.shape == (n,) and z.device.type == device
    ref = _literal_float64(text, seeds, reduce, topk)
    err = (z.cpu().double() - ref).abs()
    if dtype == torch.float32:
        assert (err <= 1e-6 + 1e-5 * ref.abs()).all(), f"max err {err.max():.3g}"
    else:
        bound = max(2 * (_eager_same_dtype(text, seeds, reduce, topk).double() - ref).abs().max().item(), 1e-4)
        assert err.max() <= bound, f"max err {err.max():.3g} > {bound:.3g} (2x torch eager {dtype})"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduce,topk", (("mean", None), ("max", None), ("topk", 3)))
def test_invalid_rows_give_nan(impl, reduce, topk, monkeypatch, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    text, seeds = _inputs(70, 64, 16, torch.float16, seed=4)
    text[2] = 0
    text[8, 3] = float("nan")
    text[65, 63] = float("inf")
    monkeypatch.setenv("CFBD_FAST_IMPL", impl)
    z = ops.seed_correlation(text.to(device), seeds.to(device), reduce=reduce, topk=topk)
    assert set(torch.nonzero(z.isnan()).flatten().tolist()) == {2, 8, 65}


@pytest.mark.gpu
@pytest.mark.parametrize("reduce,topk", (("mean", None), ("max", None), ("topk", 10)))
def test_large_shape_on_gpu(reduce, topk, monkeypatch):
    text, seeds = _inputs(40_000, 1024, 1000, torch.float16, seed=8, device="cuda")  # float64 check runs on CPU
    monkeypatch.setenv("CFBD_FAST_IMPL", "triton")
    z = ops.seed_correlation(text, seeds, reduce=reduce, topk=topk)
    ref = _literal_float64(text, seeds, reduce, topk)
    bound = max(2 * (_eager_same_dtype(text, seeds, reduce, topk).double() - ref).abs().max().item(), 1e-4)
    assert (z.cpu().double() - ref).abs().max() <= bound


def test_numpy_inputs_and_read_only_memmap(tmp_path, monkeypatch):
    monkeypatch.delenv("CFBD_FAST_IMPL", raising=False)
    text, seeds = _inputs(300, 128, 40, torch.float32, seed=6)
    for np_dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        text.numpy().astype(np_dtype).tofile(tmp_path / "text.bin")
        mapped = np.memmap(tmp_path / "text.bin", dtype=np_dtype, mode="r", shape=tuple(text.shape))
        seeds_np = seeds.numpy().astype(np_dtype)
        z = ops.seed_correlation(mapped, seeds_np, reduce="topk", topk=5)
        assert isinstance(z, np.ndarray) and z.dtype == np.float32
        rounded = [torch.from_numpy(np.asarray(a).astype(np.float32)) for a in (mapped, seeds_np)]
        np.testing.assert_allclose(z, _literal_float64(*rounded, "topk", 5).numpy(), rtol=1e-5, atol=1e-6)


def test_argument_errors_say_what_to_do():
    text, seeds = _inputs(10, 32, 6, torch.float32, seed=1)
    with pytest.raises(InputError, match="topk <= 6"):
        ops.seed_correlation(text, seeds, reduce="topk")
    with pytest.raises(InputError, match="topk <= 6"):
        ops.seed_correlation(text, seeds, reduce="topk", topk=7)
    with pytest.raises(InputError, match="drop topk"):
        ops.seed_correlation(text, seeds, reduce="mean", topk=3)
    with pytest.raises(InputError, match="one of mean, max, topk"):
        ops.seed_correlation(text, seeds, reduce="median")
    with pytest.raises(InputError, match=r"\(q >= 1, 32\)"):
        ops.seed_correlation(text, seeds[:, :16])
    bad = seeds.clone()
    bad[1] = 0
    bad[4, 0] = float("nan")
    with pytest.raises(InputError, match="2 of 6 seed rows"):
        ops.seed_correlation(text, bad)


def test_the_scan_offers_exactly_the_reductions_the_kernel_computes():
    """pipeline/options.py describes each choice for the CLI; the op checks its own tuple: the two name the same."""
    from cfbd_fast.ops.seed_correlation import REDUCTIONS as computed
    from cfbd_fast.pipeline.options import REDUCTIONS as offered

    assert set(offered) == set(computed)
