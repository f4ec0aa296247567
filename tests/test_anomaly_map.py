import pytest
import torch
import torch.nn.functional as F

from patchcore.core.scoring import gaussian_blur, patch_scores_to_map, upsample_blur


def reference(grid: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    up = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(up, sigma)


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [
        ((28, 28), (224, 224), 4.0),  # the default case
        ((14, 20), (112, 160), 4.0),  # non-square
        ((13, 17), (97, 131), 2.5),  # odd sizes, other sigma
        ((4, 4), (16, 16), 4.0),  # smaller than the kernel radius: replicated borders
        ((7, 9), (7, 9), 4.0),  # no upsampling
        ((28, 28), (224, 224), 0.0),  # no blur
    ],
)
def test_upsample_blur_equals_upsample_then_blur(grid, size, sigma) -> None:
    g = torch.rand(3, 1, *grid, generator=torch.Generator().manual_seed(0)) * 10
    got, want = upsample_blur(g, size, sigma), reference(g, size, sigma)
    assert got.shape == want.shape == (3, 1, *size) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    torch.testing.assert_close(patch_scores_to_map(g[:, 0], size, sigma), want[:, 0])


def test_blur_keeps_constants_and_the_peak() -> None:
    flat = torch.full((1, 1, 40, 50), 3.0)
    torch.testing.assert_close(upsample_blur(flat, (80, 100)), torch.full((1, 1, 80, 100), 3.0))
    spike = torch.zeros(1, 1, 28, 28)
    spike[0, 0, 10, 20] = 1.0
    m = upsample_blur(spike, (224, 224))[0, 0]
    y, x = divmod(int(m.argmax()), 224)
    assert abs(y - (10 * 8 + 3.5)) <= 1 and abs(x - (20 * 8 + 3.5)) <= 1
