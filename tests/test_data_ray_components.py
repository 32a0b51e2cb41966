"""Near-duplicate clusters are connected components of LSH bucket links, whichever executor finds them: the
local one in one pass over all posts, the Ray one by union-find per partition and then a merge."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from murmur.data.dedup import min_label_components, near_duplicates
from murmur.data.distributed.components import merge_forests, partition_forest


def brute_components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(x) for x in range(n)]


def test_a_chain_of_near_duplicates_keeps_only_its_earliest_post():
    # Posts 0, 1, 2 in priority order: 0 and 2 share a bucket in band 0, 2 and 1 in band 1; 0 and 1 share none.
    # Keeping the first of every bucket would keep 0 and 1; the cluster {0, 1, 2} keeps 0 alone.
    band0 = np.array([7, 8, 7], dtype=np.uint64)
    band1 = np.array([5, 6, 6], dtype=np.uint64)
    assert near_duplicates([band0, band1]).tolist() == [False, True, True]


def test_long_chains_settle():
    n = 5000
    a = np.arange(1, n)
    b = np.arange(0, n - 1)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(n - 1)
    assert (min_label_components(n, a[shuffled], b[shuffled]) == 0).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=60),
    st.integers(1, 5))))
def test_components_match_union_find_and_the_partitioned_merge(case):
    n, edges, partitions = case
    a = np.array([e[0] for e in edges], dtype=np.int64)
    b = np.array([e[1] for e in edges], dtype=np.int64)
    expected = brute_components(n, edges)
    assert min_label_components(n, a, b).tolist() == expected
    # Distributed: each partition holds some of the links, keyed by (time, order) priorities rather than
    # indices; its forest is merged with the others'. Node i's priority is (time i // 3, order i).
    times = np.arange(n, dtype=np.int64) // 3
    forests = []
    for p in range(partitions):
        mine = np.flatnonzero(np.arange(len(edges)) % partitions == p)
        forests.append(partition_forest(a[mine], b[mine], times[a[mine]], times[b[mine]]))
    near = set(merge_forests(forests).tolist())
    assert near == {i for i in range(n) if expected[i] != i}
