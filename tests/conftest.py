"""Shared test configuration.

Tests run on the CPU with small shapes. OpenBLAS is limited to one thread (JAX's CPU LAPACK
kernels go through it, and its threads contend with XLA's on small machines).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
