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

# numpy-only pieces live in .pixels (shared with the torch-free runtime); re-exported here
from patchcore.lean.pixels import (
    IMAGE_SUFFIXES,
    ImageReadError,
    ImageTooLargeError,
    InputLimits,
    _array_to_float,
    _check_unit_range,
    input_limits,
    list_images,
    output_size,
    pil_to_array,
    read_image,
    set_input_limits,
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
    """Convert any accepted input to a float32 tensor 3xHxW with values in [0, 1]."""
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        image = read_image(image)
    if isinstance(image, Image.Image):
        image = pil_to_array(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            raise ImageReadError(name, f"array shape {arr.shape} looks channel-first; give HxWxC")
        t = torch.from_numpy(np.ascontiguousarray(_array_to_float(arr, name)))
        if t.ndim == 3:
            t = t.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif t.dtype == torch.bool:
            t = t.float()
        elif t.is_floating_point():
            t = t.float()
            if not bool(torch.isfinite(t).all()):
                raise ImageReadError(name, "tensor contains NaN or infinite values")
            _check_unit_range(float(t.min()), float(t.max()), name)
        else:
            raise ImageReadError(name, f"unsupported tensor dtype {t.dtype}")
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; give a path, PIL image, "
            "numpy array or torch tensor"
        )
    shape = tuple(image.shape)  # as given, for messages
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise ImageReadError(name, f"expected HxW, HxWxC or CxHxW, got shape {tuple(t.shape)}")
    c = t.shape[0]
    if c == 1:
        t = t.expand(3, -1, -1)
    elif c == 4:
        t = t[:3]
    elif c == 2:  # grey + alpha
        t = t[:1].expand(3, -1, -1)
    elif c != 3:
        hint = (
            ""
            if min(t.shape) <= 4
            else f"; if this is a stack of {shape[0]} greyscale images, pass a list of them or "
            + (
                "an (N, 1, H, W) tensor"
                if isinstance(image, torch.Tensor)
                else "an (N, H, W, 1) array"
            )
        )
        raise ImageReadError(name, f"{c} channels; expected 1, 3 or 4{hint}")
    if t.shape[1] < 8 or t.shape[2] < 8:
        raise ImageReadError(name, f"image of {t.shape[1]}x{t.shape[2]} pixels is too small")
    input_limits().check(name, int(t.shape[1]), int(t.shape[2]))
    return t.contiguous()


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize CxHxW or BxCxHxW bilinearly with antialiasing (identity when the size matches).

    The antialiased resize runs the width pass first, through an (H_in, W_out) intermediate: for
    a tall strip (8 x 3,000,000 to 128 x 128: 384 M values, 42 s) the height pass is run first
    instead, as its own call (the same separable filter; values within ~3e-6).
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
