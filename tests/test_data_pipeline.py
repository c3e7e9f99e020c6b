"""Packing, shuffling, sharding and resumption of the batch iterator."""

import json

import jax
import numpy as np
import pytest

from data import store
from data.pipeline import (
    PackedBatchIterator,
    bytes_per_token,
    make_eval_iterator,
)
from data.prepare import load_meta, prepare
from train.sharding import to_global_batch

L, B = 64, 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "stdlib40"
    prepare(
        "stdlib", out, max_docs=40, vocab_size=400, val_fraction=0.2, num_workers=1, progress=False
    )
    return out


def _split(prepared, name):
    meta = load_meta(prepared)
    return store.TokenizedSplit.open(prepared / name, np.dtype(meta["token_dtype"]))


def check_row_invariants(batch):
    seg, pos, w = batch["segment_ids"], batch["positions"], batch["weights"]
    inputs, targets = batch["inputs"], batch["targets"]
    assert all(v.shape == seg.shape for v in batch.values())
    assert inputs.dtype == targets.dtype == pos.dtype == seg.dtype == np.int32
    assert w.dtype == np.float32
    # targets are the next inputs within the row
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    for r in range(seg.shape[0]):
        s, p, wr = seg[r], pos[r], w[r]
        real = s > 0
        # padding only at the end; segments count 1, 2, ... with steps of 0 or 1
        assert not np.any(real[1:] & ~real[:-1])
        if real.any():
            assert s[0] == 1 and set(np.diff(s[real])) <= {0, 1}
        starts = np.flatnonzero(np.diff(s, prepend=0) != 0)
        ends = np.append(starts[1:], len(s))[: len(starts)]
        for a, b in zip(starts, ends, strict=True):
            if s[a]:
                np.testing.assert_array_equal(p[a:b], np.arange(b - a))  # restart at 0
        assert np.all(wr[~real] == 0) and np.all(p[~real] == 0)
        # a weighted target never crosses into another segment
        crossing = np.flatnonzero(np.diff(s) != 0)
        assert np.all(wr[crossing] == 0)


def test_batches_are_packed_correctly(prepared):
    it = PackedBatchIterator(prepared, "train", L, B, seed=0)
    for _ in range(20):
        check_row_invariants(next(it))


def test_one_pass_loses_no_tokens_and_respects_documents(prepared):
    data = _split(prepared, "val")
    stream = np.concatenate([data.document(i) for i in range(data.num_docs)])
    doc_of = np.repeat(np.arange(data.num_docs), np.diff(data.offsets))
    batches = list(make_eval_iterator(prepared, L, B))
    rows = np.concatenate([b["inputs"] for b in batches])
    seg = np.concatenate([b["segment_ids"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    n = len(stream)
    # unshuffled: the valid inputs are the stream in order (the last token may only be a
    # target), so nothing was dropped or reordered
    count = int((seg > 0).sum())
    assert count in (n - 1, n)
    np.testing.assert_array_equal(rows[seg > 0], stream[:count])
    flat_docs = doc_of[: (seg > 0).sum()]
    # same segment id inside a row <=> same document
    for r in range(seg.shape[0]):
        idx = np.arange(r * L, min((r + 1) * L, len(flat_docs)))
        real = seg.reshape(-1)[idx] > 0
        d, s = flat_docs[idx[real]], seg.reshape(-1)[idx[real]]
        assert len(set(zip(d, s, strict=True))) == len(set(d)) == len(set(s))
    # every document token and every eos is a weighted target exactly once
    assert weights.sum() == load_meta(prepared)["splits"]["val"]["target_tokens"]
    assert np.all(targets.reshape(-1)[weights.reshape(-1) > 0] != 2)  # never a bos
    for b in batches:
        check_row_invariants(b)


def test_remainder_is_less_than_one_batch(prepared):
    it = PackedBatchIterator(prepared, "val", L, B, num_epochs=1, seed=0)
    seen = sum(b["weights"].sum() for b in it)
    total = load_meta(prepared)["splits"]["val"]["target_tokens"]
    assert total - B * L < seen <= total


def test_deterministic_and_reshuffled_per_epoch(prepared):
    a = PackedBatchIterator(prepared, "val", L, B, seed=5)
    b = PackedBatchIterator(prepared, "val", L, B, seed=5)
    c = PackedBatchIterator(prepared, "val", L, B, seed=6)
    for _ in range(3):
        x, y, z = next(a), next(b), next(c)
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert not np.array_equal(x["inputs"], z["inputs"])
    assert not np.array_equal(a.global_rows(0, 0), a.global_rows(1, 0))


def test_resume_from_state_across_epoch_boundary(prepared):
    ref = PackedBatchIterator(prepared, "val", L, B, seed=1)
    n = ref.batches_per_epoch + 3  # runs into the second epoch
    reference = [next(ref) for _ in range(n + 4)]
    for k in (0, 2, ref.batches_per_epoch - 1, ref.batches_per_epoch, n):
        it = PackedBatchIterator(prepared, "val", L, B, seed=1)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
        resumed = PackedBatchIterator(prepared, "val", L, B, seed=1)
        resumed.set_state(state)
        for j in range(4):
            got = next(resumed)
            for key in got:
                np.testing.assert_array_equal(got[key], reference[k + j][key])
    with pytest.raises(ValueError, match="another configuration"):
        PackedBatchIterator(prepared, "val", L * 2, B, seed=1).set_state(state)


def test_num_epochs_stops(prepared):
    it = PackedBatchIterator(prepared, "val", L, B, num_epochs=2)
    assert len(list(it)) == 2 * it.batches_per_epoch


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(prepared, count):
    whole = PackedBatchIterator(prepared, "train", L, B, seed=2)
    parts = [
        PackedBatchIterator(prepared, "train", L, B, seed=2, process_index=p, process_count=count)
        for p in range(count)
    ]
    for _ in range(3):
        full = next(whole)
        shards = [next(p) for p in parts]
        assert all(s["inputs"].shape == (B // count, L) for s in shards)
        for key in full:
            np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), full[key])
    rows = [
        set(parts[0].global_rows(0, 0)[p * B // count : (p + 1) * B // count]) for p in range(count)
    ]
    assert all(not (rows[i] & rows[j]) for i in range(count) for j in range(i))


def test_eval_iterator_is_fixed(prepared):
    first = list(make_eval_iterator(prepared, L, B, max_batches=3))
    second = list(make_eval_iterator(prepared, L, B, max_batches=3))
    assert len(first) == 3
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_bytes_per_token(prepared):
    stats = load_meta(prepared)["splits"]["val"]
    assert bytes_per_token(prepared, "val") == stats["bytes"] / stats["target_tokens"]
    assert 1.0 < bytes_per_token(prepared, "val") < 10.0


def test_to_global_batch_on_mesh(prepared):
    from train.sharding import MeshConfig, batch_sharding, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    batch = next(PackedBatchIterator(prepared, "train", L, B))
    arrays = to_global_batch(batch, mesh)
    for key, value in arrays.items():
        assert isinstance(value, jax.Array) and value.shape == (B, L)
        assert value.sharding.is_equivalent_to(batch_sharding(mesh), 2)
        np.testing.assert_array_equal(np.asarray(value), batch[key])
