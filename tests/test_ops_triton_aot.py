"""Ahead-of-time compilation of every Triton kernel to sm_80 and sm_90 cubins, for each dtype, without a GPU.

Every `_*_kernel` in cfbd_fast.ops must have a variant here: a new kernel without one fails the coverage test.

The compiler runs in a child process started without TRITON_INTERPRET: with it set when triton is imported,
triton's own library functions (tl.sum, tl.max, ...) become interpreter objects and nothing can be compiled.
"""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from cfbd_fast.ops._common import streaming_config
from cfbd_fast.ops.seed_correlation import tiled_config

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
DIMS = (64, 1024)  # smallest and largest tile the launchers pick
REPO = Path(__file__).resolve().parents[1]


def _variants() -> dict[str, tuple[str, dict, dict]]:
    """name -> (kernel name, signature with {dt} for the input dtype, launch config)."""
    streaming = {
        "_consistency_kernel": {
            "image_ptr": "*{dt}", "text_ptr": "*{dt}", "generated_ptr": "*{dt}",
            "c_ptr": "*fp32", "s_o_ptr": "*fp32", "s_g_ptr": "*fp32",
            "n_rows": "i32", "dim": "i32", "stride_image": "i32", "stride_text": "i32", "stride_generated": "i32"},
        "_invalid_rows_kernel": {"x_ptr": "*{dt}", "invalid_ptr": "*i8", "n_rows": "i32", "dim": "i32",
                                 "stride_x": "i32"},
        "_seed_mean_kernel": {"text_ptr": "*{dt}", "mean_seed_ptr": "*fp32", "z_ptr": "*fp32", "n_rows": "i32",
                              "dim": "i32", "stride_text": "i32"},
    }
    variants = {f"{kernel}-dim{dim}": (kernel, signature, streaming_config(dim))
                for kernel, signature in streaming.items() for dim in DIMS}
    tiled = {"text_ptr": "*{dt}", "seeds_ptr": "*{dt}", "inv_seed_norm_ptr": "*fp32", "z_ptr": "*fp32",
             "n_rows": "i32", "n_seeds": "i32", "dim": "i32", "topk": "i32", "merge_steps": "i32",
             "stride_text": "i32", "stride_seeds": "i32"}
    for reduce, n_seeds, topk in (("max", 50, 1), ("topk", 50, 5), ("topk", 1000, 64)):
        variants[f"_seed_topk_kernel-{reduce}-q{n_seeds}-topk{topk}"] = (
            "_seed_topk_kernel", tiled, tiled_config(n_seeds, topk, take_max=reduce == "max"))
    return variants


VARIANTS = _variants()
CASES = [(name, dtype, arch) for name in VARIANTS for dtype in DTYPES for arch in ARCHS]


def op_kernels() -> dict:
    """Every Triton kernel of cfbd_fast.ops by name: the `_*_kernel` JIT functions of its modules."""
    import importlib

    from triton.runtime.jit import JITFunction

    import cfbd_fast.ops

    kernels = {}
    for module in pkgutil.iter_modules(cfbd_fast.ops.__path__):
        for name, value in vars(importlib.import_module(f"cfbd_fast.ops.{module.name}")).items():
            if name.endswith("_kernel") and isinstance(value, JITFunction):
                kernels[name] = value
    return kernels


def compile_all() -> dict:
    """Compile every case in this process: the kernels found, and "ok" or the error per case (run in the child)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernels = op_kernels()
    results = {}
    for name, dtype, arch in CASES:
        kernel_name, signature, config = VARIANTS[name]
        constexprs = {key: value for key, value in config.items() if key != "num_warps"}
        full_signature = {arg: ty.format(dt=dtype) for arg, ty in signature.items()}
        full_signature.update({key: "constexpr" for key in constexprs})
        try:
            source = triton.compiler.ASTSource(fn=kernels[kernel_name], signature=full_signature,
                                               constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": config["num_warps"]})
            ok = f".target sm_{arch}" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0
            results[f"{name}/{dtype}/{arch}"] = "ok" if ok else f"no sm_{arch} cubin produced"
        except Exception as exc:  # reported per case by the parent
            results[f"{name}/{dtype}/{arch}"] = f"{type(exc).__name__}: {exc}"
    return {"kernels": sorted(kernels), "results": results}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # A fresh cache, so that an earlier run's cubins cannot stand in for the compiler.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_has_a_variant(compiled):
    assert len(compiled["kernels"]) >= 4
    assert set(compiled["kernels"]) == {kernel for kernel, _, _ in VARIANTS.values()}


@pytest.mark.parametrize("name,dtype,arch", CASES)
def test_kernel_compiles_to_cubin(compiled, name, dtype, arch):
    assert compiled["results"][f"{name}/{dtype}/{arch}"] == "ok"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
