"""fit_gmm with its EM passes in torch (cfbd_fast.gmm.device) against the numba fit_gmm: parameters to 1e-5, same
posteriors; and no parallel numba kernel compiled on the paths a new process takes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cfbd_fast.gmm import fit_gmm
from cfbd_fast.gmm.device import fit_gmm_device, posterior_on_device

from gmm_data import dataset  # test_gmm.py's data sets (no scikit-learn needed)

CASES = [("consistency", 5, 200_000), ("separated", 5, 50_000), ("poisoned", 2, 100_000), ("overlap", 3, 30_000),
         ("lognormal", 1, 1_000)]


def _assert_parity(device, name, k, n, dtype=np.float64):
    x = dataset(name, n, seed=1).astype(dtype)
    want = fit_gmm(x, k=k, seed=0)
    got = fit_gmm_device(x, k=k, seed=0, device=device)
    for field in ("weights", "means", "variances"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5, err_msg=field)
    assert abs(got.score - want.score) < 1e-5
    assert got.converged == want.converged
    lowest = int(np.argmin(got.means))
    np.testing.assert_allclose(posterior_on_device(got, x, lowest, device), want.posterior(x, lowest), atol=1e-5)


@pytest.mark.parametrize("name,k,n", CASES)
def test_torch_em_matches_fit_gmm_on_cpu(name, k, n):
    _assert_parity("cpu", name, k, n)


def test_torch_em_reads_float16_and_float32():
    _assert_parity("cpu", "consistency", 5, 50_000, np.float16)
    _assert_parity("cpu", "poisoned", 2, 50_000, np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("name,k,n", CASES + [("consistency", 5, 3_000_000)])
def test_torch_em_matches_fit_gmm_on_cuda(name, k, n):
    _assert_parity("cuda", name, k, n)


def _compiled_parallel_kernels(code: str, threads: int) -> list[str]:
    """Run `code` in a new process with `threads` numba threads; the parallel GMM kernels it compiled."""
    script = textwrap.dedent(f"""
        import numba, numpy as np
        numba.set_num_threads({threads})
        from cfbd_fast.gmm import _kernels, fit_gmm
        x = np.random.default_rng(0).normal(size=20_000)
        {code}
        print([name for name in ("em_pass_parallel", "evaluate_parallel")
               if getattr(_kernels, name).signatures])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "NUMBA_NUM_THREADS": str(max(threads, 1))})
    return eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_no_parallel_kernel_compiled_with_one_thread_or_on_the_device_path():
    fit_and_posterior = "g = fit_gmm(x, k=3); g.posterior(x, 0)"
    assert _compiled_parallel_kernels(fit_and_posterior, 1) == []
    device_path = ("from cfbd_fast.gmm.device import fit_gmm_device, posterior_on_device\n"
                   "        g = fit_gmm_device(x, k=3, device='cpu'); posterior_on_device(g, x, 0, 'cpu')")
    assert _compiled_parallel_kernels(device_path, 2) == []
