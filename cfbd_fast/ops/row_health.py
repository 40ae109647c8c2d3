"""Invalid-row mask (zero norm or any NaN/inf): Triton kernel, launcher and torch reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_triton_inputs, streaming_config


@triton.jit
def _row_health_kernel(x_ptr, invalid_ptr, n_rows, dim, stride_x, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    rows = rows.to(tl.int64)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_in[:, None] & (cols < dim)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    # NaN anywhere makes the sum NaN, inf makes it inf; both fail this test, as does a zero row.
    valid = (sumsq > 0) & (sumsq < float("inf"))
    tl.store(invalid_ptr + rows, tl.where(valid, 0, 1).to(tl.int8), mask=row_in)


def row_health_triton(x: torch.Tensor) -> torch.Tensor:
    """Launch the Triton kernel on an (N, D) fp16/bf16/fp32 tensor with unit column stride; True = invalid row."""
    check_triton_inputs({"x": x}, _row_health_kernel)
    n_rows, dim = x.shape
    invalid = torch.empty(n_rows, dtype=torch.int8, device=x.device)
    if n_rows:
        config = streaming_config(dim)
        _row_health_kernel[(triton.cdiv(n_rows, config["BLOCK_M"]),)](x, invalid, n_rows, dim, x.stride(0), **config)
    return invalid.view(torch.bool)


def row_health_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain torch reference, the literal definition: True where a row is all zeros or holds a NaN or inf."""
    return ~torch.isfinite(x).all(dim=1) | (x == 0).all(dim=1)
