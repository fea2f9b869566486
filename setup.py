"""Build script: the Python package, Triton kernels (kernels/ -> gdq_engine.kernels) and the
C++/CUDA extension gdq_engine._C compiled against the *installed* torch.

Install with ``pip install --no-build-isolation .`` so the extension links the torch you have.
CUDA sources under csrc/cuda are compiled only when torch is a CUDA build and a toolkit is found.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - explained to the user
    raise SystemExit("gdq_engine builds against an installed torch: run `pip install torch==2.13.0` "
                     "(CPU) or your CUDA build first, then `pip install --no-build-isolation .`") from exc


# No fast math: the epilogue is exact IEEE fp32 (docs/numerics.md); __fmul_rn/__fadd_rn already
# keep the compiler from fusing, --fmad=false makes that the default for everything else. nvcc
# compiles the kernels only (csrc/cuda/*.cu include no torch header); the torch glue of the CUDA
# kernels (csrc/cuda/*.cpp) is host C++ like csrc/cpu.
NVCC_FLAGS = ["-O3", "-std=c++20", "--fmad=false"]


def loaded_libstdcxx() -> str | None:
    """Path of the shared libstdc++ this process (so torch) runs on, or None (not Linux, not found).

    The extension links it by path. Some toolchains (the lent GPU machine's /opt/gcc wrapper) put a
    directory holding only libstdc++.a first on the library path, so ``-lstdc++`` linked a second,
    static copy of the C++ runtime into _C.so (24 MB). Two runtimes in one process do not share
    locale facets: an error message built with an integer in it (TORCH_CHECK(..., "got ", n))
    crashed the process there, and here came out cut short before the number.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libstdc++.so" in line}
    except OSError:
        return None
    paths = sorted(p for p in paths if os.path.isfile(p))
    return paths[0] if paths else None


def extension():
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    # -ffp-contract=off: the integer contract's epilogue forbids fused multiply-add (docs/numerics.md);
    # -fopenmp: ATen's parallel_for is an OpenMP pragma in the headers. C++20: what torch's headers
    # are written for (torch.utils.cpp_extension's default; C++17 warns on C++20-only members).
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
        libstdcxx = loaded_libstdcxx()
        if libstdcxx is not None:
            link.append(libstdcxx)
    use_cuda = (bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
                and os.environ.get("GDQ_NO_CUDA") != "1")
    if use_cuda:
        return CUDAExtension("gdq_engine._C", sources + cuda_sources, extra_link_args=link,
                             extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS})
    return CppExtension("gdq_engine._C", sources, extra_compile_args=cxx, extra_link_args=link)


packages = find_packages(include=["gdq_engine", "gdq_engine.*"]) + ["gdq_engine.kernels"]

setup(
    packages=packages,
    package_dir={"gdq_engine.kernels": "kernels"},
    package_data={"gdq_engine": ["weights/*.pt"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
