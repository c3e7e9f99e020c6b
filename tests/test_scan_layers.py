"""Layers as a scan (model/transformer.py): with each layer's parameters stacked on a
leading axis, the scanned model equals the Python loop over layers in its loss and its
gradients, whether the scan is rolled, partly unrolled or fully unrolled; fully unrolled,
the lowered program has no loop left; a negative `scan_unroll` fails in one line."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig, get_preset
from model.sampling import SamplingConfig, sample
from model.transformer import LanguageModel, unstack_layers
from tests.helpers import random_lm_batch
from train.losses import cross_entropy_sums
from train.state import init_fn

CFG = get_preset("tiny-llama", n_layers=4, use_bias=True)
BATCH = random_lm_batch(0, batch=2, length=16, vocab=CFG.vocab_size)


def stack_layers(params: dict, n_layers: int) -> dict:
    """The loop's block_0..block_{n-1} parameters as the scan's stacked `blocks`."""
    decoder = dict(params["decoder"])
    layers = [decoder.pop(f"block_{i}") for i in range(n_layers)]
    decoder["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "decoder": decoder}


def mean_loss(model: LanguageModel, params: dict) -> jax.Array:
    logits = model.apply(
        {"params": params}, BATCH["inputs"], BATCH["positions"], BATCH["segment_ids"]
    )
    sums = cross_entropy_sums(logits, BATCH["targets"], BATCH["weights"])
    return sums["loss_sum"] / sums["weight_sum"]


@pytest.mark.parametrize("unroll", [1, 3, 0], ids=["rolled", "partly", "fully"])
def test_scanned_layers_equal_the_loop(unroll):
    loop = LanguageModel(CFG)
    scanned = LanguageModel(CFG.replace(scan_layers=True, scan_unroll=unroll))
    params = nn.unbox(jax.jit(init_fn(loop))(jax.random.key(0)))
    # jitted: one compiled program each, where op-by-op dispatch compiled every operation
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(mean_loss, loop)))(params)
    stacked = stack_layers(params, CFG.n_layers)
    scanned_loss = jax.jit(jax.value_and_grad(functools.partial(mean_loss, scanned)))
    loss_scanned, grads_scanned = scanned_loss(stacked)
    np.testing.assert_allclose(loss_scanned, loss, rtol=1e-6)
    expected = stack_layers(grads, CFG.n_layers)
    assert jax.tree.structure(grads_scanned) == jax.tree.structure(expected)
    # float32 sums in another order: near-zero entries differ by ~1e-7 on some CPUs (AMD
    # EPYC: 3 of 16,384 by 1.5e-7), while a layer out of place would differ by ~1e-2
    for got, want in zip(jax.tree.leaves(grads_scanned), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unroll, has_loop", [(1, True), (0, False)])
def test_full_unroll_leaves_no_loop(unroll, has_loop):
    model = LanguageModel(CFG.replace(scan_layers=True, scan_unroll=unroll))
    params = jax.eval_shape(lambda: nn.unbox(init_fn(model)(jax.random.key(0))))
    text = jax.jit(jax.grad(functools.partial(mean_loss, model))).lower(params).as_text()
    assert ("stablehlo.while" in text) == has_loop


def test_sampling_a_scanned_model_decodes_separate_layers():
    loop = LanguageModel(CFG)
    scanned = LanguageModel(CFG.replace(scan_layers=True, scan_unroll=0))
    params = nn.unbox(jax.jit(init_fn(loop))(jax.random.key(0)))
    stacked = stack_layers(params, CFG.n_layers)
    model, unstacked = scanned.inference_form(stacked)
    assert not model.cfg.scan_layers
    assert jax.tree.all(jax.tree.map(np.array_equal, unstacked, params))
    assert unstack_layers(stacked, CFG.n_layers).keys() == params.keys()

    prompts = jnp.asarray(BATCH["inputs"][:, :6])
    lengths = jnp.array([6, 4])
    run = lambda m, p: jax.jit(  # noqa: E731
        functools.partial(sample, m, cfg=SamplingConfig(max_new_tokens=5, temperature=0.7))
    )(p, prompts, lengths, jax.random.key(3))
    got, want = run(scanned, stacked), run(loop, params)
    np.testing.assert_array_equal(got.tokens_BT, want.tokens_BT)
    np.testing.assert_allclose(got.logprobs_BT, want.logprobs_BT, rtol=1e-6)


def test_negative_unroll_is_refused():
    with pytest.raises(ValueError, match="scan_unroll must be >= 0"):
        ModelConfig(scan_layers=True, scan_unroll=-1)
