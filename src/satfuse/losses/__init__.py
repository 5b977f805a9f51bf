"""satfuse.losses: contrastive losses over the global (all-rank) batch."""

from satfuse.losses.contrastive import (
    dense_alignment_loss,
    nt_xent,
    retrieval_accuracy,
    retrieval_accuracy_tensor,
)

__all__ = ["dense_alignment_loss", "nt_xent", "retrieval_accuracy", "retrieval_accuracy_tensor"]
