"""Incremental updates: add normal images to a fitted detector without refitting it.

:meth:`UpdateMixin.partial_fit` embeds only the new images and continues the greedy coreset
from the existing bank (:func:`patchcore.core.sampling.extend_coreset`): every new patch starts at
its distance to the current bank, and the greedy takes ``coreset_ratio`` of the new patches
(the rate ``fit`` keeps), the new patches farthest from what the bank already covers. Time is
proportional to the new images (their features, one distance scan against the bank, the
coreset's linear stages).

The ``max_bank_size`` cap keeps its meaning: when the old bank plus the new rows exceed it, the
cap is re-selected by the greedy (:func:`patchcore.core.sampling.chunked_greedy_coreset`, which for
so few rows is the exact greedy) over old bank rows and new rows together, so the bank stays at
the cap and keeps the rows that cover the most. Old training patches are then represented by
their bank rows only (their features are not kept).

Mixed into :class:`patchcore.PatchCore` (as :mod:`patchcore.core.verdicts`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from datetime import UTC, datetime
from typing import Any

import torch

from patchcore.core import sampling
from patchcore.core.inputs import as_list, check_on_error, warn_skipped
from patchcore.lean import ood

__all__ = ["BEFORE_UPDATE", "UpdateMixin"]

#: Appended to ``threshold_method_`` when a calibrated detector's bank changes.
BEFORE_UPDATE = " (calibrated before an update)"


class UpdateMixin:
    """``partial_fit``: add normal images to the memory bank, recorded in ``updates_``."""

    def partial_fit(
        self, images: Any, y: Any = None, *, on_error: str = "raise", progress: bool | None = None
    ) -> Any:
        """Add normal images to the fitted memory bank (greedy continued from the bank).

        Arguments as in ``fit``; an image skipped with ``on_error="skip"`` is recorded in the
        update.

        The bank gains ``coreset_ratio`` of the new patches (``sampling="random"``: a seeded
        random share), re-selected down to ``max_bank_size`` by the greedy when over it (see
        the module docstring). A threshold set before is kept, with a warning, and
        ``threshold_method_`` says it predates the update: calibrate again. One record is
        appended to ``updates_`` (and saved with the model): UTC time, images, patches, bank
        rows added and dropped, bank size, seconds, the images' names. The images' content
        digests join ``train_digests_`` (so calibration and evaluation leave them out) and
        their sizes and pixel statistics widen ``input_profile_``.

        Returns:
            self
        """
        self._check_fitted("partial_fit")  # type: ignore[attr-defined]
        check_on_error(on_error)
        items = as_list(images)
        if not items:
            raise ValueError("partial_fit needs at least one image, got none")
        progress = self.progress if progress is None else bool(progress)  # type: ignore[attr-defined]
        state = self.state_  # type: ignore[attr-defined]
        first = len(state.train_names) if state.train_names is not None else state.n_train_images
        t0 = time.perf_counter()
        found = self._features(items, on_error, progress, "update: features", first_image=first)  # type: ignore[attr-defined]
        return self._extend(found, first, progress, time.perf_counter() - t0)

    def _extend(self, found: Any, first: int, progress: bool, feature_seconds: float) -> Any:
        """The bank step of :meth:`partial_fit` on the new images' ``TrainingFeatures``
        (``first``: the training-image index of the first new image)."""
        t1 = time.perf_counter()
        state = self.state_  # type: ignore[attr-defined]
        old = state.memory_bank
        new_idx = self._added_rows(found.features, progress)
        bank = torch.cat([old, found.features[new_idx].float()])
        prov = None
        if state.provenance is not None:
            prov = torch.cat([state.provenance, found.provenance(new_idx, first)])
        cap = self.max_bank_size  # type: ignore[attr-defined]
        if cap is not None and bank.shape[0] > int(cap):
            keep = self._reselect(bank, int(cap), progress)
            bank = bank[keep].contiguous()
            prov = prov[keep] if prov is not None else None
            added = int((keep >= old.shape[0]).sum())
        else:
            added = int(new_idx.numel())
        dropped = old.shape[0] + added - bank.shape[0]
        t2 = time.perf_counter()
        record = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "images": len(found.names),
            "patches": int(found.features.shape[0]),
            "rows_added": added,
            "rows_dropped": int(dropped),
            "bank_size": int(bank.shape[0]),
            "seconds": round(feature_seconds + t2 - t1, 3),
            "feature_seconds": round(feature_seconds, 3),
            "first_image": first,
            "names": list(found.names),
            "skipped": [s.name for s in found.skipped],
            "threshold_before": state.threshold,
        }
        method = state.threshold_method
        if state.threshold is not None:
            warnings.warn(
                f"the threshold {state.threshold:.6g} ({method}) was calibrated before this "
                "update: the scores it was chosen on have changed; calibrate again",
                UserWarning,
                stacklevel=3,  # partial_fit's caller
            )
            if method is not None and not method.endswith(BEFORE_UPDATE):
                method += BEFORE_UPDATE
        names = state.train_names + found.names if state.train_names is not None else None
        grids = state.train_grids + found.grids if state.train_grids is not None else None
        old_digests = state.train_digests  # a file from before digests: the old ones unknown
        if old_digests is None:
            old_digests = [None] * (len(state.train_names or []) or state.n_train_images)
        digests = old_digests + list(found.digests)
        profile = state.input_profile
        if profile is not None and found.stats:
            profile = ood.merge(profile, ood.profile([g[:2] for g in found.grids], found.stats))
        new_state = dataclasses.replace(
            state,
            memory_bank=bank,
            n_train_images=state.n_train_images + len(found.names),
            n_train_patches=state.n_train_patches + int(found.features.shape[0]),
            threshold_method=method,
            provenance=prov,
            train_names=names,
            train_grids=grids,
            updates=[*state.updates, record],
            train_digests=digests,
            input_profile=profile,
        )
        self._set_fitted(new_state, self.extractor_)  # type: ignore[attr-defined]
        warn_skipped("partial_fit skipped {n} unreadable image(s)", found.skipped, stacklevel=4)
        return self

    def _added_rows(self, features: torch.Tensor, progress: bool) -> torch.Tensor:
        """Indices of the new patches added to the bank (before any re-selection at the cap)."""
        num = int(features.shape[0])
        n = sampling.coreset_size(num, float(self.coreset_ratio))  # type: ignore[attr-defined]
        if n >= num:
            return torch.arange(num)
        if self.sampling == "random":  # type: ignore[attr-defined]
            return sampling.random_subsample(num, n, seed=self._update_seed())
        bank = self.state_.memory_bank  # type: ignore[attr-defined]
        return sampling.extend_coreset(features, n, bank=bank, progress=progress).indices

    def _update_seed(self) -> int:
        """The seed of this update's sampling: one per update, none equal to fit's."""
        return int(self.seed) + 1 + len(self.state_.updates)  # type: ignore[attr-defined]

    def _reselect(self, bank: torch.Tensor, cap: int, progress: bool) -> torch.Tensor:
        """``cap`` rows of old bank + new rows, by the greedy (or seeded random subsampling)."""
        seed = self._update_seed()
        if self.sampling == "random":  # type: ignore[attr-defined]
            keep = sampling.random_subsample(bank.shape[0], cap, seed=seed)
        else:
            keep = sampling.chunked_greedy_coreset(bank, cap, seed=seed, progress=progress).indices
        return keep.sort().values  # old rows first, in their order
