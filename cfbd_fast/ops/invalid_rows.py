"""Invalid-row mask (zero norm or any NaN/inf): Triton kernel, launcher, CPU path and torch reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (check_triton_inputs, kernel_block_rows, numba_rows, row_sums, run_blocks, streaming_config,
                      tile_rows, tile_sums, tile_valid, valid_sumsq)


@triton.jit
def _invalid_rows_kernel(x_ptr, invalid_ptr, n_rows, dim, stride_x, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_in = tile_rows(n_rows, BLOCK_M)
    sumsq, _, _, _, _ = tile_sums(x_ptr, stride_x, x_ptr, 0, x_ptr, 0, rows, row_in, dim, BLOCK_M, BLOCK_D,
                                  False, False, False)
    tl.store(invalid_ptr + rows, tl.where(tile_valid(sumsq), 0, 1).to(tl.int8), mask=row_in)


def invalid_rows_triton(x: torch.Tensor) -> torch.Tensor:
    """Launch the Triton kernel on an (N, D) fp16/bf16/fp32 tensor with unit column stride; True = invalid row."""
    check_triton_inputs({"x": x}, _invalid_rows_kernel)
    n_rows, dim = x.shape
    invalid = torch.empty(n_rows, dtype=torch.int8, device=x.device)
    if n_rows:
        config = streaming_config(dim)
        _invalid_rows_kernel[(triton.cdiv(n_rows, config["BLOCK_M"]),)](x, invalid, n_rows, dim, x.stride(0),
                                                                         **config)
    return invalid.view(torch.bool)


def invalid_rows_cpu(x: torch.Tensor) -> torch.Tensor:
    """True where a row's float32 squared norm is zero or not finite (a zero row, or one holding NaN/inf)."""
    n_rows = x.shape[0]
    sums = torch.empty(5, n_rows, dtype=torch.float32)

    def work(rows: slice) -> None:
        row_sums(numba_rows(x[rows]), None, None, None, sums[:, rows].numpy())

    run_blocks(n_rows, kernel_block_rows(n_rows), work)
    return ~valid_sumsq(sums[0])


def invalid_rows_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain torch reference, the literal definition: True where a row is all zeros or holds a NaN or inf."""
    return ~torch.isfinite(x).all(dim=1) | (x == 0).all(dim=1)
