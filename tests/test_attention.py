"""Attention: the mask's invariants, GQA, RoPE, and agreement of the backends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import apply_rope, fused_attention, reference_attention, rope_inv_freq
from model.config import ModelConfig, get_preset
from model.layers import dense
from model.masking import attention_mask
from model.transformer import LanguageModel

B, L = 2, 12


def _batch(seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, (B, L)), jnp.int32)
    # Row 0: two packed documents (7 + 3 tokens) then 2 padding tokens.
    # Row 1: one document of 12 tokens.
    segments = jnp.asarray([[1] * 7 + [2] * 3 + [0] * 2, [1] * L], jnp.int32)
    positions = jnp.asarray([list(range(7)) + list(range(3)) + [0, 0], list(range(L))], jnp.int32)
    return tokens, positions, segments


@pytest.fixture(scope="module", params=["tiny", "tiny-llama"])
def model_and_params(request):
    cfg = get_preset(request.param)
    model = LanguageModel(cfg)
    tokens, positions, segments = _batch()
    params = model.init(jax.random.key(0), tokens, positions, segments)["params"]
    return model, params


def _logits_and_grads(model, params, tokens, positions, segments, query_row, query_pos):
    """Logits at one query position, and the gradient of one of them w.r.t. the embeddings."""

    def f(params):
        logits = model.apply({"params": params}, tokens, positions, segments)
        return logits[query_row, query_pos].astype(jnp.float32)

    logits = f(params)
    grads = jax.grad(lambda p: f(p).sum())(params)
    return logits, grads


@pytest.mark.parametrize(
    "change_index, query_pos, why",
    [
        ((0, 5), 4, "a future token of the same document"),
        ((0, 10), 9, "a padding token"),
        ((0, 8), 6, "a token of the next packed document"),
        ((0, 2), 8, "a token of the previous packed document"),
    ],
)
def test_changing_invisible_token_changes_nothing(model_and_params, change_index, query_pos, why):
    model, params = model_and_params
    tokens, positions, segments = _batch()
    base_logits, base_grads = _logits_and_grads(
        model, params, tokens, positions, segments, 0, query_pos
    )
    changed = tokens.at[change_index].set((tokens[change_index] + 17) % 256)
    logits, grads = _logits_and_grads(model, params, changed, positions, segments, 0, query_pos)
    np.testing.assert_array_equal(logits, base_logits, err_msg=why)
    # Gradients w.r.t. every weight except the changed token's own embedding row are identical.
    for (path, g), g0 in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(base_grads)
    ):
        if "embedding" in jax.tree_util.keystr(path) and "position" not in jax.tree_util.keystr(
            path
        ):
            continue
        np.testing.assert_allclose(g, g0, rtol=0, atol=1e-7, err_msg=f"{why}: {path}")


def test_changing_visible_token_changes_output(model_and_params):
    """The counterpart: the test above would be vacuous if nothing changed anything."""
    model, params = model_and_params
    tokens, positions, segments = _batch()
    base, _ = _logits_and_grads(model, params, tokens, positions, segments, 0, 6)
    changed = tokens.at[0, 3].set((tokens[0, 3] + 17) % 256)
    logits, _ = _logits_and_grads(model, params, changed, positions, segments, 0, 6)
    assert np.abs(np.asarray(logits - base)).max() > 1e-4


def test_packed_document_equals_document_alone(model_and_params):
    """A document's logits in a packed row equal its logits when run alone."""
    model, params = model_and_params
    tokens, positions, segments = _batch()
    packed = model.apply({"params": params}, tokens, positions, segments)
    alone = model.apply({"params": params}, tokens[:1, 7:10])
    np.testing.assert_allclose(packed[0, 7:10], alone[0], atol=2e-5)


@pytest.mark.strict_ranks
def test_mask_rules():
    positions = jnp.asarray([[0, 1, 2, 0, 1, 0]])
    segments = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(positions, positions, segments, segments))[0]
    expected = np.zeros((6, 6), bool)
    expected[:3, :3] = np.tril(np.ones((3, 3), bool))
    expected[3:5, 3:5] = np.tril(np.ones((2, 2), bool))
    np.testing.assert_array_equal(mask, expected)


def _qkv(seed, heads, kv_heads, dtype=jnp.float32, length=L, dim=16):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, length, heads, dim), dtype)
    k = jax.random.normal(keys[1], (B, length, kv_heads, dim), dtype)
    v = jax.random.normal(keys[2], (B, length, kv_heads, dim), dtype)
    return q, k, v


@pytest.mark.strict_ranks
def test_grouped_query_equals_multi_head_with_repeated_kv():
    q, k, v = _qkv(0, heads=8, kv_heads=2)
    _, positions, segments = _batch()
    mask = attention_mask(positions, positions, segments, segments)
    gqa = reference_attention(q, k, v, mask)
    mha = reference_attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2), mask)
    np.testing.assert_allclose(gqa, mha, atol=1e-6)


def test_gqa_model_with_kv_heads_equal_heads_is_plain_attention():
    """kv_heads == heads through the model equals the default (kv_heads None) model."""
    tokens, positions, segments = _batch()
    cfg = get_preset("tiny")
    plain = LanguageModel(cfg)
    explicit = LanguageModel(cfg.replace(n_kv_heads=cfg.n_heads))
    params = plain.init(jax.random.key(0), tokens)["params"]
    np.testing.assert_array_equal(
        plain.apply({"params": params}, tokens, positions, segments),
        explicit.apply({"params": params}, tokens, positions, segments),
    )


def test_rope_scores_depend_only_on_relative_position():
    dim = 16
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, dim))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, dim))

    def score(q_pos, k_pos):
        inv_freq = rope_inv_freq(ModelConfig(d_model=dim, n_heads=1, positional="rope"))
        rq = apply_rope(q, jnp.asarray([[q_pos]]), inv_freq)
        rk = apply_rope(k, jnp.asarray([[k_pos]]), inv_freq)
        return float(jnp.sum(rq * rk))

    for offset in (0, 3, 17):
        np.testing.assert_allclose(score(5 + offset, 2 + offset), score(5, 2), rtol=1e-4)
    assert abs(score(5, 2) - score(9, 2)) > 1e-3


@pytest.mark.parametrize("packed", [True, False])
def test_reference_matches_jax_xla_attention(packed):
    """Hand-written attention equals jax.nn.dot_product_attention (XLA): values, gradients."""
    q, k, v = _qkv(3, heads=8, kv_heads=2)
    _, positions, segments = _batch()
    if packed:
        mask = attention_mask(positions, positions, segments, segments)
    else:
        positions = jnp.broadcast_to(jnp.arange(L), (B, L))
        mask = attention_mask(positions, positions, None, None)
    valid = (segments > 0)[..., None, None] if packed else 1.0  # padding rows are don't-care

    def ref(q, k, v):
        return reference_attention(q, k, v, mask) * valid

    def fused(q, k, v):
        return fused_attention(q, k, v, mask if packed else None, "xla") * valid

    np.testing.assert_allclose(ref(q, k, v), fused(q, k, v), atol=1e-5)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    g_fused = jax.grad(lambda *a: jnp.sum(fused(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_fused):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_model_backends_agree():
    tokens, positions, segments = _batch()
    cfg = get_preset("tiny-llama")
    params = LanguageModel(cfg).init(jax.random.key(0), tokens)["params"]
    ref = LanguageModel(cfg).apply({"params": params}, tokens, positions, segments)
    xla = LanguageModel(cfg.replace(attention_backend="xla")).apply(
        {"params": params}, tokens, positions, segments
    )
    valid = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(ref)[valid], np.asarray(xla)[valid], atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_is_the_einsum_of_its_projection(dtype):
    """`dense` (one 2-D product, bias added in x's dtype) equals the einsums the attention
    projections are defined by: x [B, L, D] -> [B, L, H, K], and back over (H, K)."""
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (B, L, 16)).astype(dtype)
    w_in, b_in = jax.random.normal(k[1], (16, 4, 8)), jax.random.normal(k[2], (4, 8))
    w_out, b_out = jax.random.normal(k[3], (4, 8, 16)), jax.random.normal(k[4], (16,))
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    tol = 1e-6 if dtype == "float32" else 1e-2  # of the result's norm: bf16 rounds each output

    def assert_close(got, want):
        assert np.linalg.norm(f32(got) - want) <= tol * np.linalg.norm(want)

    y = dense(x, w_in, b_in)
    assert y.shape == (B, L, 4, 8) and y.dtype == x.dtype
    assert_close(y, jnp.einsum("bld,dhk->blhk", f32(x), w_in) + b_in)
    z = dense(y, w_out, b_out, n_in=2)
    assert z.shape == (B, L, 16) and z.dtype == x.dtype
    assert_close(z, jnp.einsum("blhk,hkd->bld", f32(y), w_out) + b_out)
    np.testing.assert_array_equal(dense(x, w_in), dense(x, w_in, jnp.zeros((4, 8))))
