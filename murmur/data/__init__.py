"""Data curation: raw posts in, clean posts and conversations out (`murmur data`).

Modules, one concept each: records (Post, Conversation, Parquet schemas), sources (readers for every input
format), clean (normalisation and personal-data scrubbing), filters (length, language, spam), dedup (exact
and MinHash LSH), compliance (deletion lists, purge, audit), threads (reply trees to conversations), split,
canaries, executors (local processes or Ray Data) and pipeline (the stage that ties them together).
"""
