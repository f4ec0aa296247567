"""Estimator parameters read from ``__init__``'s signature, as ``sklearn.base.BaseEstimator`` does.

A class whose ``__init__`` takes keyword arguments and stores each one unchanged under its own
name gets ``get_params``, ``set_params`` and a ``repr`` listing the non-default values, with the
parameter list written once: in the signature.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["FIT_PARAMS", "SCORE_PARAMS", "SETTINGS", "ParamsMixin", "check_settable"]

#: Parameters that shape the memory bank (what is extracted, kept and how): fixed once fitted.
FIT_PARAMS = (
    "backbone",
    "layers",
    "weights",
    "image_size",
    "scale",
    "augment",
    "coreset_ratio",
    "max_bank_size",
    "sampling",
    "projection_dim",
    "feature_dtype",
    "backbone_dtype",
    "embed_dim",
    "kernel_size",
    "seed",
)
#: Parameters that change what a score or a map means (the image score's rule, the maps' blur):
#: free on a fitted model, fixed once a threshold (image or region) was chosen with them.
SCORE_PARAMS = ("top_k", "num_neighbors", "sigma")
#: Scoring settings: settable at any time, effective at the next call.
SETTINGS = ("batch_size", "device", "progress", "search_precision")


class ParamsMixin:
    """``get_params`` / ``set_params`` / ``__repr__`` from the signature of ``__init__``."""

    @classmethod
    def _param_names(cls) -> list[str]:
        """Keyword parameters of ``__init__``, in signature order."""
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, as given."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Any:
        """Set constructor arguments by name.

        Learned state is not updated; an estimator may refuse changes its fitted state does
        not allow (PatchCore: :func:`check_settable`).

        Returns:
            self
        """
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"invalid parameter {name!r} for {type(self).__name__}; valid parameters: "
                    + ", ".join(valid)
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
        }
        changed = [
            f"{k}={v!r}"
            for k, v in self.get_params().items()
            if not _same(v, defaults.get(k, inspect.Parameter.empty))
        ]
        return f"{type(self).__name__}({', '.join(changed)})"


def check_settable(det: Any, params: dict[str, Any]) -> None:
    """Refuse (``ValueError``) a change of a :data:`FIT_PARAMS` parameter on a fitted
    estimator, or of a :data:`SCORE_PARAMS` one once a threshold exists; the message names the
    parameter and what to do. Setting a parameter to its current value is always allowed."""
    state = getattr(det, "state_", None)
    if state is None:
        return
    name = type(det).__name__
    for key, value in params.items():
        if _same(value, getattr(det, key, inspect.Parameter.empty)):
            continue
        if key in FIT_PARAMS:
            raise ValueError(
                f"{key} is fixed by fit: this {name} was fitted with {key}="
                f"{getattr(det, key)!r}, and set_params({key}={value!r}) would score against a "
                f"bank built without it; fit again ({name}(**{{**det.get_params(), {key!r}: "
                "...}).fit(images)) or use a new estimator"
            )
        thresholds = (state.threshold, state.region_threshold)
        if key in SCORE_PARAMS and any(t is not None for t in thresholds):
            raise ValueError(
                f"{key} changes what a score or map means, and this {name}'s threshold was "
                f"chosen with {key}={getattr(det, key)!r}; call clear_threshold() first, then "
                f"set_params({key}={value!r}) and calibrate again (or use a new estimator)"
            )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - e.g. arrays: show them
        return False
