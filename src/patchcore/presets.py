"""Named detector configurations: each preset only fills :class:`~patchcore.PatchCore` keywords.

A preset names an outcome (``fast``, ``balanced``, ``accurate``) and is nothing but a dict of
constructor arguments, so a detector built from one has the usual ``get_params`` and saves,
loads and clones like any other: ``PatchCore.from_preset("accurate", seed=1)`` equals
``PatchCore(**preset_params("accurate"), seed=1)``. The figures quoted are image AUROC on all
training and test images of the shared sets and the ELPV mono cells, measured by
``benchmarks/search_accuracy.py`` (benchmarks/RESULTS.md, "Accuracy search" and "Presets").
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
            "today's defaults: efficientnet-lite0, stage3 + stage5, native resolution, the "
            "largest patch distance with the paper's eq. 7 reweighting; image AUROC (3 seeds) "
            "casting 0.9735, magnetic_tile 0.9414, deeppcb 0.9210, ELPV mono 0.9610",
        ),
        _preset(
            "balanced",
            "the defaults' embedding and cost, image score = mean of the 10 largest patch "
            "distances; image AUROC (3 seeds) casting 0.9820, magnetic_tile 0.9529, deeppcb "
            "0.9200 (0.0010 below fast), ELPV mono 0.9621: mean 0.9542 against fast's 0.9492",
            top_k=10,
        ),
        _preset(
            "accurate",
            "efficientnet-lite1 (stage3 + stage5, native resolution) with the top-10 mean; "
            "image AUROC (3 seeds) casting 0.9863, magnetic_tile 0.9584, deeppcb 0.9236, "
            "ELPV mono 0.9631: mean 0.9579, the best on every set",
            backbone="efficientnet-lite1",
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
