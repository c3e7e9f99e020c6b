"""LoRA (train/lora.py): zero adapters are the base model exactly; the merge and its gradients
follow W + (alpha / r) A @ B; steps train the adapters alone (the base stays bit for bit, the
optimizer holds adapter moments only); sharded steps equal the single-device one, the adapters
placed by the rule table; bad settings fail in one line."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from experiments.configs.common import lora_fields
from model.transformer import LanguageModel
from rlhf import stage
from rlhf.sft_step import make_sft_step
from tests.helpers import mesh_of, random_lm_batch, single_device_mesh
from tests.rlhf_helpers import TINY
from train import sharding
from train.lora import KERNELS, LoraConfig, LoraModel, config_of
from train.optim import OptimConfig, make_optimizer
from train.state import FROZEN, create_train_state, init_fn, state_logical_specs

LORA = LoraConfig(rank=4, alpha=8.0)
TX = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, schedule="constant"))
SCANNED = TINY.replace(n_layers=2, scan_layers=True, activation="swiglu")


def init_params(model, seed=0):
    return jax.jit(lambda r: nn.unbox(init_fn(model)(r)))(jax.random.key(seed))


def with_random_b(params, seed=1):
    """The adapters with B drawn at random too (fresh ones have B = 0)."""
    flat = traverse_util.flatten_dict(params["lora"])
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, path in zip(keys, sorted(flat)):
        if path[-1] == "b":
            flat[path] = 0.1 * jax.random.normal(key, flat[path].shape)
    return {**params, "lora": traverse_util.unflatten_dict(flat)}


def expected_delta(kernel_name, a, b, scale):
    """scale * A @ B in numpy, A [lead, in..., r], B [lead, r, out...] -> W's shape."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lead = a.ndim - 1 - KERNELS[kernel_name][1]
    a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1])
    b2 = b.reshape(*b.shape[: lead + 1], -1)
    out_shape = (*a.shape[:-1], *b.shape[lead + 1 :])
    return scale * np.matmul(a2, b2).reshape(out_shape)


def adapted_kernels(params):
    """{kernel path: (W, A, B)} of a {frozen, lora} params tree."""
    base = traverse_util.flatten_dict(params[FROZEN])
    pairs = traverse_util.flatten_dict(params["lora"])
    return {
        p[:-1]: (base[p[:-1]], pairs[p[:-1] + ("a",)], v) for p, v in pairs.items() if p[-1] == "b"
    }


@pytest.mark.parametrize("cfg", [TINY, SCANNED], ids=["layers", "scanned"])
def test_zero_adapters_are_the_base_model_exactly(cfg):
    model = LoraModel(LanguageModel(cfg), LORA)
    params = init_params(model)
    merged = jax.jit(model.merged)(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params[FROZEN])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    np.testing.assert_array_equal(
        jax.jit(model.apply)({"params": params}, tokens),
        jax.jit(model.base.apply)({"params": params[FROZEN]}, tokens),
    )
    kernels = adapted_kernels(params)
    names = {p[-1] for p in kernels}
    assert names == {"query", "key", "value", "out", "gate", "up", "down"} & set(
        n for p in traverse_util.flatten_dict(params[FROZEN]) for n in p
    )
    assert len(kernels) == len(names) * (1 if cfg.scan_layers else cfg.n_layers)


def test_merge_and_its_gradients_follow_the_formula():
    """Merged W = W + scale A @ B; dL/dA = scale dL/dW B^T and dL/dB = scale A^T dL/dW, with
    dL/dW the plain model's gradient at the merged weights; the base gets no gradient."""
    model = LoraModel(LanguageModel(SCANNED), LORA)
    params = with_random_b(init_params(model))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, SCANNED.vocab_size, (2, 9)))
    probe = jax.random.normal(jax.random.key(3), (2, 9, SCANNED.padded_vocab))

    def loss(apply, p):
        return jnp.sum(apply({"params": p}, tokens) * probe)

    merged = jax.jit(model.merged)(params)
    grads = jax.jit(jax.grad(lambda p: loss(model.apply, p)))(params)
    grad_w = traverse_util.flatten_dict(
        jax.jit(jax.grad(lambda p: loss(model.base.apply, p)))(merged)
    )
    merged_flat = traverse_util.flatten_dict(merged)
    grad_pairs = traverse_util.flatten_dict(grads["lora"])
    for path, (w, a, b) in adapted_kernels(params).items():
        np.testing.assert_allclose(
            merged_flat[path],
            np.asarray(w) + expected_delta(path[-1], a, b, LORA.scale),
            rtol=1e-5,
            atol=1e-6,
        )
        # As matrices per layer: A [I, r], B [r, O], dL/dW [I, O].
        layers = a.shape[0]  # scanned: the layer axis leads
        a_LIR = np.asarray(a, np.float64).reshape(layers, -1, LORA.rank)
        b_LRO = np.asarray(b, np.float64).reshape(layers, LORA.rank, -1)
        g_LIO = np.asarray(grad_w[path], np.float64).reshape(layers, a_LIR.shape[1], -1)
        want_a = LORA.scale * np.matmul(g_LIO, np.swapaxes(b_LRO, 1, 2)).reshape(a.shape)
        want_b = LORA.scale * np.matmul(np.swapaxes(a_LIR, 1, 2), g_LIO).reshape(b.shape)
        np.testing.assert_allclose(grad_pairs[path + ("a",)], want_a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grad_pairs[path + ("b",)], want_b, rtol=1e-4, atol=1e-5)
    for g in jax.tree.leaves(grads[FROZEN]):
        assert not np.any(np.asarray(g))


def test_steps_train_the_adapters_alone():
    model = LoraModel(LanguageModel(TINY), LORA)
    state, shardings = create_train_state(
        init_fn(model), TX, single_device_mesh(), jax.random.key(0)
    )
    before = jax.device_get(state.params)
    step = sharding.jit_step(make_sft_step(model, TX), shardings, single_device_mesh())
    batch = random_lm_batch(0, 8, 16, TINY.vocab_size)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch, jax.random.key(7))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    after = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(after[FROZEN]), jax.tree.leaves(before[FROZEN])):
        np.testing.assert_array_equal(a, b)
    assert any(
        np.any(x) for p, x in traverse_util.flatten_dict(after["lora"]).items() if p[-1] == "b"
    )
    # Adam's two moments of each adapter, and scalars (counts): nothing of the base.
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(after["lora"]))
    opt_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert opt_shapes == sorted(adapter_shapes * 2)
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
    ]
    assert not any(FROZEN in p for p in paths)


def run_lora_sft(mesh, initial):
    model = LoraModel(LanguageModel(TINY), LORA)
    with sharding.mesh_context(mesh):
        abstract = jax.eval_shape(init_fn(model), jax.random.key(0))
        shardings = sharding.logical_to_mesh(state_logical_specs(abstract, TX), mesh)
    state = jax.device_put(initial, shardings)
    step = sharding.jit_step(make_sft_step(model, TX), shardings, mesh)
    batch = random_lm_batch(1, 8, 16, TINY.vocab_size)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(7))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_sharded_lora_step_matches_single_device_with_adapters_placed_by_the_rules():
    model = LoraModel(LanguageModel(TINY), LORA)
    initial, _ = create_train_state(init_fn(model), TX, single_device_mesh(), jax.random.key(0))
    initial = jax.device_get(initial)
    ref_state, ref_losses = run_lora_sft(single_device_mesh(), initial)
    mesh = mesh_of(dict(data=2, fsdp=2, tensor=2))
    state, losses = run_lora_sft(mesh, initial)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert losses[0] != losses[1]
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ref_state.params)
    ):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path)
        )
    attn = state.params["lora"]["decoder"]["block_0"]["attn"]
    mlp = state.params["lora"]["decoder"]["block_0"]["mlp"]
    # A takes its kernel's input axes, B its output axes; the rank is never split.
    assert attn["query"]["a"].sharding.spec == P("fsdp", None)  # embed | rank
    assert attn["query"]["b"].sharding.spec == P(None, "tensor", None)  # rank | heads, head_dim
    assert attn["out"]["a"].sharding.spec == P("tensor", None, None)  # heads, head_dim | rank
    assert attn["out"]["b"].sharding.spec == P(None, "fsdp")  # rank | embed
    assert mlp["down"]["a"].sharding.spec == P("tensor", None)  # mlp | rank
    # The optimizer's moments sit where their adapter does.
    mu = state.opt_state[1][0].mu["lora"]["decoder"]["block_0"]["attn"]["query"]["b"]
    assert mu.sharding.spec == attn["query"]["b"].sharding.spec


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rank=-1), "lora.rank must be an integer >= 0"),
        (dict(rank=4, alpha=0.0), "lora.alpha must be a finite number > 0"),
        (dict(rank=4, targets="attention,qkv"), r"names unknown targets \['qkv'\]"),
        (dict(rank=4, targets=""), "names unknown targets"),
    ],
)
def test_bad_lora_settings_fail_in_one_line(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        LoraConfig(**fields)
    assert "\n" not in str(error.value)
    section = ConfigDict(dict(lora=lora_fields(**fields)))
    with pytest.raises(ValueError, match=message):
        config_of(section)


def test_bad_lora_sections_are_refused_before_anything_runs():
    from experiments.configs import posttrain_tiny

    c = posttrain_tiny.get_config()
    c.sft.lora.rank = -2
    with pytest.raises(ValueError, match=r"^sft: lora.rank must be an integer >= 0") as error:
        stage.validate(c.sft, "sft")
    assert "\n" not in str(error.value)
    c.ppo.lora = lora_fields(rank=4)
    with pytest.raises(ValueError, match=r"^ppo.lora: LoRA is for the sft, dpo, grpo stages"):
        stage.validate(c.ppo, "ppo")
    c.dpo.lora = ConfigDict(dict(rank=4, alpha=1.0, targets="mlp", dropout=0.1))
    with pytest.raises(ValueError, match=r"^dpo: lora has unknown fields \['dropout'\]"):
        stage.validate(c.dpo, "dpo")
    with pytest.raises(ValueError, match="matches no kernel of this model"):
        init_params(LoraModel(LanguageModel(TINY), LoraConfig(rank=2, targets="gate")))
