"""satfuse.checkpoint: sharded atomic checkpoints, exact resume, export.

Modules: `protocol` (the commit protocol both backends share: begin, finish, find_resume,
prune, check_model, verify, the save cadence), `manager` (the DCP backend, CheckpointManager),
`dcp_storage` (its one-pass writer and mmap reader), `overlap` (crc32s checked while a resume
loads, all ranks agreeing before use), `deepspeed_backend` (the DeepSpeed
backend), `state` (ModelOptimState, fingerprints, rank files), `layout` (on-disk names and
verification), `trust` (weights-only loads, --trust-checkpoint), `export` and
`deepspeed_export` (consolidated backbones for fine-tuning, a loader per recorded kind),
`formats` (torchvision/timm exports), `commands` (`satfuse ckpt ...`). The trainer's stop
signals and RNG capture live in `satfuse.engines` (signals, rng).
"""
