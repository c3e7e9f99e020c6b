"""The persistent decoding-layers probe (`experiments/bench/persistent_layers.py`,
BENCHMARKS.md change 105): it lowers for CUDA, refuses shapes whose phases it cannot
spread over its programs or whose programs would not all be resident at once (the
barriers would wait forever), and on a Hopper GPU gives the reference's values and cache
entries.

Mosaic GPU's interpreter has no global semaphores, so on the CPU the kernel is lowered,
not run.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import persistent_layers as pl_probe
from model.kernels.partition import on_hopper
from tests.helpers import lower_for_cuda

L, D, F, S = 2, 512, 2048, 128  # 4 heads of 128, 2 cache blocks; at most 32 items a phase
PROGRAMS = 32


def _inputs():
    x, ln, weights, (kc, vc) = pl_probe._inputs(L, D=D, F=F, S=S)
    return jnp.array([S - 29], jnp.int32), x, ln, weights, kc, vc


def test_lowers_for_cuda_with_grid_barriers():
    pos, x, ln, weights, kc, vc = _inputs()
    step = functools.partial(pl_probe.layers_step, programs=PROGRAMS)
    lowered = lower_for_cuda(jax.jit(step), pos, x, ln, *weights, kc, vc)
    assert lowered.as_text().count("mosaic_gpu") >= 1


def test_shapes_it_cannot_spread_are_refused():
    pos, x, ln, weights, kc, vc = _inputs()
    with pytest.raises(ValueError, match="do not fit 16 programs"):  # 32 up-projection tiles
        pl_probe.layers_step(pos, x, ln, *weights, kc, vc, programs=16)
    with pytest.raises(ValueError, match="SMs at once"):  # every program must be resident
        pl_probe.layers_step(pos, x, ln, *weights, kc, vc, programs=1024)
    with pytest.raises(ValueError, match="skip takes"):
        pl_probe.layers_step(pos, x, ln, *weights, kc, vc, programs=PROGRAMS, skip=("head",))


@pytest.mark.skipif(not on_hopper(), reason="a Mosaic GPU kernel with global semaphores: Hopper")
def test_values_and_cache_entries_equal_the_reference():
    pos, x, ln, weights, kc, vc = _inputs()
    want, want_k, want_v = jax.jit(pl_probe.layers_reference)(pos, x, ln, *weights, kc, vc)
    got_k, got_v = kc.copy(), vc.copy()  # written in place at slot pos
    step = functools.partial(pl_probe.layers_step, programs=PROGRAMS)
    got = jax.jit(step)(pos, x, ln, *weights, got_k, got_v)
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    # bf16 rounding at the model's points; the sums' order differs from XLA's
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=0.01 * scale, rtol=0
    )
    slot = int(pos[0])
    for got_c, want_c in ((got_k, want_k), (got_v, want_v)):
        np.testing.assert_allclose(
            np.asarray(got_c[:, slot], np.float32), np.asarray(want_c[:, slot], np.float32),
            atol=0.02, rtol=0.01,
        )  # fmt: skip
