"""KV-cache decoding equals the full forward pass; the sampler's filters and stopping rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model.config import get_preset
from model.sampling import SamplingConfig, filter_logits, fitting_new_tokens, make_sampler
from model.transformer import LanguageModel, fill_slots_ahead, init_cache
from tests.helpers import mesh_of
from train import sharding
from train.state import param_shardings, strip_axis_names

PRESETS = [get_preset("tiny"), get_preset("tiny-llama", scan_layers=True)]


def _init(cfg):
    model = LanguageModel(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, strip_axis_names(params)


@pytest.mark.parametrize("cfg", PRESETS, ids=["tiny", "tiny-llama-scan"])
def test_cached_decoding_equals_full_forward(cfg):
    model, params = _init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
    full = model.apply({"params": params}, tokens)
    prefill = 12
    logits, cache = model.apply(
        {"params": params}, tokens[:, :prefill], cache=init_cache(cfg, 2, 20)
    )
    steps = [logits]
    for t in range(prefill, 20):
        positions = jnp.full((2, 1), t, jnp.int32)
        logits, cache = model.apply(
            {"params": params}, tokens[:, t : t + 1], positions, cache=cache
        )
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


def test_slots_filled_ahead_equal_slots_written_each_step():
    """The sampler labels every slot after the prefill (`fill_slots_ahead`): right-padded
    prompts of different lengths decode to the same logits as with each step writing its
    slot's position and segment, and the steps write no slot metadata."""
    cfg = get_preset("tiny")
    model, params = _init(cfg)
    B, P, S = 3, 6, 12
    lengths = jnp.asarray([6, 2, 4], jnp.int32)
    prompts = jax.random.randint(jax.random.key(1), (B, P), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(P), (B, P))
    segments = (positions < lengths[:, None]).astype(jnp.int32)
    _, written = model.apply(
        {"params": params}, prompts, positions, segments, cache=init_cache(cfg, B, S)
    )
    filled = fill_slots_ahead(written)
    step = jax.jit(
        lambda tokens_B1, positions_B1, cache: model.apply(
            {"params": params}, tokens_B1, positions_B1, jnp.ones_like(positions_B1), cache=cache
        )
    )
    for t in range(S - P):
        tokens_B1 = jax.random.randint(jax.random.key(t), (B, 1), 0, cfg.vocab_size)
        positions_B1 = (lengths + t)[:, None]
        want, written = step(tokens_B1, positions_B1, written)
        got, filled = step(tokens_B1, positions_B1, filled)
        np.testing.assert_allclose(got, want, atol=1e-6)
    jaxpr = jax.make_jaxpr(step)(tokens_B1, positions_B1, filled).jaxpr
    metadata_writes = [e.primitive.name for e in jaxpr.eqns if e.outvars[0].aval.shape == (B, S)]
    assert metadata_writes == []  # written each step: two scatters


def _naive_greedy(model, params, prompt, n, eos=None):
    """Reference: a full forward pass over the whole sequence for every new token.

    The sequence lives in a fixed-length buffer (causal attention makes the
    unused tail irrelevant) so that the forward pass compiles once.
    """
    buffer = np.zeros((1, len(prompt) + n), np.int32)
    buffer[0, : len(prompt)] = prompt
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    out = []
    for i in range(len(prompt), len(prompt) + n):
        token = int(jnp.argmax(forward(buffer)[0, i - 1]))
        out.append(token)
        buffer[0, i] = token
        if token == eos:
            break
    return out


def test_greedy_batch_of_different_lengths_matches_naive_decoding():
    cfg = get_preset("tiny-llama")
    model, params = _init(cfg)
    prompts = [[5, 9, 13, 200, 7], [42, 17], [1, 2, 3, 4, 5, 6, 7, 8]]
    padded = np.zeros((3, 8), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    sampler = make_sampler(model, SamplingConfig(max_new_tokens=10, temperature=0.0))
    out = sampler(params, jnp.asarray(padded), lengths, jax.random.key(0))
    for i, p in enumerate(prompts):
        assert out.tokens_BT[i].tolist() == _naive_greedy(model, params, p, 10)
    assert out.lengths_B.tolist() == [10, 10, 10]
    np.testing.assert_array_equal(out.logprobs_BT, np.zeros((3, 10)))  # greedy: zero


def test_single_prompt_matches_naive_decoding():
    """Batch 1 takes the two-row path (see `sample`); its row equals naive decoding."""
    cfg = get_preset("tiny")
    model, params = _init(cfg)
    prompt = [3, 14, 15, 92, 65]
    sampler = make_sampler(model, SamplingConfig(max_new_tokens=8, temperature=0.0))
    out = sampler(params, jnp.asarray([prompt], jnp.int32), jnp.asarray([5]), jax.random.key(0))
    assert out.tokens_BT.shape == (1, 8) and out.lengths_B.tolist() == [8]
    assert out.tokens_BT[0].tolist() == _naive_greedy(model, params, prompt, 8)


def test_stops_at_eos_and_pads_after():
    cfg = get_preset("tiny")
    model, params = _init(cfg)
    prompt = [3, 1, 4, 1, 5]
    reference = _naive_greedy(model, params, prompt, 12)
    eos = reference[3]  # pretend the 4th generated token is EOS
    first_eos = reference.index(eos)
    sampler = make_sampler(
        model, SamplingConfig(max_new_tokens=12, temperature=0.0, eos_id=eos, pad_id=0)
    )
    out = sampler(params, jnp.asarray([prompt]), jnp.asarray([5]), jax.random.key(0))
    tokens = out.tokens_BT[0].tolist()
    assert tokens[: first_eos + 1] == reference[: first_eos + 1]
    assert tokens[first_eos + 1 :] == [0] * (12 - first_eos - 1)
    assert int(out.lengths_B[0]) == first_eos + 1 and bool(out.finished_B[0])


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_lengths_count_each_rows_tokens_up_to_its_eos(pad_is_eos):
    """Rows that stop at different steps, and one that never does: each length is its
    tokens up to and including its first EOS, or every step the loop ran."""
    cfg = get_preset("tiny")
    model, params = _init(cfg)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8]]
    references = [_naive_greedy(model, params, p, 10) for p in prompts]
    eos = references[1][3]  # row 1 stops at its fourth token, the others where it occurs
    want = [r.index(eos) + 1 if eos in r else 10 for r in references]
    padded = np.zeros((3, 5), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    sampling = SamplingConfig(
        max_new_tokens=10, temperature=0.0, eos_id=eos, pad_id=eos if pad_is_eos else 0
    )
    out = make_sampler(model, sampling)(
        params, jnp.asarray(padded), jnp.asarray([5, 3, 4]), jax.random.key(0)
    )
    assert out.lengths_B.tolist() == want, references
    assert out.finished_B.tolist() == [eos in r for r in references]


def test_sampled_logprobs_match_filtered_distribution():
    cfg = get_preset("tiny")
    model, params = _init(cfg)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=20)
    out = make_sampler(model, sampling)(
        params, jnp.asarray([[7, 8, 9]]), jnp.asarray([3]), jax.random.key(3)
    )
    seq = jnp.concatenate([jnp.asarray([[7, 8, 9]]), out.tokens_BT], axis=1)
    logits = model.apply({"params": params}, seq)[0, 2:-1]
    logp = jax.nn.log_softmax(filter_logits(logits, 0.7, 20, 1.0))
    expected = jnp.take_along_axis(logp, out.tokens_BT[0][:, None], -1)[:, 0]
    np.testing.assert_allclose(out.logprobs_BT[0], expected, atol=1e-4)


def test_ids_past_the_tokenizers_vocabulary_are_never_chosen():
    """A padded embedding table's spare rows: sampled or greedy, only ids < vocab_size, and
    greedy picks the best of those."""
    cfg = get_preset("tiny")
    model, params = _init(cfg)
    prompts, lengths = jnp.asarray([[7, 8, 9]] * 4), jnp.asarray([3] * 4)
    for temperature in (1.0, 0.0):
        sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, vocab_size=10)
        out = make_sampler(model, sampling)(params, prompts, lengths, jax.random.key(1))
        assert int(out.tokens_BT.max()) < 10
    seq = jnp.concatenate([prompts[:1], out.tokens_BT[:1]], axis=1)
    logits = model.apply({"params": params}, seq)[0, 2:-1, :10]
    np.testing.assert_array_equal(out.tokens_BT[0], jnp.argmax(logits, -1))
    unrestricted = make_sampler(model, SamplingConfig(max_new_tokens=12, temperature=1.0))
    assert int(unrestricted(params, prompts, lengths, jax.random.key(1)).tokens_BT.max()) >= 10
    with pytest.raises(ValueError, match="do not fit the model"):
        make_sampler(model, SamplingConfig(vocab_size=cfg.vocab_size + 1))(
            params, prompts, lengths, jax.random.key(1)
        )


def test_new_tokens_fit_the_learned_positions_left_after_the_prompt():
    learned, rope = get_preset("tiny", max_len=32), get_preset("tiny-llama", max_len=32)
    assert fitting_new_tokens(learned, 10, 128) == 22 and fitting_new_tokens(learned, 10, 5) == 5
    assert fitting_new_tokens(rope, 10, 128) == 128  # RoPE extrapolates: the caller's choice
    with pytest.raises(ValueError, match="takes 32 of the model's 32 positions"):
        fitting_new_tokens(learned, 32, 128)


def test_filters_keep_the_right_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda f: (np.asarray(f) > -1e29).tolist()[0]  # noqa: E731
    assert kept(filter_logits(logits, 1.0, 2, 1.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.75)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.85)) == [True, True, True, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.1)) == [True, False, False, False]


def test_sharded_sampling_equals_unsharded():
    cfg = get_preset("tiny-llama")
    model, params = _init(cfg)
    prompts = jax.random.randint(jax.random.key(5), (4, 6), 0, cfg.vocab_size)
    lengths = jnp.asarray([6, 3, 5, 1], jnp.int32)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    expected = make_sampler(model, sampling)(params, prompts, lengths, jax.random.key(0))
    mesh = mesh_of(dict(data=2, fsdp=2, tensor=2))
    shardings = param_shardings(lambda r: model.init(r, prompts)["params"], mesh)
    sharded_params = jax.device_put(params, shardings)
    assert sharded_params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    with sharding.mesh_context(mesh):
        prompts_sharded = jax.device_put(prompts, sharding.batch_sharding(mesh))
        out = make_sampler(model, sampling)(
            sharded_params, prompts_sharded, lengths, jax.random.key(0)
        )
    np.testing.assert_array_equal(out.tokens_BT, expected.tokens_BT)
