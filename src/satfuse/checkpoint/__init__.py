"""satfuse.checkpoint: sharded atomic checkpoints, exact resume, export.

Modules: `protocol` (the commit protocol both backends share: begin, finish, find_resume,
prune, check_model, verify, the save cadence; it knows no backend's files), `backend` (the
backend contract; backends register in `satfuse.registry.CHECKPOINT_BACKENDS` under the kind
meta.json records), `resolve` (`checkpoint.resume` parsed once, the paths users type resolved
to a step directory), `manager` (the DCP backend, CheckpointManager),
`dcp_storage` (its one-pass writer and mmap reader), `overlap` (crc32s checked while a resume
loads, all ranks agreeing before use), `deepspeed_backend` (the DeepSpeed
backend), `state` (ModelOptimState, fingerprints, rank files), `layout` (on-disk names and
verification), `trust` (weights-only loads, --trust-checkpoint), `export` and
`deepspeed_export` (consolidated backbones for fine-tuning, the exporter of the recorded kind),
`formats` (torchvision/timm exports), `commands` (`satfuse ckpt ...`). The trainer's stop
signals and RNG capture live in `satfuse.engines` (signals, rng).
"""
