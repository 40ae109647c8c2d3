"""Input handling shared by the ops: numpy/torch in, float32 out of the same kind, and the choice of implementation."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from ..errors import CfbdError, InputError

IMPL_ENV = "CFBD_FAST_IMPL"
IMPLS = ("triton", "cpu", "ref")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
