"""Shard sets in, batches out: resolving `data.shards`, the epoch plan, tar indexing and decoding,
the per-sample transform, the DataLoader worker stream and its batch ring, the pretraining and
evaluation loaders, node-local staging and the SimCLR views.
"""
