"""Triton kernels, installed as ``gdq_engine.kernels`` (pack/unpack, packed conv3x3).

The kernels land with the Triton issue; this package exists from day one so the package_dir
mapping is exercised by every install (editable included).
"""

TRITON_KERNELS: tuple[str, ...] = ()
