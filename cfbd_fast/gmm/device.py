"""fit_gmm with its EM passes in torch on a device (the CUDA path): no parallel numba kernel to compile.

The initialisation is fit_gmm's own (k-means++ / Lloyd and EM on a host sample, with the cached serial kernels);
each EM iteration is one torch float64 pass over the values on the device, plugged into fit_gmm's EM loop through
`em.run_em`'s `em_pass` parameter, so the parameters agree with fit_gmm's to rounding (tests hold them to 1e-5).
"""
from __future__ import annotations

import numpy as np
import torch

from . import em
from .em import GaussianMixture1D

BLOCK = 1 << 21  # values per torch block: the (block, k) float64 temporaries stay at 16 MiB per component each


def device_em_pass(x: torch.Tensor):
    """An `em_pass` for fit_gmm's EM loop over the float64 values `x` on their device: the same four sums
    (sum r, sum r (x - mu), sum r (x - mu)**2 per component, sum log p(x)) as the numba pass, one transfer back."""

    def em_pass(_values, _table, log_coef, half_prec, means):
        coef, prec, mu = (torch.as_tensor(a, dtype=torch.float64).to(x.device, non_blocking=True)
                          for a in (log_coef, half_prec, means))
        sums = torch.zeros(3 * len(mu) + 1, dtype=torch.float64, device=x.device)
        for start in range(0, x.shape[0], BLOCK):
            d = x[start:start + BLOCK, None] - mu[None, :]
            joint = coef - prec * d * d
            top = joint.max(dim=1, keepdim=True).values
            terms = torch.exp(joint - top)
            total = terms.sum(dim=1, keepdim=True)
            resp = terms / total
            rd = resp * d
            sums += torch.cat((resp.sum(0), rd.sum(0), (rd * d).sum(0), (top + torch.log(total)).sum().reshape(1)))
        out = sums.cpu().numpy()
        k = len(mu)
        return out[:k], out[k:2 * k], out[2 * k:3 * k], float(out[3 * k])

    return em_pass


def fit_gmm_device(x, k: int = 5, *, device: str | torch.device = "cuda", max_iter: int = 200, tol: float = 1e-3,
                   seed: int = 0, reg_covar: float = 1e-6) -> GaussianMixture1D:
    """fit_gmm(x, k, init="kmeans") with the EM iterations on `device` (also runs on "cpu", for tests)."""
    values, table = em.as_kernel_input(x, check_finite=True)
    em.check_options(values.shape[0], k, max_iter, tol, "kmeans", reg_covar)
    return em.run_em(values, table, k=k, seed=seed, max_iter=max_iter, tol=tol, reg_covar=reg_covar,
                     em_pass=device_em_pass(as_device_values(x, device)))


def as_device_values(x, device) -> torch.Tensor:
    """x as a flat float64 tensor on `device`."""
    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(x).reshape(-1)))
    return tensor.reshape(-1).to(device=device, dtype=torch.float64)


def posterior_on_device(gmm: GaussianMixture1D, x, component: int, device: str | torch.device) -> np.ndarray:
    """(n,) float64 p(component | x_i), as `gmm.posterior`, computed on `device`."""
    values = as_device_values(x, device)
    coef, prec, mu = (torch.as_tensor(a, dtype=torch.float64, device=values.device) for a in gmm.log_terms())
    out = torch.empty_like(values)
    for start in range(0, values.shape[0], BLOCK):
        d = values[start:start + BLOCK, None] - mu[None, :]
        out[start:start + BLOCK] = torch.softmax(coef - prec * d * d, dim=1)[:, component]
    return out.cpu().numpy()
