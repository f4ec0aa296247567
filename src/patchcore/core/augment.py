"""Bank augmentation: the training images are also embedded mirrored or turned.

``PatchCore(augment="flips")`` or ``augment="rot90"`` adds, for every training image, the patch
features of its mirrored (left-right, up-down) or turned (quarter, half, three-quarter turn)
copies to the coreset's input, so that the memory bank holds normal patches in every
orientation the part may show in use; test images are scored as they come. A *view* is
``(mirror, turns)``: mirror left-right first when ``mirror``, then turn ``turns`` quarter turns
(``torch.rot90`` over the last two axes). The identity view comes first.

Which kinds of part it helps, and what it costs, is measured in benchmarks/RESULTS.md
("Leads of issue #23").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patchcore.core.explain import bank_provenance

__all__ = ["AUGMENTS", "View", "apply", "origins", "provenance", "views"]

View = tuple[bool, int]

AUGMENTS: dict[str, tuple[View, ...]] = {
    "flips": ((False, 0), (True, 0), (True, 2)),  # as is, left-right, up-down mirror
    "rot90": ((False, 0), (False, 1), (False, 2), (False, 3)),
}
"""The views of each augmentation (``PatchCore(augment=...)``); ``None`` is the image alone."""


def views(augment: str | None) -> tuple[View, ...]:
    """The views of ``augment``, identity first.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if augment is None:
        return ((False, 0),)
    try:
        return AUGMENTS[augment]
    except (KeyError, TypeError):
        raise ValueError(
            f"augment must be None or one of {', '.join(map(repr, AUGMENTS))}, got {augment!r}"
        ) from None


def apply(x: torch.Tensor, view: View) -> torch.Tensor:
    """``x`` (..., H, W) seen in ``view``: mirrored left-right first, then turned."""
    mirror, turns = view
    if mirror:
        x = x.flip(-1)
    return x.rot90(turns, (-2, -1)) if turns % 4 else x


def provenance(
    indices: torch.Tensor,
    pieces: Sequence[tuple[int, View, int, int]],
    first_image: int = 0,
) -> torch.Tensor:
    """Origins of selected patch rows in the images' own feature grids: (image, row, column).

    Args:
        indices: (M,) int indices into the rows of ``pieces``, laid out piece after piece and
            row-major within a piece (as the fit's feature store holds them).
        pieces: per stored piece, ``(image, view, h, w)``: the training image's position, the
            view it was embedded in and the (h, w) feature grid of the image as it is (a turned
            view's grid is (w, h)).
        first_image: added to every image position.

    Returns:
        (M, 3) int32: image index, row and column in the image's own grid; a mirrored or
        turned copy's patch is located where it came from.
    """
    if not len(pieces):
        raise ValueError("pieces is empty: no training image to locate the rows in")
    seen = [(0, 0, h, w) if v[1] % 2 == 0 else (0, 0, w, h) for _, v, h, w in pieces]
    at = bank_provenance(indices, seen).to(torch.int64)  # (piece, row, column) in the view
    piece = at[:, 0]
    local = at[:, 1] * torch.tensor([g[3] for g in seen])[piece] + at[:, 2]
    shapes = {key: k for k, key in enumerate(dict.fromkeys(p[1:] for p in pieces))}
    shape_of = torch.tensor([shapes[p[1:]] for p in pieces], dtype=torch.int64)[piece]
    flat = torch.empty_like(local)
    for (view, h, w), k in shapes.items():
        # entry j of the view's grid holds the image's own grid position origin[j]
        origin = apply(torch.arange(h * w).view(h, w), view).reshape(-1)
        mask = shape_of == k
        flat[mask] = origin[local[mask]]
    image = torch.tensor([p[0] for p in pieces], dtype=torch.int64)[piece] + first_image
    width = torch.tensor([p[3] for p in pieces], dtype=torch.int64)[piece]
    return torch.stack([image, flat // width, flat % width], 1).to(torch.int32)


def origins(
    indices: torch.Tensor,
    grids: Sequence[tuple[int, int, int, int]],
    pieces: Sequence[tuple[int, View, int, int]] | None,
    first_image: int = 0,
) -> torch.Tensor:
    """(M, 3) int32 origins (image, row, column) of training rows ``indices``: laid out image
    by image over ``grids`` (``(H, W, h, w)`` each) when ``pieces`` is None, else as
    :func:`provenance`."""
    if pieces is None:
        return bank_provenance(indices, grids, first_image)
    return provenance(indices, pieces, first_image)
