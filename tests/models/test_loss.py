"""nt_xent / infonce / dense alignment / retrieval on one process, against hand references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from satfuse.losses import dense_alignment_loss, nt_xent, retrieval_accuracy
from satfuse.utils import SatfuseError


def numpy_nt_xent(a: np.ndarray, b: np.ndarray, t: float) -> float:
    """The authors' NT-Xent written out anchor by anchor (SimCLR eq. 1, mean over 2N)."""
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = np.array([z[i] @ z[k] / t for k in range(2 * n)])
        denom = sum(np.exp(sims[k]) for k in range(2 * n) if k != i)
        total += -np.log(np.exp(sims[pos]) / denom)
    return total / (2 * n)


def numpy_infonce(a: np.ndarray, b: np.ndarray, t: float) -> float:
    """Cross-modal terms only, both directions, mean over 2N anchors."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    total = 0.0
    for q, k in ((a, b), (b, a)):
        logits = q @ k.T / t
        for i in range(len(q)):
            total += -logits[i, i] + np.log(np.exp(logits[i]).sum())
    return total / (2 * len(a))


def test_two_pairs_by_hand() -> None:
    # Unit vectors at known angles: every similarity is a cosine we can write down.
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[np.cos(0.3), np.sin(0.3)], [-np.sin(0.5), np.cos(0.5)]])
    t = 0.5
    # Anchor a0: positive b0 (cos .3), negatives a1 (0), b1 (-sin .5); and so on.
    c03, c05 = np.cos(0.3), np.cos(0.5)
    a0b1, a1b0, b0b1 = -np.sin(0.5), np.sin(0.3), -np.sin(0.2)  # b1 is at angle pi/2 + 0.5
    by_hand = np.mean(
        [
            -np.log(np.exp(c03 / t) / (np.exp(c03 / t) + np.exp(0) + np.exp(a0b1 / t))),
            -np.log(np.exp(c05 / t) / (np.exp(c05 / t) + np.exp(0) + np.exp(a1b0 / t))),
            -np.log(np.exp(c03 / t) / (np.exp(c03 / t) + np.exp(a1b0 / t) + np.exp(b0b1 / t))),
            -np.log(np.exp(c05 / t) / (np.exp(c05 / t) + np.exp(a0b1 / t) + np.exp(b0b1 / t))),
        ]
    )
    got = nt_xent(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), t)
    assert float(got) == pytest.approx(by_hand, rel=1e-6)
    assert numpy_nt_xent(a, b, t) == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("variant,ref", [("nt_xent", numpy_nt_xent), ("infonce", numpy_infonce)])
def test_matches_numpy_reference(variant: str, ref) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    # Unnormalised inputs of different scale: the loss must normalise them itself.
    got = nt_xent(3 * a, b, 0.07, variant=variant)
    assert float(got) == pytest.approx(ref(a.double().numpy(), b.double().numpy(), 0.07), rel=1e-5)


def test_variants_differ_and_depend_only_on_pairs_and_angles() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert float(nt_xent(a, b, variant="nt_xent")) != pytest.approx(
        float(nt_xent(a, b, variant="infonce"))
    )
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))  # a rotation keeps every cosine
    perm = torch.randperm(5, generator=g)  # reordering whole pairs keeps every term
    for v in ("nt_xent", "infonce"):
        ref = float(nt_xent(a, b, variant=v))
        assert float(nt_xent(a @ q, b @ q, variant=v)) == pytest.approx(ref, rel=1e-5)
        assert float(nt_xent(a[perm], b[perm], variant=v)) == pytest.approx(ref, rel=1e-5)
        # Breaking the pairing (shifting b by one row) must change the loss.
        assert float(nt_xent(a, b.roll(1, 0), variant=v)) != pytest.approx(ref, rel=1e-3)


def test_gradcheck_double() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    for variant in ("nt_xent", "infonce"):
        assert torch.autograd.gradcheck(
            lambda x, y, v=variant: nt_xent(x, y, 0.2, variant=v), (a, b)
        )


def test_bf16_autocast_is_fp32_and_close() -> None:
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(16, 8)
    x1, x2 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    ref = nt_xent(lin(x1), lin(x2), 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = lin(x1), lin(x2)
        assert z1.dtype == torch.bfloat16
        loss = nt_xent(z1, z2, 0.07)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in lin.parameters())
    # bf16 keeps ~3 significant digits of the embeddings; the loss follows within 1%.
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-2)


def test_dense_alignment_is_nt_xent_over_locations() -> None:
    g = torch.Generator().manual_seed(4)
    f1, f2 = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    rows1 = torch.stack([f1[i, :, h, w] for i in range(2) for h in range(3) for w in range(3)])
    rows2 = torch.stack([f2[i, :, h, w] for i in range(2) for h in range(3) for w in range(3)])
    for v in ("nt_xent", "infonce"):
        got = dense_alignment_loss(f1, f2, 0.1, variant=v)
        assert float(got) == pytest.approx(float(nt_xent(rows1, rows2, 0.1, variant=v)), rel=1e-6)
    # Aligned maps give a low loss, shuffled locations a high one.
    aligned = dense_alignment_loss(f1, f1 + 0.01 * f2, 0.1)
    shuffled = dense_alignment_loss(f1, f1.flip(-1) + 0.01 * f2, 0.1)
    assert float(aligned) < 0.5 < float(shuffled)


def test_retrieval_accuracy() -> None:
    z = torch.eye(4)
    assert retrieval_accuracy(z, z) == 1.0
    assert retrieval_accuracy(z, z.flip(0)) == 0.0
    keys = z.clone()
    keys[1] = z[2]  # query 1 now finds key 2 first... or ties: make it strict
    keys[2] = z[1]
    assert retrieval_accuracy(z, keys) == 0.5
    valid = torch.tensor([True, False, False, True])
    assert retrieval_accuracy(z, keys, valid=valid) == 1.0


def test_bad_inputs_raise_clear_errors() -> None:
    a = torch.randn(4, 3)
    with pytest.raises(SatfuseError, match="equal shapes"):
        nt_xent(a, torch.randn(5, 3))
    with pytest.raises(SatfuseError, match="empty batch"):
        nt_xent(a[:0], a[:0])
    with pytest.raises(SatfuseError, match="temperature"):
        nt_xent(a, a, temperature=0.0)
    with pytest.raises(SatfuseError, match="variant"):
        nt_xent(a, a, variant="triplet")  # type: ignore[arg-type]
    with pytest.raises(SatfuseError, match="same crop size"):
        dense_alignment_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
