"""Build cfbd-fast: the Python package plus the C++ store core (CMake + pybind11)."""
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "cfbd_fast" / "_version.py").read_text()).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = ""):
        super().__init__(name, sources=[])
        self.sourcedir = str(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        import pybind11

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
        ]
        if os.environ.get("CFBD_FAST_NATIVE"):
            args.append("-DCFBD_FAST_NATIVE=ON")
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)], cwd=build_temp, check=True)


setup(
    name="cfbd-fast",
    version=VERSION,
    description="Coarse-to-fine backdoor detection (CFBD) for image-caption datasets: Triton/numba kernels, "
    "a memory-mapped embedding store and a CLI that scans CC3M-scale data on one GPU.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["cfbd_fast", "cfbd_fast.*"]),
    ext_modules=[CMakeExtension("cfbd_fast._core", sourcedir=".")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "numpy",
        "torch",
        "triton",
        "numba",
        "scikit-learn",
        "typer",
        "rich",
        "pyarrow",
        "ml_dtypes",
        "safetensors",
        "open_clip_torch",
    ],
    entry_points={"console_scripts": ["cfbd-fast=cfbd_fast.cli.main:main"]},
    zip_safe=False,
)
