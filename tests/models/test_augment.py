"""SimCLR augmentations: reproducible from the generator, shapes, and each op's property."""

from __future__ import annotations

import pytest
import torch

from satfuse.data.reading.augment import (
    SimCLRAugment,
    color_jitter,
    gaussian_blur,
    grayscale,
    random_resized_crop,
    simclr_input,
    simclr_views,
)
from satfuse.utils import SatfuseError


def sample(c: int = 13, size: int = 48) -> torch.Tensor:
    return torch.randn(c, size, size, generator=torch.Generator().manual_seed(7))


def test_same_generator_state_same_views() -> None:
    x = sample()
    a = simclr_views(x, torch.Generator().manual_seed(11), 32)
    b = simclr_views(x, torch.Generator().manual_seed(11), 32)
    c = simclr_views(x, torch.Generator().manual_seed(12), 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # the two views are independent draws


def test_resume_reproduces_from_saved_generator_state() -> None:
    x = sample()
    gen = torch.Generator().manual_seed(3)
    simclr_views(x, gen, 24)
    state = gen.get_state()
    expected = simclr_views(x, gen, 24)
    resumed = torch.Generator()
    resumed.set_state(state)
    got = simclr_views(x, resumed, 24)
    assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))


def test_global_rng_is_untouched() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    simclr_views(sample(), torch.Generator().manual_seed(1), 16)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("channels", [3, 13, 15])
def test_shapes_and_finite(channels: int) -> None:
    v1, v2 = simclr_views(sample(channels), torch.Generator().manual_seed(0), 20)
    assert v1.shape == v2.shape == (channels, 20, 20)
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()


def test_crop_of_full_scale_is_a_resize() -> None:
    x = sample(2, 16)
    full = SimCLRAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(
        random_resized_crop(x, torch.Generator().manual_seed(0), 16, full), x
    )


def test_colour_ops() -> None:
    x = sample(4, 16)
    gray = grayscale(x)
    assert torch.allclose(gray[0], x.mean(0)) and torch.allclose(gray[0], gray[3])
    flat = torch.full((3, 20, 20), 2.5)
    torch.testing.assert_close(gaussian_blur(flat, 1.5), flat)  # blur keeps constants
    blurred = gaussian_blur(x, 2.0)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    aug = SimCLRAugment(brightness=0.0, contrast=0.5, groups=((0, 1), (2, 3)))
    jit = color_jitter(x, torch.Generator().manual_seed(0), aug)
    # contrast only: each group's mean is kept, its spread scaled by one factor.
    for grp in ((0, 1), (2, 3)):
        torch.testing.assert_close(jit[list(grp)].mean(), x[list(grp)].mean())
        dx, dj = x[list(grp)] - x[list(grp)].mean(), jit[list(grp)] - jit[list(grp)].mean()
        factor = float((dj * dx).sum() / (dx * dx).sum())
        assert 0.5 <= factor <= 1.5
        torch.testing.assert_close(dj, factor * dx, atol=1e-5, rtol=0)


def test_simclr_input_modes() -> None:
    s1, s2 = torch.randn(2, 8, 8), torch.randn(13, 8, 8)
    assert torch.equal(simclr_input(s1, s2, "s2_rgb"), s2[[3, 2, 1]])
    assert simclr_input(s1, s2, "s2").shape[0] == 13
    assert torch.equal(simclr_input(s1, s2, "s1s2")[:2], s1)
    with pytest.raises(SatfuseError, match="simclr_input"):
        simclr_input(s1, s2, "rgb")


def test_bad_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(SatfuseError, match=r"\(C, H, W\)"):
        simclr_views(torch.zeros(1, 3, 8, 8), gen, 8)
    with pytest.raises(SatfuseError, match="float"):
        simclr_views(torch.zeros(3, 8, 8, dtype=torch.uint8), gen, 8)
    with pytest.raises(SatfuseError, match="out_size"):
        simclr_views(torch.zeros(3, 8, 8), gen, 0)
