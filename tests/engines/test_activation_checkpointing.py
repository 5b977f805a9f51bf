"""`model.activation_checkpointing=true` through `build_pretrain_model` (where both engines
build the model): every backbone recomputes in the backward pass, and the gradients, the loss
and the BatchNorm statistics equal those of the same model without it (same seed, fp32).
No process group: the global loss runs on one rank. The DDP and DeepSpeed runs with the key
set are in tests/deepspeed/test_ds_train.py."""

from __future__ import annotations

import pytest
import torch

from satfuse.config import LossConfig, ModelConfig
from satfuse.models import build_pretrain_model
from satfuse.models.backbones import Backbone

CASES = [("tiny", "dual_simclr", 32), ("tiny", "mma", 32), ("vit_small_patch16", "dual_simclr", 32)]


def forward_calls(model: torch.nn.Module) -> list[int]:
    """Counts forward calls of every module inside a backbone (recomputation calls again)."""
    calls = [0]
    for backbone in (m for m in model.modules() if isinstance(m, Backbone)):
        for sub in backbone.modules():
            sub.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(("backbone", "method", "crop"), CASES)
def test_same_gradients_with_and_without_activation_checkpointing(backbone, method, crop):
    cfg = dict(backbone=backbone, method=method, proj_hidden=64, proj_out=32, mma_dim=16)
    torch.manual_seed(0)
    plain = build_pretrain_model(ModelConfig(**cfg), img_size=crop)
    torch.manual_seed(0)
    ckpt = build_pretrain_model(ModelConfig(**cfg, activation_checkpointing=True), img_size=crop)
    for (n, p), q in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        assert torch.equal(p, q), n  # same seed, same initial weights
    g = torch.Generator().manual_seed(0)
    batch = {"s1": torch.randn(4, 2, crop, crop, generator=g), "s2": torch.randn(4, 13, crop, crop, generator=g)}
    counts, losses = [], []
    for model in (plain, ckpt):
        model.train()
        calls = forward_calls(model)
        loss, _ = model.loss(model(batch), LossConfig())
        loss.backward()
        counts.append(calls[0])
        losses.append(float(loss.detach()))
    assert counts[1] > counts[0], counts  # the backbones ran again in backward: activations not kept
    assert losses[0] == losses[1]
    grads = 0
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
            grads += 1
    assert grads > 10
    for (n, b), c in zip(plain.named_buffers(), ckpt.buffers(), strict=True):  # BatchNorm stats moved once
        torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-7, msg=n)
