"""Every Pallas kernel's blocks stay inside their arrays, forward and backward.

The CPU tests run the kernels in Pallas' interpreter, which clamps a block that starts past
the end of its array back inside it (as `dynamic_slice` does): an index map that points at
the wrong rows still reads valid ones there, and only the GPU shows the error. A key/value
block's index used for a whole-row block of the queries did exactly that (a packed q/k/v
variant of the flash kernels, branch `packed-qkv`: right values on the CPU, wrong dk on an
H200). These tests evaluate every index map at every grid point of small launches instead.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from model.kernels import bias_gelu, cross_entropy, decode_attention, layer_norm
from model.kernels import flash_attention as fa
from tests.helpers import SMALL_FLASH_BLOCKS, pallas_blocks_out_of_bounds

SMALL = SMALL_FLASH_BLOCKS


def _ids(B, T):
    return jnp.ones((B, T), jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T))


@pytest.mark.parametrize("B, T, H, G, D", [(2, 64, 2, 2, 16), (2, 70, 4, 2, 16)])
def test_flash_attention(B, T, H, G, D):
    """Separate q, k, v and packed; multi-head and grouped; rows padded (70 -> 96)."""
    seg, pos = _ids(B, T)
    attend = functools.partial(fa.flash_attention, tuning=SMALL)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg, pos))  # noqa: E731
    q, kv = jnp.zeros((B, T, H, D)), jnp.zeros((B, T, G, D))
    assert pallas_blocks_out_of_bounds(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv) == []
    packed = lambda qkv: jnp.sum(fa.flash_attention_packed(qkv, seg, pos, tuning=SMALL))  # noqa: E731
    qkv = jnp.zeros((B, T, G, H // G + 2, D))
    assert pallas_blocks_out_of_bounds(jax.grad(packed), qkv) == []


def test_a_block_past_the_end_is_found():
    """The check itself: a whole-row block indexed by the grid's block counter, the bug the
    interpreter hides (block 1 of a [64]-row block starts at row 64 of 64)."""

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[:32]

    def copy(x):
        return pl.pallas_call(
            kernel,
            grid=(2,),
            in_specs=[pl.BlockSpec((64, 16), lambda m: (m, 0))],
            out_specs=pl.BlockSpec((32, 16), lambda m: (m, 0)),
            out_shape=jax.ShapeDtypeStruct((64, 16), x.dtype),
            interpret=True,
            name="copy",
        )(x)

    assert pallas_blocks_out_of_bounds(copy, jnp.zeros((64, 16))) == [
        "copy: operand 0 at grid point (1,)"
    ]


def test_norm_and_bias_gelu():
    x, scale, bias = jnp.zeros((2, 24, 64)), jnp.ones(64), jnp.zeros(64)
    kw = dict(eps=1e-5, rms=False, out_dtype=jnp.float32)

    def norm_loss(x, scale, bias):
        kept, y = layer_norm.norm_keep_input(x, scale, bias, **kw)
        return jnp.sum(y) + jnp.sum(kept)

    assert pallas_blocks_out_of_bounds(jax.grad(norm_loss, argnums=(0, 1, 2)), x, scale, bias) == []
    gelu_loss = lambda h, b: jnp.sum(bias_gelu.bias_gelu(h, b))  # noqa: E731
    h = jnp.zeros((2, 24, 256))
    assert pallas_blocks_out_of_bounds(jax.grad(gelu_loss, argnums=(0, 1)), h, jnp.zeros(256)) == []


def test_cross_entropy():
    targets = jnp.zeros((2, 8), jnp.int32)

    def loss(logits):
        target, log_z = cross_entropy.target_logit_and_log_z(logits, targets, 1000)
        return jnp.sum(log_z - target)

    assert pallas_blocks_out_of_bounds(jax.grad(loss), jnp.zeros((2, 8, 1024))) == []


def test_decode_attention():
    B, S, H, G, D = 2, 40, 4, 2, 16
    q, kv = jnp.zeros((B, H, D)), jnp.zeros((B, S, G, D))
    ids = jnp.zeros((B,), jnp.int32)
    kv_ids = jnp.zeros((B, S), jnp.int32)
    call = functools.partial(decode_attention.decode_attention, block=16)
    assert pallas_blocks_out_of_bounds(call, q, kv, kv, ids, ids, kv_ids, kv_ids) == []
