"""Triton kernels (GPU backend), installed as fusedformer.kernels."""
