"""Exact clique search against brute force on seeded random graphs."""

import itertools

import numpy as np
import pytest

from memloc.eval.cliques import clique_medoid, has_clique, max_clique


def _random_graph(n: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < density, 1)
    return upper | upper.T


def _is_clique(adj: np.ndarray, members) -> bool:
    return all(adj[i, j] for i, j in itertools.combinations(members, 2))


def _brute_max_clique_size(adj: np.ndarray) -> int:
    n = len(adj)
    nbrs = [sum(1 << j for j in range(n) if adj[i, j] and i != j) for i in range(n)]
    best = 0
    for subset in range(1 << n):
        size = subset.bit_count()
        if size <= best:
            continue
        rest, ok = subset, True
        while rest and ok:
            low = rest & -rest
            v = low.bit_length() - 1
            ok = (subset & ~low) & ~nbrs[v] == 0
            rest ^= low
        if ok:
            best = size
    return best


CASES = [(n, d, s) for n in (0, 1, 2, 6, 11, 15) for d in (0.0, 0.25, 0.6, 0.9, 1.0) for s in (0, 1)]


@pytest.mark.parametrize("n,density,seed", CASES, ids=[f"n{n}-p{d}-s{s}" for n, d, s in CASES])
def test_max_clique_matches_brute_force(n, density, seed):
    adj = _random_graph(n, density, seed)
    clique = max_clique(adj)
    best = _brute_max_clique_size(adj)
    assert len(clique) == best, f"found {clique}, brute force says size {best}"
    assert clique == sorted(clique) and _is_clique(adj, clique)
    for k in range(0, n + 2):
        assert has_clique(adj, k) == (k <= best), f"has_clique(k={k}) wrong, max is {best}"


def test_planted_clique_in_larger_graph():
    adj = _random_graph(60, 0.08, 3)
    planted = [2, 9, 17, 23, 31, 40, 47, 52, 58]
    for i, j in itertools.combinations(planted, 2):
        adj[i, j] = adj[j, i] = True
    clique = max_clique(adj)
    assert _is_clique(adj, clique) and len(clique) >= len(planted)
    assert has_clique(adj, 3)


def test_complete_and_empty_graphs():
    assert max_clique(np.ones((500, 500), dtype=bool)) == list(range(500))  # deep, no recursion limit
    assert max_clique(np.zeros((7, 7), dtype=bool)) == [0]
    assert max_clique(np.zeros((0, 0), dtype=bool)) == []
    assert not has_clique(np.zeros((7, 7), dtype=bool), 2)


def test_diagonal_is_ignored_and_bad_input_raises():
    adj = np.eye(4, dtype=bool)
    assert len(max_clique(adj)) == 1
    with pytest.raises(ValueError, match="symmetric"):
        max_clique(np.array([[0, 1], [0, 0]], dtype=bool))
    with pytest.raises(ValueError, match="square"):
        max_clique(np.zeros((2, 3), dtype=bool))


def test_clique_medoid_hand_example():
    #     0  1  2  3
    d = np.array(
        [
            [0, 1, 4, 9],
            [1, 0, 2, 9],
            [4, 2, 0, 9],
            [9, 9, 9, 0],
        ],
        dtype=float,
    )
    # within {0, 1, 2}: sums 5, 3, 6 -> member 1; vertex 3 is not a member and must not count
    assert clique_medoid(d, [2, 0, 1]) == 1
    assert clique_medoid(d, [0, 3]) == 0  # tie: the lowest index
