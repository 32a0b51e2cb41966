"""Near-duplicate clusters across partitions: union-find within each partition, then one merge.

Posts are named by their input order (unique) and ranked by (time, order), the priority dedup keeps the
earliest by. A partition links the posts of its LSH buckets and compresses what it found into a forest: each
linked post and the earliest post of its local component. Merging the forests gives the global components,
since every link lies in some partition; the merge holds only posts that share a bucket with another post.
"""

from __future__ import annotations

import numpy as np

from murmur.data.dedup import min_label_components

Forest = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # (node order, node time, root order, root time)


def _components(a_order, b_order, a_time, b_time) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(node orders, node times, root index per node) for the graph of edges a-b, nodes ranked by priority."""
    orders = np.concatenate((a_order, b_order)).astype(np.int64)
    times = np.concatenate((a_time, b_time)).astype(np.int64)
    unique_orders, first = np.unique(orders, return_index=True)
    unique_times = times[first]
    rank = np.lexsort((unique_orders, unique_times))  # priority order: node index -> position in unique arrays
    nodes, node_times = unique_orders[rank], unique_times[rank]
    position = np.empty(rank.size, dtype=np.int64)
    position[rank] = np.arange(rank.size)
    index = position[np.searchsorted(unique_orders, orders)]
    half = a_order.size
    labels = min_label_components(nodes.size, index[:half], index[half:])
    return nodes, node_times, labels


def partition_forest(a_order, b_order, a_time, b_time) -> Forest:
    """One partition's links compressed to (post, earliest post of its component here), for linked posts."""
    nodes, times, labels = _components(np.asarray(a_order), np.asarray(b_order), np.asarray(a_time),
                                       np.asarray(b_time))
    linked = np.flatnonzero(labels != np.arange(nodes.size))
    return nodes[linked], times[linked], nodes[labels[linked]], times[labels[linked]]


def merge_forests(forests: list[Forest]) -> np.ndarray:
    """Orders of the posts that are not the earliest of their global cluster: the near duplicates."""
    if not forests:
        return np.zeros(0, dtype=np.int64)
    a_order, a_time, b_order, b_time = (np.concatenate([f[i] for f in forests]) for i in range(4))
    if a_order.size == 0:
        return np.zeros(0, dtype=np.int64)
    nodes, _, labels = _components(a_order, b_order, a_time, b_time)
    return np.sort(nodes[labels != np.arange(nodes.size)])
