"""Exact maximum-clique search: Bron–Kerbosch with Tomita pivoting and a size bound, on int bitsets."""

from __future__ import annotations

import numpy as np
import torch


def _neighbour_sets(adjacency) -> list[int]:
    """Each vertex's neighbours as a bitset (the diagonal is ignored); checks shape and symmetry."""
    adj = adjacency.detach().cpu().numpy() if isinstance(adjacency, torch.Tensor) else np.asarray(adjacency)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adjacency must be a square [n, n] matrix, got shape {adj.shape}")
    adj = adj.astype(bool)
    if not np.array_equal(adj, adj.T):
        raise ValueError("adjacency must be symmetric (an undirected graph)")
    sets = []
    for i in range(adj.shape[0]):
        row = adj[i].copy()
        row[i] = False
        bits = 0
        for j in np.flatnonzero(row):
            bits |= 1 << int(j)
        sets.append(bits)
    return sets


def _members(bits: int) -> list[int]:
    out = []
    while bits:
        low = bits & -bits
        out.append(low.bit_length() - 1)
        bits ^= low
    return out


def _search(nbrs: list[int], stop_at: int | None) -> list[int]:
    """A maximum clique (or the first clique of ``stop_at`` vertices); an explicit stack, so no recursion limit."""
    n = len(nbrs)
    if n == 0:
        return []
    best, best_size = 1, 1  # any single vertex is a clique
    if stop_at is not None and best_size >= stop_at:
        return [0]
    stack = [(0, 0, (1 << n) - 1, 0)]  # (clique R, |R|, candidates P, excluded X)
    while stack:
        clique, size, cand, excl = stack.pop()
        if cand == 0:
            if size > best_size:
                best, best_size = clique, size
                if stop_at is not None and best_size >= stop_at:
                    break
            continue
        if size + cand.bit_count() <= best_size:
            continue  # even taking every candidate cannot beat the best clique found
        # Tomita pivot: the vertex of P | X with most neighbours in P; only its non-neighbours branch
        pivot_nbrs = max((nbrs[u] for u in _members(cand | excl)), key=lambda s: (s & cand).bit_count())
        for v in _members(cand & ~pivot_nbrs):
            bit = 1 << v
            stack.append((clique | bit, size + 1, cand & nbrs[v], excl & nbrs[v]))
            cand &= ~bit
            excl |= bit
    return _members(best)


def max_clique(adjacency) -> list[int]:
    """The vertices (ascending) of one maximum clique of an undirected graph.

    ``adjacency`` is a symmetric ``[n, n]`` bool matrix (numpy or torch); the diagonal is ignored.
    Exact: Bron–Kerbosch with Tomita pivoting, pruning branches that cannot beat the best clique.
    An empty graph gives ``[]``; a graph without edges gives a single vertex.
    """
    return _search(_neighbour_sets(adjacency), None)


def has_clique(adjacency, size: int) -> bool:
    """Whether the graph has a clique of at least ``size`` vertices (stops at the first one found)."""
    if size <= 0:
        return True
    nbrs = _neighbour_sets(adjacency)
    return len(_search(nbrs, size)) >= size


def clique_medoid(distances, members: list[int]) -> int:
    """The member with the smallest sum of distances to the other members (ties: the lowest index)."""
    if not members:
        raise ValueError("members must not be empty")
    dist = distances.detach().cpu().numpy() if isinstance(distances, torch.Tensor) else np.asarray(distances)
    idx = np.asarray(sorted(members))
    sums = dist[np.ix_(idx, idx)].sum(axis=1)
    return int(idx[int(np.argmin(sums))])
