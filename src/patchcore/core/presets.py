"""Named detector configurations: each preset only fills :class:`~patchcore.PatchCore` keywords.

A preset names an outcome (``fast``, ``balanced``, ``accurate``) and is nothing but a dict of
constructor arguments, so a detector built from one has the usual ``get_params`` and saves,
loads and clones like any other: ``PatchCore.from_preset("accurate", seed=1)`` equals
``PatchCore(**preset_params("accurate"), seed=1)``. What each preset gives (image AUROC per set,
cost) is measured by ``benchmarks/search_accuracy.py`` and kept in benchmarks/RESULTS.md
("Accuracy search" and "Presets"), not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named set of PatchCore keyword arguments and what it was measured to give."""

    name: str
    params: MappingProxyType = field(repr=False)
    summary: str


def _preset(name: str, summary: str, **params: Any) -> Preset:
    return Preset(name, MappingProxyType(params), summary)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset(
            "fast",
            "efficientnet-lite0 at half resolution (scale 0.5: a quarter of the patches and of "
            "the search); for defects many pixels wide only: defects a few pixels wide (deeppcb) "
            "vanish at half resolution (benchmarks/RESULTS.md, Presets)",
            backbone="efficientnet-lite0",
            scale=0.5,
            top_k=10,
        ),
        _preset(
            "balanced",
            "efficientnet-lite0 (stage3 + stage5, native resolution) with the top-10 mean: the "
            "default before 2026-12-07: about 0.75x the defaults' scoring time for 0.0085 less "
            "mean image AUROC (benchmarks/RESULTS.md, Presets)",
            backbone="efficientnet-lite0",
            top_k=10,
        ),
        _preset(
            "accurate",
            "the defaults: efficientnet-lite2, stage3 + stage5, native resolution, image score "
            "= mean of the 10 largest patch distances; the best mean image AUROC of the "
            "configurations within 1.5x the time (benchmarks/RESULTS.md, Presets)",
            backbone="efficientnet-lite2",
            top_k=10,
        ),
    )
}
"""Every preset, by name: the one place they are listed."""


def preset_params(name: str) -> dict[str, Any]:
    """The PatchCore keyword arguments of preset ``name`` (a new dict each call).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return dict(PRESETS[name].params)
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


#: Parameters that are one choice: giving one of them drops the preset's others.
_ONE_CHOICE = (frozenset({"image_size", "scale"}),)


def with_preset(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Preset ``name``'s keyword arguments with the explicitly ``given`` ones on top.

    Giving ``image_size`` drops a preset's ``scale`` and vice versa (one choice of input size):
    ``with_preset("fast", {"image_size": 224})`` has no ``scale``.

    Raises:
        ValueError: an unknown name.
    """
    params = preset_params(name)
    for group in _ONE_CHOICE:
        if group & given.keys():
            for key in group:
                params.pop(key, None)
    return {**params, **given}
