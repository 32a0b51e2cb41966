"""The data stage on a Ray cluster: workers read, clean and fingerprint (reading), hash-partitioned shuffles
through files (shuffle) carry exact dedup, deletions and thread roots (global_step), near-duplicate clusters
are merged from per-partition forests (components); the driver holds one object reference per task and counts,
O(partitions) a shuffle."""
