"""Exact and near-duplicate detection.

Exact: BLAKE2b of the normalised text.

Near: MinHash over word 5-gram shingles with NUM_PERM = BANDS * ROWS = 14 * 9 = 126
permutations, banded LSH (Broder 1997; Leskovec et al., "Mining of Massive Datasets",
ch. 3). Two documents with Jaccard similarity s share a band with probability
1 - (1 - s^ROWS)^BANDS; the curve's midpoint (1/BANDS)^(1/ROWS) = 0.746. Candidates
that share a band are then confirmed by their estimated Jaccard (fraction of equal
signature entries) >= NEAR_DUP_THRESHOLD = 0.75, in line with the 0.7-0.8 used for
GPT-3, The Pile and The Stack. The later document of a pair is dropped.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

SHINGLE_WORDS = 5
BANDS, ROWS = 14, 9
NUM_PERM = BANDS * ROWS
NEAR_DUP_THRESHOLD = 0.75
_CHUNK = 8192  # shingles hashed per step, bounds memory on very long documents


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def permutation_params(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiply-shift hash family: h_i(x) = (a_i * x + b_i) >> 32, a_i odd."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=NUM_PERM, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)
    return a, b


def shingle_hashes(text: str) -> np.ndarray:
    """uint64 hash per word 5-gram (per whole text if it has fewer words)."""
    words = text.split()
    if not words:
        return np.zeros(1, dtype=np.uint64)
    # crc32 is deterministic across processes (Python's str hash is salted).
    table = {w: zlib.crc32(w.encode("utf-8")) for w in set(words)}
    ids = np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))
    n = min(SHINGLE_WORDS, len(ids))
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(0x100000001B3) + ids[k : len(ids) - n + 1 + k]
    return h


def minhash_signature(text: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NUM_PERM uint32 minima; equal entries estimate Jaccard similarity of the shingle sets."""
    shingles = np.unique(shingle_hashes(text))
    sig = np.full(NUM_PERM, np.iinfo(np.uint32).max, dtype=np.uint32)
    for start in range(0, len(shingles), _CHUNK):
        x = shingles[start : start + _CHUNK, None]
        hashed = ((a[None, :] * x + b[None, :]) >> np.uint64(32)).astype(np.uint32)
        np.minimum(sig, hashed.min(axis=0), out=sig)
    return sig


def _band_keys(sig: np.ndarray) -> list[bytes]:
    return [sig[i * ROWS : (i + 1) * ROWS].tobytes() for i in range(BANDS)]


class NearDuplicateIndex:
    """Banded LSH over MinHash signatures; `add_if_new` keeps the first of each cluster."""

    def __init__(self, threshold: float = NEAR_DUP_THRESHOLD):
        self.threshold = threshold
        # Every index stored under a band key: a query must be compared with each
        # document it shares a band with, not only the first one stored there.
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(BANDS)]
        self._signatures: list[np.ndarray] = []

    def find(self, sig: np.ndarray) -> int | None:
        """The index of a stored signature `sig` near-duplicates, or None (stores nothing):
        the first match in band order, then in the order the signatures were added."""
        checked = set()
        for band, key in enumerate(_band_keys(sig)):
            for other in self._buckets[band].get(key, ()):
                if other in checked:
                    continue
                checked.add(other)
                if np.mean(self._signatures[other] == sig) >= self.threshold:
                    return other
        return None

    def add(self, sig: np.ndarray) -> int:
        """Stores `sig`, whatever it matches; returns its index."""
        index = len(self._signatures)
        self._signatures.append(sig)
        for band, key in enumerate(_band_keys(sig)):
            self._buckets[band].setdefault(key, []).append(index)
        return index

    def add_if_new(self, sig: np.ndarray) -> int | None:
        """Adds `sig` and returns None, or returns the index of the near-duplicate it matches."""
        match = self.find(sig)
        if match is None:
            self.add(sig)
        return match
