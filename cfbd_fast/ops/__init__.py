"""Fused embedding kernels: consistency, seed-set correlation and the invalid-row mask, dispatched on the inputs' device.

Each op accepts numpy arrays (float32, float16, ml_dtypes.bfloat16; read-only memmaps are read in place) or torch
tensors, and returns float32 of the same kind (numpy in -> numpy out; torch in -> torch on the input's device).
CUDA tensors run the Triton kernels, CPU inputs the blocked CPU path; CFBD_FAST_IMPL=triton|cpu|ref forces one and
raises instead of falling back (under TRITON_INTERPRET=1, `triton` runs the kernels interpreted on CPU tensors).
"""
from __future__ import annotations

from ..errors import InputError
from ._common import as_tensor, choose_impl, returns_numpy, same_rows, to_output
from .consistency import consistency_cpu, consistency_ref, consistency_triton
from .invalid_rows import invalid_rows_cpu, invalid_rows_ref, invalid_rows_triton
from .seed_correlation import check_reduction, seed_correlation_cpu, seed_correlation_ref, seed_correlation_triton

__all__ = ["as_tensor", "consistency", "invalid_rows", "seed_correlation"]

_CONSISTENCY = {"triton": consistency_triton, "cpu": consistency_cpu, "ref": consistency_ref}
_INVALID_ROWS = {"triton": invalid_rows_triton, "cpu": invalid_rows_cpu, "ref": invalid_rows_ref}
_SEED_CORRELATION = {"triton": seed_correlation_triton, "cpu": seed_correlation_cpu, "ref": seed_correlation_ref}


def consistency(image, text, generated):
    """Rectified cosines and their gap for every row: returns float32 `(c, s_o, s_g)`, each of shape (N,).

    `s_o = max(cos(image, text), 0)`, `s_g = max(cos(image, generated), 0)`, `c = |s_g - s_o|`, norms and dots
    accumulated in float32 in one pass over (N, D) fp16/bf16/fp32 inputs, normalised or not. A row that is invalid
    (see `invalid_rows`) in any of the three inputs gives NaN in all three outputs, never a number that looks valid.
    """
    tensors = {name: as_tensor(x, name) for name, x in
               (("image", image), ("text", text), ("generated", generated))}
    same_rows(tensors)
    impl = choose_impl(tensors["image"].device)
    as_numpy = returns_numpy(image, text, generated)
    return tuple(to_output(out, as_numpy) for out in _CONSISTENCY[impl](*tensors.values()))


def invalid_rows(x):
    """Mask of invalid rows: bool (N,), True where a row has zero norm or holds any NaN or inf.

    These are the rows whose cosines `consistency` and `seed_correlation` report as NaN. The kernels test the
    row's float32 squared norm for being zero or non-finite, so a float32/bfloat16 row whose squared norm under-
    or overflows float32 (all |x| below about 1e-19, or some |x| above about 1e19) is reported invalid as well.
    """
    tensor = as_tensor(x, "x")
    return to_output(_INVALID_ROWS[choose_impl(tensor.device)](tensor), returns_numpy(x))


def seed_correlation(text, seeds, reduce: str = "mean", topk: int | None = None, *, check_seeds: bool = True):
    """Correlation of every caption with a seed set: float32 z of shape (N,).

    `text` is (N, D), `seeds` is (q, D) with q small; both fp16/bf16/fp32. `reduce="mean"` gives the mean cosine with
    the seeds (computed as the dot with the mean of the unit seeds over the row norm: equal to the N x q average),
    `"max"` the largest cosine and `"topk"` the mean of the `topk` largest. Invalid rows of `text` give NaN; an invalid
    seed row raises. The Triton path rounds the seeds to the text's dtype for max/topk. `check_seeds=False` skips
    that check (and the device synchronisation it costs), for callers that checked the seeds once with
    `invalid_rows` before calling per chunk.
    """
    text_tensor = as_tensor(text, "text")
    seeds_tensor = as_tensor(seeds, "seeds").to(text_tensor.device)
    if seeds_tensor.shape[1] != text_tensor.shape[1] or seeds_tensor.shape[0] == 0:
        raise InputError(f"seeds must be (q >= 1, {text_tensor.shape[1]}) to match text, got "
                         f"{tuple(seeds_tensor.shape)}")
    check_reduction(reduce, topk, seeds_tensor.shape[0])
    bad_seeds = int(invalid_rows_ref(seeds_tensor).sum()) if check_seeds else 0
    if bad_seeds:
        raise InputError(f"{bad_seeds} of {seeds_tensor.shape[0]} seed rows have zero norm or NaN/inf; drop them "
                         "(cfbd_fast.ops.invalid_rows(seeds) marks them)")
    impl = choose_impl(text_tensor.device)
    z = _SEED_CORRELATION[impl](text_tensor, seeds_tensor, reduce, topk)
    return to_output(z, returns_numpy(text))
