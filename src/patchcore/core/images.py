"""Reading images and turning every accepted input into one tensor layout.

Accepted inputs: a file path (``str`` / ``os.PathLike``), a PIL image, a numpy array (HxW or HxWxC,
uint8, uint16, bool or float in [0, 1]) or a torch tensor (HxW or CxHxW, uint8 or float in [0, 1]).
Greyscale is repeated to three channels, an alpha channel is dropped.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# numpy-only pieces live in patchcore.lean.pixels (shared with the torch-free runtime) and are
# re-exported here: the names users import from this module keep working
from patchcore.lean.pixels import (
    IMAGE_SUFFIXES,
    ImageReadError,
    ImageTooLargeError,
    InputLimits,
    input_limits,
    list_images,
    output_size,
    pil_to_array,
    read_image,
    set_input_limits,
    to_chw,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageInput",
    "ImageReadError",
    "ImageTooLargeError",
    "InputLimits",
    "as_tensor",
    "input_limits",
    "list_images",
    "output_size",
    "pil_to_array",
    "read_image",
    "resize",
    "set_input_limits",
]

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def as_tensor(image: ImageInput) -> torch.Tensor:
    """Convert any accepted input to a float32 tensor 3xHxW with values in [0, 1].

    Paths, PIL images and arrays follow :func:`patchcore.lean.pixels.to_chw` (the runtime's
    rules); a tensor (HxW or CxHxW, uint8, bool or float in [0, 1]) is brought to that layout
    first. A stack of greyscale images given as one image is named as such in the error.
    """
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        image = read_image(image)
    if isinstance(image, Image.Image):
        image = pil_to_array(image)
    if isinstance(image, torch.Tensor):
        arr, layout = _tensor_as_hwc(image, name), "an (N, 1, H, W) tensor"
    elif isinstance(image, np.ndarray):
        arr, layout = image, "an (N, H, W, 1) array"
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; give a path, PIL image, "
            "numpy array or torch tensor"
        )
    if arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4) and min(arr.shape) > 4:
        raise ImageReadError(
            name,
            f"{arr.shape[2]} channels; expected 1, 3 or 4; if this is a stack of "
            f"{image.shape[0]} greyscale images, pass a list of them or {layout}",
        )
    return torch.from_numpy(to_chw(arr, name))


def _tensor_as_hwc(t: torch.Tensor, name: str) -> np.ndarray:
    """An HxW or CxHxW tensor as an HxW / HxWxC array (float32 [0, 1] for uint8 and bool)."""
    t = t.detach().cpu()
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.dtype == torch.bool or t.is_floating_point():
        t = t.float()
    else:
        raise ImageReadError(name, f"unsupported tensor dtype {t.dtype}")
    if t.ndim not in (2, 3):
        raise ImageReadError(name, f"expected HxW, HxWxC or CxHxW, got shape {tuple(t.shape)}")
    return (t.permute(1, 2, 0) if t.ndim == 3 else t).numpy()


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize CxHxW or BxCxHxW bilinearly with antialiasing (identity when the size matches).

    The antialiased resize runs the width pass first, through an (H_in, W_out) intermediate: when
    that intermediate is far larger than both ends (a tall strip), the height pass is run first
    instead, as its own call (the same separable filter, to float rounding).
    """
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    batched = t.ndim == 4
    x = t if batched else t.unsqueeze(0)
    (h, w), (oh, ow) = x.shape[-2:], size
    if h * ow > 8 * max(h * w, oh * ow):  # width-first intermediate far larger than both ends
        x = F.interpolate(x, size=(oh, w), mode="bilinear", align_corners=False, antialias=True)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x if batched else x[0]
