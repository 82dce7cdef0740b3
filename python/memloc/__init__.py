"""memloc: find where a text-to-image diffusion model stores memorized images, and prune them.

The driver over ``memloc_kernels``: prompts -> statistics -> masks -> pruned model -> evaluation.
"""

__version__ = "0.1.0"
