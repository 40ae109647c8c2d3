"""Shared by the op files: input conversion and checks, the choice of implementation, the Triton row-tile helpers,
and the CPU path: its numba row-sum kernel (the CPU twin of `tile_sums`) and its row blocks over threads."""
from __future__ import annotations

import math
import os
import platform
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
import triton
import triton.language as tl
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ..errors import CfbdError, InputError

IMPL_ENV = "CFBD_FAST_IMPL"
IMPLS = ("triton", "cpu", "ref")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INF = float("inf")
NAN = float("nan")


# -- inputs and outputs ----------------------------------------------------------------------------------------------
def as_tensor(x, name: str) -> torch.Tensor:
    """A 2-D fp16/bf16/fp32 tensor viewing `x` without a copy (numpy arrays, read-only memmaps included)."""
    if isinstance(x, torch.Tensor):
        tensor = x
    elif isinstance(x, np.ndarray):
        tensor = _from_numpy(x, name)
    else:
        raise InputError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")
    if tensor.ndim != 2:
        raise InputError(f"{name}: expected a 2-D (rows, dim) matrix, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{name}: dtype {tensor.dtype} is not supported; convert to float32, float16 or bfloat16")
    return tensor


def _from_numpy(array: np.ndarray, name: str) -> torch.Tensor:
    bfloat16 = array.dtype.name == "bfloat16"  # ml_dtypes.bfloat16: torch shares the bits through a uint16 view
    if not bfloat16 and array.dtype not in (np.float16, np.float32):
        raise InputError(f"{name}: dtype {array.dtype} is not supported; convert to float32, float16 or bfloat16")
    source = array.view(np.uint16) if bfloat16 else array
    try:
        with warnings.catch_warnings():
            # Read-only arrays (memory-mapped stores) are shared, not copied; the ops never write to their inputs.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(source)
    except ValueError as exc:  # negative strides
        raise InputError(f"{name}: {exc}; pass np.ascontiguousarray({name})") from None
    return tensor.view(torch.bfloat16) if bfloat16 else tensor


def same_rows(named: dict[str, torch.Tensor]) -> None:
    """All matrices share one shape and one device."""
    (first, ref), *rest = named.items()
    for name, tensor in rest:
        if tensor.shape != ref.shape:
            raise InputError(f"{name} has shape {tuple(tensor.shape)} but {first} has {tuple(ref.shape)}; "
                             "pass matching (rows, dim) matrices")
        if tensor.device != ref.device:
            raise InputError(f"{name} is on {tensor.device} but {first} is on {ref.device}; move them to one device")


def returns_numpy(*inputs) -> bool:
    """Results are numpy arrays when every input was a numpy array, torch tensors otherwise."""
    return all(isinstance(x, np.ndarray) for x in inputs)


def to_output(tensor: torch.Tensor, as_numpy: bool):
    return tensor.cpu().numpy() if as_numpy else tensor


def choose_impl(device: torch.device) -> str:
    """`triton` for CUDA tensors, `cpu` for CPU tensors, `ref` elsewhere; CFBD_FAST_IMPL forces one."""
    forced = os.environ.get(IMPL_ENV, "").strip().lower()
    if forced in ("", "auto"):
        if device.type == "cuda":
            return "triton"
        return "cpu" if device.type == "cpu" else "ref"
    if forced not in IMPLS:
        raise InputError(f"{IMPL_ENV}={forced!r} is not one of {', '.join(IMPLS)}; unset it to choose by device")
    if forced == "cpu" and device.type != "cpu":
        raise CfbdError(f"{IMPL_ENV}=cpu but the inputs are on {device}; move them with .cpu() or unset {IMPL_ENV}")
    return forced


# -- Triton: launcher checks, tile choice and the row-tile helpers the kernels share ---------------------------------
def check_triton_inputs(named: dict[str, torch.Tensor], kernel) -> None:
    """Launcher checks: a device the kernel can run on, supported dtypes, unit column stride, matching shapes."""
    interpreted = kernel_interpreted(kernel)
    for name, tensor in named.items():
        if tensor.device.type != "cuda" and not interpreted:
            raise CfbdError(f"the Triton kernels need CUDA tensors but {name} is on {tensor.device}; move the inputs "
                            f"with .cuda(), run with TRITON_INTERPRET=1, or unset {IMPL_ENV}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"{name}: dtype {tensor.dtype} is not supported; convert to float32, float16 or bfloat16")
        if tensor.ndim != 2 or tensor.stride(1) != 1:
            raise InputError(f"{name}: rows must be 2-D with contiguous columns (stride {tuple(tensor.stride())}); "
                             "call .contiguous()")
    same_rows(named)


def kernel_interpreted(kernel) -> bool:
    """True when the kernel was decorated under TRITON_INTERPRET=1 and so runs on CPU tensors, interpreted."""
    from triton.runtime.jit import JITFunction

    return not isinstance(kernel, JITFunction)


def streaming_config(dim: int) -> dict:
    """Tile of the row-streaming kernels: BLOCK_D columns per step (power of two, at most 128), 2048 elements a tile."""
    block_d = min(1 << max(dim - 1, 0).bit_length(), 128)
    return {"BLOCK_M": max(1, 2048 // block_d), "BLOCK_D": block_d, "num_warps": 4}


@triton.jit
def tile_rows(n_rows, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M rows as int64 (row * stride cannot overflow) and which of them lie in the matrix."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    return rows.to(tl.int64), row_in


@triton.jit
def tile_sums(x_ptr, stride_x, y_ptr, stride_y, w_ptr, stride_w, rows, row_in, dim,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              Y_ROWS: tl.constexpr, Y_VECTOR: tl.constexpr, W_ROWS: tl.constexpr):
    """One pass over the columns of a row tile, float32 accumulators: returns (x.x, y.y, w.w, x.y, x.w) per row.

    `x` is an (N, D) matrix. With Y_ROWS, `y` is a second (N, D) matrix; with Y_VECTOR, `y` is one float32 (D,)
    vector dotted with every row (y.y is then not computed); with W_ROWS, `w` is a third (N, D) matrix. Sums that
    were not asked for come back as zeros (and cost nothing: the branches are resolved at compile time).
    """
    xx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    yy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ww = tl.zeros((BLOCK_M,), dtype=tl.float32)
    xy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    xw = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_in = cols < dim
        mask = row_in[:, None] & col_in[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xx += tl.sum(x * x, axis=1)
        if Y_ROWS:
            y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            yy += tl.sum(y * y, axis=1)
            xy += tl.sum(x * y, axis=1)
        if Y_VECTOR:
            v = tl.load(y_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
            xy += tl.sum(x * v[None, :], axis=1)
        if W_ROWS:
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            ww += tl.sum(w * w, axis=1)
            xw += tl.sum(x * w, axis=1)
    return xx, yy, ww, xy, xw


@triton.jit
def tile_valid(sumsq):
    """A valid row: float32 squared norm neither zero (a zero row) nor NaN/inf (a NaN or inf anywhere in the row)."""
    return (sumsq > 0) & (sumsq < float("inf"))


# -- CPU path: a fused numba kernel over row blocks, one block per thread -------------------------------------------
_THREADS_LOCK = threading.Lock()  # one call at a time changes torch's thread count
# Reassociation lets LLVM vectorise the sums (8 float32 lanes); NaN and inf still propagate into them.
_FAST = {"reassoc", "contract"}


def _native_half_conversion() -> bool:
    """Whether numba's target converts float16 in hardware (x86 F16C; every aarch64). Without it LLVM lowers the
    conversion to a helper call that numba does not link (the process would crash), so float16 blocks are then
    widened by torch first."""
    import llvmlite.binding as llvm
    from numba.core import config

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    if config.CPU_NAME:  # a target chosen by the user (NUMBA_CPU_NAME): only its listed features count
        return "+f16c" in (config.CPU_FEATURES or "")
    return "+f16c" in llvm.get_host_cpu_features().flatten()


NATIVE_HALF = _native_half_conversion()


@intrinsic
def _half_bits_to_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _bfloat16_bits_to_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.int16), codegen


def _widen(value):
    """An element as float32: float32 as is, float16 bits (uint16) and bfloat16 bits (int16) converted exactly."""


@overload(_widen, inline="always")
def _widen_overload(value):
    if value == types.float32:
        return lambda value: value
    if value == types.uint16:
        return lambda value: _half_bits_to_float32(value)
    if value == types.int16:
        return lambda value: _bfloat16_bits_to_float32(value)
    return None


@njit(nogil=True, cache=True, fastmath=_FAST)
def row_sums(x, y, w, v, out):
    """The CPU twin of `tile_sums`: one pass over each row, float32 accumulators; writes x.x, y.y, w.w, x.y, x.w
    into rows 0-4 of `out` (5, N).

    `x`, `y`, `w` are (N, D) arrays (see `numba_rows`), `v` a float32 (D,) vector dotted with every row of x (into
    row 3, in place of x.y); pass None for what is not wanted (numba prunes those branches) and leave those rows of
    `out` unread.
    """
    for r in range(x.shape[0]):
        xx = yy = ww = xy = xw = np.float32(0.0)
        for j in range(x.shape[1]):
            a = _widen(x[r, j])
            xx += a * a
            if y is not None:
                b = _widen(y[r, j])
                yy += b * b
                xy += a * b
            if v is not None:
                xy += a * v[j]
            if w is not None:
                c = _widen(w[r, j])
                ww += c * c
                xw += a * c
        out[0, r] = xx
        out[1, r] = yy
        out[2, r] = ww
        out[3, r] = xy
        out[4, r] = xw


def numba_rows(block: torch.Tensor) -> np.ndarray:
    """A CPU block as the numpy array `row_sums` reads: float32 as is, float16 as its bits in uint16 (widened to
    float32 by torch first where the CPU has no half conversion), bfloat16 as its bits in int16. No copy otherwise."""
    block = block.detach()
    if block.dtype == torch.float16:
        return block.view(torch.int16).numpy().view(np.uint16) if NATIVE_HALF else block.float().numpy()
    if block.dtype == torch.bfloat16:
        return block.view(torch.int16).numpy()
    return block.numpy()


def kernel_block_rows(n_rows: int) -> int:
    """Rows per call of `row_sums`: four blocks per thread (even load on a shared machine), at least 1024 rows per
    call (a call costs ~10 us); one call for everything on one thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        return max(1, n_rows)
    return max(1024, math.ceil(n_rows / (4 * threads)))


def block_rows(dim: int, matrices: int = 1) -> int:
    """Rows per block of the CPU paths that run torch ops per block (seed max/top-k): about 3 MiB of float32 per
    block of all matrices, a multiple of 16 and at least 16 rows.

    Measured on 1M x 512 fp16 consistency with torch ops (2 cores): 1.5 MiB blocks 1.07 s, 3 MiB 0.61 s, 12 MiB
    0.63 s; below 3 MiB the per-op overhead of torch dominates, above it the block no longer stays in cache.
    """
    return max(16, (3 << 20) // (4 * dim * matrices) // 16 * 16)


def run_blocks(n_rows: int, step: int, work: Callable[[slice], None]) -> None:
    """Call `work(rows)` on every block of `step` rows, spread over torch.get_num_threads() threads.

    Each worker runs a numba kernel (GIL released) or single-threaded torch ops on whole blocks: no thread barrier
    per op, which keeps the path fast on a loaded machine. torch's intra-op thread count is 1 during the call
    (restored after) and the workers number what it was, so `torch.set_num_threads` still bounds the threads used.
    """
    blocks = [slice(start, start + step) for start in range(0, n_rows, step)]
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        if threads == 1 or len(blocks) < 2:
            for rows in blocks:
                work(rows)
            return
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(threads, len(blocks))) as pool:
                list(pool.map(work, blocks))  # re-raises a worker's exception here
        finally:
            torch.set_num_threads(threads)


def valid_sumsq(sumsq: torch.Tensor) -> torch.Tensor:
    """The CPU path's `tile_valid`: True where a row's float32 squared norm is neither zero nor NaN/inf."""
    return (sumsq > 0) & (sumsq < INF)
