"""Consistency c = |s_g - s_o| of image/caption/generated-caption rows: Triton kernel, launcher, CPU path and torch
reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (NAN, check_triton_inputs, kernel_block_rows, numba_rows, row_sums, run_blocks,
                      streaming_config, tile_rows, tile_sums, tile_valid, valid_sumsq)
from .invalid_rows import invalid_rows_ref


@triton.jit
def _consistency_kernel(image_ptr, text_ptr, generated_ptr, c_ptr, s_o_ptr, s_g_ptr,
                        n_rows, dim, stride_image, stride_text, stride_generated,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # One pass over BLOCK_M rows of the three matrices: three squared norms and two dots.
    rows, row_in = tile_rows(n_rows, BLOCK_M)
    ii, tt, gg, it, ig = tile_sums(image_ptr, stride_image, text_ptr, stride_text, generated_ptr, stride_generated,
                                   rows, row_in, dim, BLOCK_M, BLOCK_D, True, False, True)
    valid = tile_valid(ii) & tile_valid(tt) & tile_valid(gg)
    norm_i = tl.sqrt(ii)
    s_o = tl.maximum(it / norm_i / tl.sqrt(tt), 0.0)
    s_g = tl.maximum(ig / norm_i / tl.sqrt(gg), 0.0)
    c = tl.abs(s_g - s_o)
    nan = float("nan")
    tl.store(c_ptr + rows, tl.where(valid, c, nan), mask=row_in)
    tl.store(s_o_ptr + rows, tl.where(valid, s_o, nan), mask=row_in)
    tl.store(s_g_ptr + rows, tl.where(valid, s_g, nan), mask=row_in)


def consistency_triton(image: torch.Tensor, text: torch.Tensor, generated: torch.Tensor):
    """Launch the Triton kernel on (N, D) fp16/bf16/fp32 tensors with unit column stride; returns (c, s_o, s_g)."""
    named = {"image": image, "text": text, "generated": generated}
    check_triton_inputs(named, _consistency_kernel)
    n_rows, dim = image.shape
    c, s_o, s_g = (torch.empty(n_rows, dtype=torch.float32, device=image.device) for _ in range(3))
    if n_rows:
        config = streaming_config(dim)
        _consistency_kernel[(triton.cdiv(n_rows, config["BLOCK_M"]),)](
            image, text, generated, c, s_o, s_g, n_rows, dim,
            image.stride(0), text.stride(0), generated.stride(0), **config)
    return c, s_o, s_g


def consistency_cpu(image: torch.Tensor, text: torch.Tensor, generated: torch.Tensor):
    """(c, s_o, s_g) float32 for CPU tensors of any supported dtype and strides: the Triton kernel's arithmetic, one
    pass over each block of rows by the numba `row_sums` kernel."""
    n_rows = image.shape[0]
    sums = torch.empty(5, n_rows, dtype=torch.float32)
    c, s_o, s_g = (torch.empty(n_rows, dtype=torch.float32) for _ in range(3))

    def work(rows: slice) -> None:
        row_sums(numba_rows(image[rows]), numba_rows(text[rows]), numba_rows(generated[rows]), None,
                 sums[:, rows].numpy())
        ii, tt, gg, it, ig = sums[:, rows]
        invalid = ~(valid_sumsq(ii) & valid_sumsq(tt) & valid_sumsq(gg))
        norm_i = ii.sqrt()
        cos_o = it.div(norm_i).div_(tt.sqrt()).clamp_min_(0).masked_fill_(invalid, NAN)
        cos_g = ig.div(norm_i).div_(gg.sqrt()).clamp_min_(0).masked_fill_(invalid, NAN)
        s_o[rows], s_g[rows] = cos_o, cos_g
        torch.sub(cos_g, cos_o, out=c[rows]).abs_()

    run_blocks(n_rows, kernel_block_rows(n_rows), work)
    return c, s_o, s_g


def consistency_ref(image: torch.Tensor, text: torch.Tensor, generated: torch.Tensor):
    """Plain torch reference in float32: rectified cosines s_o, s_g and c = |s_g - s_o|, NaN for invalid rows."""
    i, t, g = image.float(), text.float(), generated.float()
    s_o = ((i * t).sum(1) / (i.norm(dim=1) * t.norm(dim=1))).clamp_min(0)
    s_g = ((i * g).sum(1) / (i.norm(dim=1) * g.norm(dim=1))).clamp_min(0)
    invalid = invalid_rows_ref(image) | invalid_rows_ref(text) | invalid_rows_ref(generated)
    s_o, s_g = s_o.masked_fill(invalid, NAN), s_g.masked_fill(invalid, NAN)
    return (s_g - s_o).abs(), s_o, s_g
