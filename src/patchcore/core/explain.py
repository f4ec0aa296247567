"""Where each memory-bank row came from, and explanations of an image's score.

Every bank row keeps its provenance: the training image it was taken from (an index into
``state_.train_names``) and its patch row and column on that image's feature grid, an (M, 3)
int32 tensor computed once from the coreset's kept indices (:func:`bank_provenance`), never per
patch. :meth:`ExplainMixin.explain` then answers, for an image, which normal training patch is
nearest to its worst patch: which image, where (in that image's own pixels) and how far.

Mixed into :class:`patchcore.PatchCore` (as :mod:`patchcore.core.verdicts`): it needs the
estimator's ``_batches``, ``_distances``, ``_image_scores``, ``_index`` and ``state_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from patchcore.core.inputs import as_list, check_on_error
from patchcore.core.scoring import worst_patches

__all__ = ["NO_PROVENANCE", "Explanation", "ExplainMixin", "bank_provenance", "cell_box"]

#: The note of an explanation from a model file written before bank rows kept their origin.
NO_PROVENANCE = "no provenance in this model file"

Box = tuple[int, int, int, int]
"""``(top, left, bottom, right)`` in pixels, bottom and right exclusive."""


def bank_provenance(
    indices: torch.Tensor, grids: Sequence[tuple[int, int, int, int]], first_image: int = 0
) -> torch.Tensor:
    """Origins of selected patch rows: (training image, patch row, patch column).

    Args:
        indices: (M,) int indices into the patch rows of ``grids``' images, laid out image by
            image and row-major within an image (as
            :func:`~patchcore.core.embedding.flatten_patches`
            and the fit's feature store lay them out).
        grids: per image ``(H, W, h, w)``: its own size and its (h, w) feature grid.
        first_image: training image index of ``grids[0]``.

    Returns:
        (M, 3) int32: image index (``first_image + position in grids``), row, column.
    """
    if not len(grids):
        raise ValueError("grids is empty: no training image to locate the rows in")
    g = torch.tensor([list(x) for x in grids], dtype=torch.int64)
    counts = g[:, 2] * g[:, 3]
    ends = counts.cumsum(0)
    idx = indices.to(torch.int64).cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= int(ends[-1])):
        raise ValueError(f"indices must be in [0, {int(ends[-1])}) (the patches of the grids)")
    img = torch.searchsorted(ends, idx, right=True)
    local = idx - (ends - counts)[img]
    width = g[img, 3]
    return torch.stack([img + first_image, local // width, local % width], 1).to(torch.int32)


def cell_box(row: int, col: int, grid: tuple[int, int], size: tuple[int, int], radius: int) -> Box:
    """The pixels a patch feature summarises: its grid cell and ``radius`` cells around it.

    A patch feature at grid cell (row, col) averages the ``2 radius + 1`` square of cells
    around it (``kernel_size // 2`` = ``radius``); the (h, w) grid covers the image's own
    (H, W) pixels evenly (the processed image is a resize of it).

    Returns:
        ``(top, left, bottom, right)`` in the image's own pixels, clipped to it.
    """
    (h, w), (height, width) = grid, size
    top = (max(0, row - radius) * height) // h
    left = (max(0, col - radius) * width) // w
    bottom = -((-min(h, row + radius + 1) * height) // h)
    right = -((-min(w, col + radius + 1) * width) // w)
    return (int(top), int(left), int(bottom), int(right))


@dataclass
class Explanation:
    """Why an image scored what it did: its worst patch and the nearest normal training patch.

    Attributes:
        index: position in the input. name: its path, or ``"image #<index>"``.
        score: the image score, as :meth:`PatchCore.score` gives it (higher = more anomalous).
        distance: the worst patch's distance to its nearest bank row (the largest of the
            image's patch distances, whose ``top_k`` largest the score averages; with
            ``top_k=1`` the score before the paper's reweighting).
        patch: (row, col) of the worst patch on the image's feature grid.
        box: the pixels that patch summarises, ``(top, left, bottom, right)`` in the image's
            own pixels (:func:`cell_box`).
        bank_row: the nearest memory-bank row.
        train_index: the training image that row was taken from (None without provenance).
        train_name: its path as given at fit/update, or ``"image #<train_index>"``.
        train_patch: (row, col) on that image's feature grid.
        train_box: the pixels of that patch in the training image's own pixels.
        note: why the training side is missing (:data:`NO_PROVENANCE`), else None.
        error: why the input was skipped (then everything else is None / NaN).
    """

    index: int
    name: str
    score: float
    distance: float
    patch: tuple[int, int] | None = None
    box: Box | None = None
    bank_row: int | None = None
    train_index: int | None = None
    train_name: str | None = None
    train_patch: tuple[int, int] | None = None
    train_box: Box | None = None
    note: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class ExplainMixin:
    """``explain``: each image's worst patch and the training patch nearest to it."""

    @torch.inference_mode()
    def explain(
        self, images: Any, *, on_error: str = "raise", progress: bool | None = None
    ) -> list[Explanation]:
        """The nearest normal training patch of each image's worst patch.

        One scoring pass (the same embedding, search and image score as :meth:`score`, so
        ``score`` matches it); the worst patch's nearest bank row is looked up in float32 and
        traced to its training image through the bank's provenance.

        Args:
            images: paths, PIL images, arrays, tensors, or an ``ImageDataset`` (one image is a
                list of one).
            on_error: ``"raise"`` stops at the first unreadable image; ``"skip"`` returns it
                with ``error`` set.
            progress: show a progress bar; ``None`` = the ``progress`` parameter.

        Returns:
            One :class:`Explanation` per input, in input order. Without provenance (a model
            file written before it existed) the training fields are None and ``note`` says so.
        """
        self._check_fitted("explain")  # type: ignore[attr-defined]
        check_on_error(on_error)
        items = as_list(images)
        progress = self.progress if progress is None else bool(progress)  # type: ignore[attr-defined]
        out: list[Explanation] = []
        for batch in self._batches(items, on_error, progress, "explain"):  # type: ignore[attr-defined]
            out += [Explanation(s.index, s.name, float("nan"), float("nan"), error=s.reason)
                    for s in batch.skipped]  # fmt: skip
            if batch.pixels is not None:
                out += self._explain_batch(batch)
        return sorted(out, key=lambda e: e.index)

    def _explain_batch(self, batch: Any) -> list[Explanation]:
        found = self._distances(batch.pixels)  # type: ignore[attr-defined]
        scores = self._image_scores(found)  # type: ignore[attr-defined]
        h, w = found.grid
        worst = worst_patches(found.patches, found.arg)
        dist, nearest = self._index.search(worst, k=1)  # type: ignore[attr-defined]
        arg = found.arg
        state = self.state_  # type: ignore[attr-defined]
        radius = int(self.kernel_size) // 2  # type: ignore[attr-defined]
        out = []
        for j, i in enumerate(batch.indices):
            row, col = divmod(int(arg[j]), w)
            e = Explanation(
                index=i,
                name=batch.names[j],
                score=float(scores[j]),
                distance=float(dist[j, 0]),
                patch=(row, col),
                box=cell_box(row, col, (h, w), batch.sizes[j], radius),
                bank_row=int(nearest[j, 0]),
            )
            self._trace(e, state, radius)
            out.append(e)
        return out

    @staticmethod
    def _trace(e: Explanation, state: Any, radius: int) -> None:
        """Fill the training side of ``e`` from the bank's provenance (or say why not)."""
        if state.provenance is None:
            e.note = NO_PROVENANCE
            return
        t, r, c = (int(v) for v in state.provenance[e.bank_row])
        e.train_index, e.train_patch = t, (r, c)
        names = state.train_names
        e.train_name = names[t] if names is not None and t < len(names) else f"image #{t}"
        grids = state.train_grids
        if grids is not None and t < len(grids):
            height, width, gh, gw = grids[t]
            e.train_box = cell_box(r, c, (gh, gw), (height, width), radius)
