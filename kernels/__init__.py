"""Triton kernels, installed as ``gdq_engine.kernels``: the ``triton`` backend of the integer body.

* :mod:`gdq_engine.kernels.conv3x3`: the kernels (packed 3x3 conv with fused epilogue,
  quantize+pack, unpack).
* :mod:`gdq_engine.kernels.ops`: their Python launchers and weight preparation.
* :mod:`gdq_engine.kernels.aot`: compiles every variant the engine launches for sm_90 / sm_80 on
  any machine (no GPU) and checks what the compiler made (MMAs, spills, shared memory, no FMA).

Importing the submodules needs Triton; this package itself imports nothing heavy.
"""

TRITON_KERNELS: tuple[str, ...] = ("packed_conv3x3", "quantize_pack", "unpack_codes")
