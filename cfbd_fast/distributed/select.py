"""Exact order statistics of values spread over ranks: the k-th smallest by radix selection over all-reduced
histograms (16 bits of an order-preserving integer key per round: 2 rounds for float32, 4 for float64), and
numpy's median and quantile rules built on it, so that a distributed run gets the very number numpy gets.

Each round sends one 65,536-bin int64 histogram (512 KiB) per rank; no value leaves its rank. A world of one
(one process alone) takes numpy's own functions, which give the same numbers.
"""
from __future__ import annotations

import math

import numpy as np

from .comm import Comm

DIGIT_BITS = 16
_BINS = 1 << DIGIT_BITS


def order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers that sort as the floats do (finite values; -0.0 just below 0.0)."""
    values = np.ascontiguousarray(values)
    if values.dtype == np.float32:
        u, top = values.view(np.uint32), np.uint32(1 << 31)
    elif values.dtype == np.float64:
        u, top = values.view(np.uint64), np.uint64(1 << 63)
    else:
        raise TypeError(f"order_keys takes float32 or float64 values, got {values.dtype}")
    return np.where(u & top, ~u, u | top)


def _from_key(key, dtype: np.dtype):
    if dtype == np.float32:
        u, top = np.uint32(key), np.uint32(1 << 31)
        return (np.where(u & top, u & ~top, ~u)).astype(np.uint32).view(np.float32)[()]
    u, top = np.uint64(key), np.uint64(1 << 63)
    return (np.where(u & top, u & ~top, ~u)).astype(np.uint64).view(np.float64)[()]


def count(comm: Comm, values: np.ndarray) -> int:
    if comm.world == 1:
        return len(values)
    return int(comm.sum(np.array([len(values)], dtype=np.int64), "count values")[0])


def kth_smallest(comm: Comm, values: np.ndarray, k: int, keys: np.ndarray | None = None):
    """The k-th smallest (0-based) of the values on all ranks; every rank passes its own (finite) values and
    the same k, and gets the same scalar of the values' dtype."""
    dtype = np.asarray(values).dtype
    keys = order_keys(values) if keys is None else keys
    bits = keys.dtype.itemsize * 8
    prefix = 0
    rank = int(k)
    for shift in range(bits - DIGIT_BITS, -1, -DIGIT_BITS):
        digits = ((keys >> keys.dtype.type(shift)) & keys.dtype.type(_BINS - 1)).astype(np.int64)
        hist = comm.sum(np.bincount(digits, minlength=_BINS).astype(np.int64), "order statistic histogram")
        cum = np.cumsum(hist)
        if rank >= cum[-1]:
            raise ValueError(f"kth_smallest: k={k} but only {int(cum[-1]) + (k - rank)} values")
        digit = int(np.searchsorted(cum, rank, side="right"))
        rank -= int(cum[digit - 1]) if digit else 0
        prefix |= digit << shift
        keys = keys[digits == digit]
    return _from_key(prefix, dtype)


def median(comm: Comm, values: np.ndarray):
    """np.median of the concatenated values (same dtype and rounding): the middle one, or the mean of the two."""
    values = np.ascontiguousarray(values)
    if comm.world == 1:
        return np.median(values) if len(values) else values.dtype.type(np.nan)
    keys = order_keys(values)
    n = count(comm, values)
    if n == 0:
        return values.dtype.type(np.nan)
    if n % 2:
        return kth_smallest(comm, values, n // 2, keys)
    pair = np.array([kth_smallest(comm, values, n // 2 - 1, keys), kth_smallest(comm, values, n // 2, keys)],
                    dtype=values.dtype)
    return np.mean(pair)


def quantile(comm: Comm, values: np.ndarray, q: float, method: str = "linear") -> float:
    """np.quantile(concatenated values, q, method) for method linear (numpy's default) or higher."""
    values = np.ascontiguousarray(values)
    if method not in ("linear", "higher"):
        raise ValueError(f"quantile method {method!r}: use linear or higher")
    if comm.world == 1:
        return float(np.quantile(values, q, method=method)) if len(values) else float("nan")
    keys = order_keys(values)
    n = count(comm, values)
    if n == 0:
        return float("nan")
    if method == "higher":
        return float(kth_smallest(comm, values, int(np.ceil((n - 1) * q)), keys))
    dt = values.dtype.type  # numpy: the index in float64, the weight and interpolation in the values' dtype
    virtual = (n - 1) * float(q)
    if virtual >= n - 1:
        return float(kth_smallest(comm, values, n - 1, keys))
    previous = math.floor(virtual)
    a = np.asarray(kth_smallest(comm, values, previous, keys), dtype=values.dtype)
    b = np.asarray(kth_smallest(comm, values, previous + 1, keys), dtype=values.dtype)
    gamma = virtual - previous  # a Python float, as numpy keeps it for a scalar q
    diff = b - a
    out = b - diff * dt(1 - gamma) if gamma >= 0.5 else a + diff * dt(gamma)  # numpy's _lerp
    return float(out)
