"""The two ceilings measured on this device: memory bandwidth and bf16 matmul rate.

Copy bandwidth counts bytes read plus bytes written (the issue's definition);
read bandwidth (a sum over a large array) is reported beside it because
decoding mostly reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.bench.timing import median, time_calls


def measure(size_mib: int = 2048, matmul_n: int = 8192, iters: int = 20) -> dict:
    """{copy_GBps, read_GBps, matmul_TFLOPs} on the default device, random bf16 data."""
    key = jax.random.key(0)
    n = size_mib * 2**20 // 2
    x = jax.random.normal(key, (n,), jnp.bfloat16)
    copy = jax.jit(lambda x: x + 1)  # one read and one write of every element
    read = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    t_copy = median(time_calls(lambda: copy(x), 3, iters))
    t_read = median(time_calls(lambda: read(x), 3, iters))
    x = None  # free the 2 GiB before the matmul operands
    a = jax.random.normal(key, (matmul_n, matmul_n), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(key, 1), (matmul_n, matmul_n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    t_mm = median(time_calls(lambda: mm(a, b), 3, iters))
    return {
        "copy_GBps": 2 * 2 * n / t_copy / 1e9,
        "read_GBps": 2 * n / t_read / 1e9,
        "matmul_TFLOPs": 2 * matmul_n**3 / t_mm / 1e12,
        "matmul_n": matmul_n,
        "array_MiB": size_mib,
    }
