"""The Pallas decode-attention kernel equals the hand-written reference attention.

On CPU the kernel runs in Pallas' interpreter; one test lowers it for CUDA
(Triton IR), which catches what the interpreter accepts but Triton does not.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import reference_attention
from model.config import get_preset
from model.kernels import decode_attention as kernel_module
from model.kernels.decode_attention import decode_attention
from model.masking import attention_mask
from model.sampling import SamplingConfig, make_sampler
from model.transformer import LanguageModel
from tests.helpers import lower_for_cuda, mesh_of
from train import sharding
from train.state import param_shardings, strip_axis_names


def _case(B, S, H, G, D, seed=0):
    rng = np.random.default_rng(seed)
    q_BHD = jnp.asarray(rng.normal(size=(B, H, D)), jnp.float32)
    k_BSGD, v_BSGD = (jnp.asarray(rng.normal(size=(B, S, G, D)), jnp.float32) for _ in "kv")
    kv_positions_BS = jnp.asarray(np.tile(np.arange(S), (B, 1)), jnp.int32)
    kv_segments_BS = jnp.asarray(rng.integers(0, 3, size=(B, S)), jnp.int32)
    q_positions_B = jnp.asarray(rng.integers(0, S, size=B), jnp.int32)
    q_segments_B = jnp.asarray((np.arange(B) % 3), jnp.int32)  # row 0: padding query
    return q_BHD, k_BSGD, v_BSGD, q_positions_B, q_segments_B, kv_positions_BS, kv_segments_BS


def _reference(q_BHD, k, v, q_pos, q_seg, kv_pos, kv_seg):
    mask_BQK = attention_mask(q_pos[:, None], kv_pos, q_seg[:, None], kv_seg)
    return reference_attention(q_BHD[:, None], k, v, mask_BQK)[:, 0]


@pytest.mark.parametrize(
    "shape",
    [
        (3, 40, 4, 4, 16),  # multi-head, cache shorter than one block
        (3, 40, 8, 2, 64),  # grouped-query heads, last block partly past the cache
        (2, 64, 2, 1, 8),  # multi-query
    ],
)
@pytest.mark.parametrize(
    "settings",
    [
        dict(formulation="dot", block=16),  # one block per program, several programs a head
        dict(formulation="dot", block=16, splits=2),  # several blocks per program
        dict(formulation="dot", block=16, combine="kernel"),  # the last program combines
        dict(formulation="reduce", splits=1),
    ],
    ids=["dot", "dot-2splits", "dot-kernel-combine", "reduce"],
)
def test_equals_reference(shape, settings):
    args = _case(*shape)
    out, _ = decode_attention(*args, **settings)
    np.testing.assert_allclose(out, _reference(*args), atol=2e-6)


def test_arrival_counts_come_back_zero_for_the_next_step():
    """The last program of each (row, head) to finish combines the splits and zeroes its
    count, so a second step with the returned counts gives the same output."""
    args = _case(3, 40, 8, 2, 64)
    arrivals_BG = jnp.zeros((3, 2), jnp.int32)
    first, arrivals_BG = decode_attention(*args, arrivals_BG, block=16, combine="kernel")
    np.testing.assert_array_equal(arrivals_BG, np.zeros((3, 2)))
    second, _ = decode_attention(*args, arrivals_BG, block=16, combine="kernel")
    np.testing.assert_array_equal(second, first)
    with pytest.raises(ValueError, match="arrivals_BG must be int32 of shape"):
        decode_attention(*args, jnp.zeros((3, 8), jnp.int32))
    with pytest.raises(ValueError, match="combine must be one of"):
        decode_attention(*args, combine="host")


def test_unsupported_head_shape_is_refused():
    args = _case(1, 16, 3, 1, 16)  # 3 query heads per group: not a power of two
    with pytest.raises(ValueError, match="power-of-two"):
        decode_attention(*args)


@pytest.mark.parametrize(
    "formulation,combine", [("dot", "xla"), ("dot", "kernel"), ("reduce", "xla")]
)
def test_lowers_to_triton_for_cuda(monkeypatch, formulation, combine):
    monkeypatch.setattr(kernel_module, "interpret_mode", lambda: False)
    B, S, H, D = 2, 384, 16, 128  # gpt-1.3b decoding, bf16
    spec = jax.ShapeDtypeStruct
    args = [
        spec((B, H, D), jnp.bfloat16),
        spec((B, S, H, D), jnp.bfloat16),
        spec((B, S, H, D), jnp.bfloat16),
        spec((B,), jnp.int32),
        spec((B,), jnp.int32),
        spec((B, S), jnp.int32),
        spec((B, S), jnp.int32),
    ]
    kernel = functools.partial(decode_attention, formulation=formulation, combine=combine)
    lowered = lower_for_cuda(jax.jit(kernel), *args)
    assert "xla.gpu.triton" in lowered.as_text()


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_sampler_with_kernel_matches_reference_sharded(preset):
    """Greedy samples with the kernel equal those of the reference attention, on
    a data x fsdp x tensor mesh (rows and heads split across devices)."""
    reference_cfg = get_preset(preset)
    model = LanguageModel(reference_cfg)
    prompts = jax.random.randint(jax.random.key(5), (4, 6), 0, reference_cfg.vocab_size)
    lengths = jnp.asarray([6, 3, 5, 1], jnp.int32)
    params = strip_axis_names(model.init(jax.random.key(0), prompts)["params"])
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    expected = make_sampler(model, sampling)(params, prompts, lengths, jax.random.key(0))

    kernel_model = LanguageModel(reference_cfg.replace(decode_attention="pallas"))
    mesh = mesh_of(dict(data=2, fsdp=2, tensor=2))
    shardings = param_shardings(lambda r: kernel_model.init(r, prompts)["params"], mesh)
    with sharding.mesh_context(mesh):
        out = make_sampler(kernel_model, sampling)(
            jax.device_put(params, shardings),
            jax.device_put(prompts, sharding.batch_sharding(mesh)),
            lengths,
            jax.random.key(0),
        )
    np.testing.assert_array_equal(out.tokens_BT, expected.tokens_BT)
