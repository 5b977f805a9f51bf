"""Tests of satfuse.models, satfuse.losses, the gather, augmentations and bench loss."""
