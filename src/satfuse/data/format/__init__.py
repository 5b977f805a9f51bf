"""The shard format both sides share: the manifest (spec: shards/FORMAT.md), the member encodings,
the band names of a set, and `satfuse shard verify`.
"""
