"""satfuse: self-supervised multi-modal (Sentinel-1 + Sentinel-2) pretraining at cluster scale."""

__version__ = "0.1.0"
