"""Pairs in, one shard set out: `satfuse shard`'s entry, the paired and per-band packers, raster
reading and resampling, the atomic tar writer, the seeded plan, the output directory and its
lease, and the exact band statistics.
"""
