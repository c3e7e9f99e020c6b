"""Cheap parameter values for speed measurements.

Measured on an H100 (BENCHMARKS.md): creating the train state with the real
initialisers took about 60 s per configuration, nearly all of it outside the
step's compile. Step time does not depend on the values, so the benchmark
replaces every parameter with a fixed hash pattern of the same shape; the
random initialisers then have no use and XLA drops them. Values stay non-zero
and varied (zeros can run faster than real data).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def pattern(x: jax.Array) -> jax.Array:
    """Values in [-0.02, 0.02) (1 +- 0.02 for vectors, i.e. norm gains) of x's shape and dtype."""
    h = jax.lax.iota(jnp.uint32, math.prod(x.shape)) * jnp.uint32(2654435761)
    h = h ^ (h >> 15)
    unit = (h >> 8).astype(jnp.float32) / 2**23 - 1.0  # [-1, 1)
    base = 1.0 if x.ndim == 1 else 0.0
    return (base + 0.02 * unit).reshape(x.shape).astype(x.dtype)


def replace_values(params: Any) -> Any:
    """The same tree (logical-axis boxes kept) with `pattern` values."""
    return jax.tree.map(pattern, params)
