"""Files on disk to training batches, in four sub-packages: `sources` (published layouts scanned
into pairs; the dataset registry's entries), `packing` (pairs into one shard set), `format` (the
shard format both sides share) and `reading` (shard sets into batches). `commands` wires
`satfuse synth` and `satfuse shard` to them."""
