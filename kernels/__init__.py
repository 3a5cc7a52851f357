"""Triton kernels, installed as ``fastgen.kernels``: one module per op, each
exposing launchers with the same contract as the C++ kernels in csrc/ops.h."""
