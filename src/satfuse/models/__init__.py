"""satfuse.models: backbones, projection heads and the pretraining methods."""

from satfuse.models.backbones import build_backbone
from satfuse.models.heads import DenseProjectionHead, ProjectionHead
from satfuse.models.methods import (
    MMA,
    SIMCLR_CHANNELS,
    DualSimCLR,
    PretrainModel,
    SimCLR,
    build_pretrain_model,
    method_class,
    method_title,
)

__all__ = [
    "MMA",
    "SIMCLR_CHANNELS",
    "DenseProjectionHead",
    "DualSimCLR",
    "PretrainModel",
    "ProjectionHead",
    "SimCLR",
    "build_backbone",
    "build_pretrain_model",
    "method_class",
    "method_title",
]
