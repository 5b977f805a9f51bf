"""satfuse.checkpoint: sharded atomic checkpoints (DCP), exact resume, stop signals, export.

Modules: `manager` (CheckpointManager, ModelOptimState), `rng` (capture_rng/restore_rng),
`signals` (StopFlag, REQUEUE_EXIT_CODE), `layout` (on-disk names and verification),
`export` (consolidated backbones for fine-tuning), `commands` (`satfuse ckpt ...`).
"""
