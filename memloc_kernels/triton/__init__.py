"""Triton kernels of memloc: one module per op (kernel, then launcher); adapters in ``backends/triton.py``."""
