"""Triton kernels, installed as ``gdq_engine.kernels``: the ``triton`` backend of the integer body.

* :mod:`gdq_engine.kernels.conv3x3`: the kernels (packed 3x3 conv with fused epilogue,
  quantize+pack, unpack).
* :mod:`gdq_engine.kernels.ops`: their Python launchers and weight preparation.

Importing the submodules needs Triton; this package itself imports nothing heavy.
"""

TRITON_KERNELS: tuple[str, ...] = ("packed_conv3x3", "quantize_pack", "unpack_codes")
