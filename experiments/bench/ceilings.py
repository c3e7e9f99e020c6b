"""The two ceilings measured on this device: memory bandwidth and bf16 matmul rate.

Copy bandwidth counts bytes read plus bytes written (the issue's definition);
read bandwidth (a sum over a large array) is reported beside it because
decoding mostly reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.bench.timing import median, time_calls


def measure(size_mib: int = 2048, matmul_n: int = 8192, iters: int = 10, reps: int = 10) -> dict:
    """{copy_GBps, read_GBps, matmul_TFLOPs} on the default device, random data.

    Each timed call repeats the operation `reps` times inside one jitted loop,
    so dispatch and the host sync are amortised.
    """
    key = jax.random.key(0)
    n = size_mib * 2**20 // 4
    x = jax.random.normal(key, (n,), jnp.float32)

    @jax.jit
    def copy(x):  # each pass reads and writes every element once
        # the barrier stops XLA from unrolling the loop and fusing the passes into one
        body = lambda i, x: jax.lax.optimization_barrier(x * 0.5 + 1.0)  # noqa: E731
        return jax.lax.fori_loop(0, reps, body, x)

    @jax.jit
    def read(x):  # each pass reads every element once
        body = lambda i, s: jax.lax.optimization_barrier(s + jnp.sum(x * s))  # noqa: E731
        return jax.lax.fori_loop(0, reps, body, jnp.float32(1))

    t_copy = median(time_calls(lambda: copy(x), 2, iters)) / reps
    t_read = median(time_calls(lambda: read(x), 2, iters)) / reps
    x = None  # free the buffer before the matmul operands
    a = jax.random.normal(key, (matmul_n, matmul_n), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(key, 1), (matmul_n, matmul_n), jnp.bfloat16)
    b = (b / matmul_n**0.5).astype(jnp.bfloat16)  # keeps the chained products O(1)

    @jax.jit
    def matmuls(a, b):
        return jax.lax.fori_loop(0, reps, lambda i, a: a @ b, a)

    t_mm = median(time_calls(lambda: matmuls(a, b), 2, iters)) / reps
    return {
        "copy_GBps": 2 * 4 * n / t_copy / 1e9,
        "read_GBps": 4 * n / t_read / 1e9,
        "matmul_TFLOPs": 2 * matmul_n**3 / t_mm / 1e12,
        "matmul_n": matmul_n,
        "array_MiB": size_mib,
    }
