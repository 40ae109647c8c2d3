"""Correlation z of each caption with a seed set (mean, max or top-k mean cosine): Triton kernels, launcher, CPU path
and torch reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from ._common import (NAN, block_rows, check_triton_inputs, kernel_block_rows, kernel_interpreted, numba_rows,
                      row_sums, run_blocks, streaming_config, tile_rows, tile_sums, tile_valid, valid_sumsq)
from .invalid_rows import invalid_rows_ref

REDUCTIONS = ("mean", "max", "topk")


@triton.jit
def _seed_mean_kernel(text_ptr, mean_seed_ptr, z_ptr, n_rows, dim, stride_text,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # mean_j cos(t, s_j) = (t . mean_j(s_j / |s_j|)) / |t|: one streaming dot per row.
    rows, row_in = tile_rows(n_rows, BLOCK_M)
    sumsq, _, _, dot, _ = tile_sums(text_ptr, stride_text, mean_seed_ptr, 0, text_ptr, 0, rows, row_in, dim,
                                    BLOCK_M, BLOCK_D, False, True, False)
    tl.store(z_ptr + rows, tl.where(tile_valid(sumsq), dot / tl.sqrt(sumsq), float("nan")), mask=row_in)


@triton.jit
def _seed_topk_kernel(text_ptr, seeds_ptr, inv_seed_norm_ptr, z_ptr, n_rows, n_seeds, dim, topk, merge_steps,
                      stride_text, stride_seeds,
                      BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, TOPK_PAD: tl.constexpr,
                      TAKE_MAX: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    # Tiled N x q: a (BLOCK_M, BLOCK_Q) tile of dots per seed tile, reduced on the fly to the row's max or its
    # topk best.
    rows, row_in = tile_rows(n_rows, BLOCK_M)
    sumsq, _, _, _, _ = tile_sums(text_ptr, stride_text, text_ptr, 0, text_ptr, 0, rows, row_in, dim, BLOCK_M, BLOCK_D,
                                  False, False, False)

    best_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    # Top-k slots: slots >= topk hold +inf so they are never the minimum and never replaced.
    slots = tl.arange(0, TOPK_PAD)
    best = tl.where(slots[None, :] < topk, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, TOPK_PAD),
                                                                                  dtype=tl.float32)
    for q0 in range(0, n_seeds, BLOCK_Q):
        seed_idx = q0 + tl.arange(0, BLOCK_Q)
        seed_in = seed_idx < n_seeds
        acc = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_in = cols < dim
            t = tl.load(text_ptr + rows[:, None] * stride_text + cols[None, :],
                        mask=row_in[:, None] & col_in[None, :], other=0.0)
            s = tl.load(seeds_ptr + seed_idx.to(tl.int64)[:, None] * stride_seeds + cols[None, :],
                        mask=seed_in[:, None] & col_in[None, :], other=0.0)
            if DOT_IN_FP32:
                t = t.to(tl.float32)
                s = s.to(tl.float32)
            acc = tl.dot(t, tl.trans(s), acc, input_precision="ieee")
        inv_norm = tl.load(inv_seed_norm_ptr + seed_idx, mask=seed_in, other=0.0)
        # Cosine times |t| (a positive row factor that leaves the order unchanged); padded seeds never win, and
        # NaN (from a NaN/inf caption, reported as NaN below) is ordered like -inf.
        cand = acc * inv_norm[None, :]
        cand = tl.where(seed_in[None, :] & (cand == cand), cand, float("-inf"))
        if TAKE_MAX:
            best_max = tl.maximum(best_max, tl.max(cand, axis=1))
        else:
            local = tl.arange(0, BLOCK_Q)
            for _merge in range(merge_steps):
                top = tl.max(cand, axis=1)
                top_at = tl.argmax(cand, axis=1)
                low = tl.min(best, axis=1)
                low_at = tl.argmin(best, axis=1)
                take = top > low
                best = tl.where(take[:, None] & (slots[None, :] == low_at[:, None]), top[:, None], best)
                cand = tl.where(take[:, None] & (local[None, :] == top_at[:, None]), float("-inf"), cand)

    if TAKE_MAX:
        total = best_max
    else:
        total = tl.sum(tl.where(slots[None, :] < topk, best, 0.0), axis=1) / topk
    tl.store(z_ptr + rows, tl.where(tile_valid(sumsq), total / tl.sqrt(sumsq), float("nan")), mask=row_in)


def check_reduction(reduce: str, topk: int | None, n_seeds: int) -> None:
    """`reduce` is one of REDUCTIONS; `topk` is given, within 1..n_seeds, exactly when reduce is "topk"."""
    if reduce not in REDUCTIONS:
        raise InputError(f"reduce={reduce!r} is not one of {', '.join(REDUCTIONS)}")
    if reduce == "topk":
        if topk is None or not 1 <= topk <= n_seeds:
            raise InputError(f"reduce='topk' needs 1 <= topk <= {n_seeds} (the number of seeds), got topk={topk}")
    elif topk is not None:
        raise InputError(f"topk is only used with reduce='topk', not reduce={reduce!r}; drop topk")


def mean_unit_seed(seeds: torch.Tensor) -> torch.Tensor:
    """mean_j s_j / |s_j| in float64, returned as float32 (D,)."""
    unit = seeds.double()
    unit = unit / unit.norm(dim=1, keepdim=True)
    return unit.mean(dim=0).float()


def inverse_seed_norms(seeds: torch.Tensor) -> torch.Tensor:
    """1 / |s_j| in float64, returned as float32 (q,)."""
    return (1.0 / seeds.double().norm(dim=1)).float()


def seed_correlation_triton(text: torch.Tensor, seeds: torch.Tensor, reduce: str = "mean",
                            topk: int | None = None) -> torch.Tensor:
    """Launch the Triton kernels: `text` (N, D) fp16/bf16/fp32 with unit column stride, `seeds` (q, D) valid rows."""
    check_triton_inputs({"text": text}, _seed_mean_kernel)
    if seeds.ndim != 2 or seeds.shape[1] != text.shape[1] or seeds.shape[0] == 0:
        raise InputError(f"seeds must be (q >= 1, {text.shape[1]}), got {tuple(seeds.shape)}")
    n_seeds = seeds.shape[0]
    check_reduction(reduce, topk, n_seeds)
    n_rows, dim = text.shape
    z = torch.empty(n_rows, dtype=torch.float32, device=text.device)
    if not n_rows:
        return z
    seeds = seeds.to(text.device)
    if reduce == "mean":
        config = streaming_config(dim)
        _seed_mean_kernel[(triton.cdiv(n_rows, config["BLOCK_M"]),)](
            text, mean_unit_seed(seeds), z, n_rows, dim, text.stride(0), **config)
        return z
    take_max = reduce == "max"
    topk = 1 if take_max else topk
    seeds_in_dtype = seeds.to(text.dtype).contiguous()  # raw seeds: fp16/bf16 products are exact in fp32
    config = tiled_config(n_seeds, topk, take_max,
                          dot_in_fp32=kernel_interpreted(_seed_topk_kernel) and text.dtype == torch.bfloat16)
    _seed_topk_kernel[(triton.cdiv(n_rows, config["BLOCK_M"]),)](
        text, seeds_in_dtype, inverse_seed_norms(seeds), z, n_rows, n_seeds, dim, topk, min(topk, config["BLOCK_Q"]),
        text.stride(0), seeds_in_dtype.stride(0), **config)
    return z


def tiled_config(n_seeds: int, topk: int, take_max: bool, dot_in_fp32: bool = False) -> dict:
    """Tile sizes and switches of `_seed_topk_kernel` (tl.dot needs every tile side >= 16)."""
    return {"BLOCK_M": 64, "BLOCK_Q": max(16, min(64, triton.next_power_of_2(n_seeds))), "BLOCK_D": 32,
            "TOPK_PAD": triton.next_power_of_2(topk), "TAKE_MAX": take_max, "DOT_IN_FP32": dot_in_fp32,
            "num_warps": 4}


def seed_correlation_cpu(text: torch.Tensor, seeds: torch.Tensor, reduce: str = "mean",
                         topk: int | None = None) -> torch.Tensor:
    """z float32 (N,): mean through the mean unit seed, one numba `row_sums` pass; max/top-k through a (block, q)
    float32 matmul per block."""
    n_rows, dim = text.shape
    z = torch.empty(n_rows, dtype=torch.float32)
    if reduce == "mean":
        mean_seed = mean_unit_seed(seeds).numpy()
        sums = torch.empty(5, n_rows, dtype=torch.float32)

        def work(rows: slice) -> None:
            row_sums(numba_rows(text[rows]), None, None, mean_seed, sums[:, rows].numpy())
            sumsq, dot = sums[0, rows], sums[3, rows]
            z[rows] = dot.div(sumsq.sqrt()).masked_fill_(~valid_sumsq(sumsq), NAN)

        run_blocks(n_rows, kernel_block_rows(n_rows), work)
        return z
    seeds_t = seeds.float().T.contiguous()
    inv_norm = inverse_seed_norms(seeds)

    def work(rows: slice) -> None:
        t = text[rows].float()
        sumsq = torch.linalg.vecdot(t, t)
        scores = (t @ seeds_t).mul_(inv_norm)
        total = scores.amax(dim=1) if reduce == "max" else scores.topk(topk, dim=1).values.mean(dim=1)
        z[rows] = total.div_(sumsq.sqrt()).masked_fill_(~valid_sumsq(sumsq), NAN)

    run_blocks(n_rows, block_rows(dim), work)
    return z


def seed_correlation_ref(text: torch.Tensor, seeds: torch.Tensor, reduce: str = "mean",
                         topk: int | None = None) -> torch.Tensor:
    """Plain torch reference, the literal N x q definition in float32: cosine of every row with every seed, reduced."""
    check_reduction(reduce, topk, seeds.shape[0])
    t = text.float()
    s = seeds.to(text.device).float()
    cos = (t @ s.T) / t.norm(dim=1, keepdim=True) / s.norm(dim=1)
    if reduce == "mean":
        z = cos.mean(dim=1)
    elif reduce == "max":
        z = cos.max(dim=1).values
    else:
        z = cos.topk(topk, dim=1).values.mean(dim=1)
    return z.masked_fill(invalid_rows_ref(text), NAN)
