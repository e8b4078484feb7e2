"""Stages 2, 3 and 5 of the local engine as pure functions over arrays: exact groups, LSH
candidate pairs, clusters; plus the survivor order both engines share."""

from __future__ import annotations

import numpy as np

from data_processing import minhash


def survivor_ranks(keys: list[tuple[str, str, int, int]], against_records: int = 0) -> np.ndarray:
    """Rank of every record under the survivor order (lowest rank survives). The first
    ``against_records`` records (an existing corpus, ``--against``) rank before all others, so a
    new record never survives in place of an old one."""
    order = sorted(range(len(keys)), key=lambda i: (i >= against_records, keys[i]))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys))
    return rank


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving; roots are the lowest-ranked member."""

    def __init__(self, rank: np.ndarray):
        self.parent = np.arange(rank.size)
        self.rank = rank

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The lower-ranked root wins, so every root *is* its cluster's survivor.
            if self.rank[rb] < self.rank[ra]:
                ra, rb = rb, ra
            self.parent[rb] = ra


def exact_stage(exact_h: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle by exact hash. Returns ``keep`` (the lowest-ranked record of each hash group),
    ``rep`` (each record's group survivor) and the group sizes."""
    n = exact_h.size
    order = np.lexsort((rank, exact_h))
    first = np.ones(n, dtype=bool)
    first[1:] = exact_h[order][1:] != exact_h[order][:-1]
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    # Each record's survivor is the first of its run in the sorted order.
    rep = np.empty(n, dtype=np.int64)
    rep[order] = order[np.flatnonzero(first)[np.cumsum(first) - 1]] if n else order
    return keep, rep, np.diff(np.append(np.flatnonzero(first), n))


def candidate_stage(sigs: np.ndarray, live: np.ndarray, bands: int, rows: int,
                    rank: np.ndarray | None = None) -> np.ndarray:
    """Map band keys of the ``live`` (bool mask) records and shuffle them into buckets; returns
    unique candidate pairs ``(a, b), a < b`` of global record indices.

    Records are bucketed in ``rank`` (survivor-key) order, so the chain used for very large
    buckets links the same neighbours whatever the input order or engine.
    """
    idx = np.flatnonzero(live)
    if idx.size == 0:
        return np.zeros((0, 2), np.int64)
    if rank is not None:
        idx = idx[np.argsort(rank[idx], kind="stable")]
    pairs = idx[minhash.bucket_pairs(minhash.band_keys(sigs[idx], bands, rows))]
    return np.unique(np.sort(pairs, axis=1), axis=0) if pairs.size else pairs


def cluster_stage(edges: list[tuple[int, int]], rank: np.ndarray) -> np.ndarray:
    """Connected components of the verified pairs; returns each record's root, which is the
    lowest-ranked member of its component (the survivor)."""
    uf = UnionFind(rank)
    for a, b in edges:
        uf.union(a, b)
    return np.array([uf.find(i) for i in range(rank.size)], dtype=np.int64)
