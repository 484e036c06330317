"""The seed tree: every random draw is keyed by (run seed, stream name, round, client id).

Nothing here depends on how clients are laid out over pools, so the same config and seed give
the same draws with 1 pool or 8, on Ray or inline. Per-client draws that happen inside pools
use a counter-based hash (splitmix64) so a whole batch of clients is served by numpy array ops
instead of one generator object per client.
"""

from __future__ import annotations

import zlib

import numpy as np

_MASK63 = (1 << 63) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrap-around arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stream_id(stream: str) -> int:
    return zlib.crc32(stream.encode())


class SeedTree:
    """Derives independent random streams from one run seed."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def sequence(self, stream: str, *path: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.seed, _stream_id(stream), *(int(p) for p in path)])

    def rng(self, stream: str, *path: int) -> np.random.Generator:
        """A numpy generator for (stream, *path), e.g. rng("selection", round)."""
        return np.random.default_rng(self.sequence(stream, *path))

    def integer(self, stream: str, *path: int) -> int:
        """A 63-bit integer seed for (stream, *path), e.g. for torch.Generator.manual_seed."""
        return int(self.sequence(stream, *path).generate_state(1, np.uint64)[0]) & _MASK63

    def client_keys(self, stream: str, round_idx: int, client_ids: np.ndarray) -> np.ndarray:
        """One uint64 key per client for (stream, round): vectorised over client ids."""
        base = self.sequence(stream, round_idx).generate_state(1, np.uint64)
        return splitmix64(base ^ splitmix64(np.asarray(client_ids, dtype=np.uint64)))


def keyed_permutations(keys: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """Row c is a random permutation of range(counts[c]) keyed by keys[c], then -1 padding.

    Row c depends only on (keys[c], counts[c]): not on the other rows nor on `width`.
    """
    counts = np.asarray(counts, dtype=np.int64)
    positions = np.arange(width, dtype=np.uint64)
    draws = splitmix64(keys[:, None] + positions[None, :] * _GOLDEN)
    valid = positions[None, :] < counts[:, None].astype(np.uint64)
    draws[~valid] = np.iinfo(np.uint64).max
    perm = np.argsort(draws, axis=1, kind="stable").astype(np.int64)
    perm[~valid] = -1
    return perm
