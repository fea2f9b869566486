"""Compile every CUDA source for sm_80 and sm_90a with nvcc (no GPU needed): syntax, template and
PTX errors in the kernels fail CI, and so does register spilling.

The torch glue of each .cu needs the c10 CUDA headers that only CUDA builds of torch ship, so the
check compiles the kernel section (``-DGDQ_KERNELS_ONLY``: every kernel instantiation and launcher);
GPU sessions build and test the whole file (tests/test_cuda_kernels.py).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu missing"


@pytest.mark.skipif(NVCC is None, reason="no CUDA toolkit (nvcc) on this machine")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm80_and_sm90a(source, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "--fmad=false", "-DGDQ_KERNELS_ONLY", *ARCHS, "-Xptxas", "-v",
           "-o", str(tmp_path / (source.stem + ".o")), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{log[-4000:]}"
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\w+)'", log)
    assert {arch for _, arch in entries} == {"sm_80", "sm_90a"}
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) == 0, f"register spills: {spills}"
