"""Compile every CUDA source without a GPU: the kernels (csrc/cuda/*.cu) with nvcc for sm_80 and
sm_90a, so syntax, template and PTX errors and register spills fail CI; and their torch glue
(csrc/cuda/*.cpp) with the host compiler against the installed torch's headers, so a glue that no
longer matches the kernels' interface (launch.h) or torch's API fails CI too. GPU sessions build
and test the whole extension (tests/test_cuda_kernels.py).
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
    # --threads 0: the two architectures compile in parallel (CI has 2 cores)
    cmd = [NVCC, "-c", "-std=c++20", "-O3", "--fmad=false", *ARCHS, "--threads", "0", "-Xptxas", "-v",
           "-o", str(tmp_path / (source.stem + ".o")), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{log[-4000:]}"
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\w+)'", log)
    assert {arch for _, arch in entries} == {"sm_80", "sm_90a"}
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) == 0, f"register spills: {spills}"


def test_kernel_sources_include_no_torch_header():
    """nvcc never compiles torch's headers (csrc/cuda/launch.h says why)."""
    for source in SOURCES:
        text = source.read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), source.name


GLUE = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="no CUDA toolkit headers or no g++")
@pytest.mark.parametrize("source", GLUE, ids=lambda p: p.name)
def test_torch_glue_compiles_with_the_host_compiler(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    # CPU wheels of torch ship the c10 CUDA headers but not this generated one; its only content
    # is the shared-library export switch, which a compile-only check does not need.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{cuda_include}", f"-I{tmp_path / 'stub'}"]
    cmd = ["g++", "-c", "-std=c++20", "-O1", "-fPIC", "-Werror=return-type", *includes, "-o",
           str(tmp_path / (source.stem + ".o")), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"g++ failed:\n{(proc.stdout + proc.stderr)[-4000:]}"


def test_python_channel_checks_match_the_kernels_tiles():
    """cuda_ops refuses channel counts before the op (its constants are launch.h's)."""
    import torch

    from gdq_engine.ops import cuda_ops

    header = (ROOT / "csrc" / "cuda" / "launch.h").read_text()
    tiles = {name: int(v) for name, v in re.findall(r"constexpr int (kConv\w+) = (\d+);", header)}
    assert tiles == {"kConvOutChannels": cuda_ops.OUT_CHANNEL_TILE, "kConvInChannels": cuda_ops.IN_CHANNEL_STEP}
    x4 = torch.zeros(1, 3, 3, 48 // 2, dtype=torch.uint8)  # 48 channels of 4-bit codes
    with pytest.raises(ValueError, match="input channels in multiples of 32, got 48"):
        cuda_ops.check_conv_channels(x4, 4, torch.zeros(9, 64, 48, dtype=torch.int8))
    x8 = torch.zeros(1, 3, 3, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="output channels in multiples of 64, got 96"):
        cuda_ops.check_conv_channels(x8, 8, torch.zeros(9, 96, 64, dtype=torch.int8))
    cuda_ops.check_conv_channels(x8, 8, torch.zeros(9, 128, 64, dtype=torch.int8))  # fits: no error
