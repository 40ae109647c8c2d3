"""Consistency c = |s_g - s_o| of image/caption/generated-caption rows: Triton kernel, launcher and torch reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_triton_inputs, streaming_config
from .row_health import row_health_ref


@triton.jit
def _consistency_kernel(image_ptr, text_ptr, generated_ptr, c_ptr, s_o_ptr, s_g_ptr,
                        n_rows, dim, stride_image, stride_text, stride_generated,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # One pass over BLOCK_M rows of the three matrices: three squared norms and two dots, fp32 accumulators.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    rows = rows.to(tl.int64)
    ii = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    it = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ig = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_in[:, None] & (cols < dim)[None, :]
        x = tl.load(image_ptr + rows[:, None] * stride_image + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(text_ptr + rows[:, None] * stride_text + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(generated_ptr + rows[:, None] * stride_generated + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        ii += tl.sum(x * x, axis=1)
        tt += tl.sum(y * y, axis=1)
        gg += tl.sum(z * z, axis=1)
        it += tl.sum(x * y, axis=1)
        ig += tl.sum(x * z, axis=1)
    # A squared norm that is zero, NaN or inf marks a zero row or one holding NaN/inf.
    valid = (ii > 0) & (ii < float("inf")) & (tt > 0) & (tt < float("inf")) & (gg > 0) & (gg < float("inf"))
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


def consistency_ref(image: torch.Tensor, text: torch.Tensor, generated: torch.Tensor):
    """Plain torch reference in float32: rectified cosines s_o, s_g and c = |s_g - s_o|, NaN for invalid rows."""
    i, t, g = image.float(), text.float(), generated.float()
    s_o = ((i * t).sum(1) / (i.norm(dim=1) * t.norm(dim=1))).clamp_min(0)
    s_g = ((i * g).sum(1) / (i.norm(dim=1) * g.norm(dim=1))).clamp_min(0)
    invalid = row_health_ref(image) | row_health_ref(text) | row_health_ref(generated)
    s_o, s_g = s_o.masked_fill(invalid, float("nan")), s_g.masked_fill(invalid, float("nan"))
    return (s_g - s_o).abs(), s_o, s_g
