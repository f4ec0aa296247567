"""The auto preset (``patchcore.core.autoselect.auto_select``) on small real subsets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import data_set

from patchcore.core.autoselect import CANDIDATES, AutoCandidate, auto_select
from patchcore.core.metrics import auroc


def _cand(name: str, cost: float = 1.0, **params) -> AutoCandidate:
    from types import MappingProxyType

    return AutoCandidate(name, MappingProxyType(params), cost, name)


@pytest.fixture(scope="module")
def casting():
    """8 training images; 12 normal and 12 defective test images (calibration)."""
    root = data_set("casting")
    train = sorted((root / "train" / "good").iterdir())[:8]
    good = sorted((root / "test" / "good").iterdir())[:12]
    bad = sorted((root / "test" / "defective").iterdir())[:12]
    return [str(p) for p in train], [str(p) for p in good + bad], np.array([0] * 12 + [1] * 12)


SMALL = {"scale": 0.25, "progress": False}


@pytest.mark.filterwarnings("ignore:backbone .* has RANDOM weights")
def test_the_candidate_with_the_best_calibration_auroc_is_chosen_and_recorded(casting):
    train, calib, y = casting
    cands = [
        _cand("random weights", weights=None, **SMALL),
        _cand("imagenet", **SMALL),
        _cand("imagenet, lite1", backbone="efficientnet-lite1", **SMALL),
    ]
    lines: list[str] = []
    sel = auto_select(train, calib, y, candidates=cands, report=lines.append)
    areas = {r.name: r.calibration_auroc for r in sel.candidates}
    assert all(r.status in ("chosen", "fitted") for r in sel.candidates)
    assert sel.chosen == max(areas, key=lambda n: (areas[n], -list(areas).index(n)))
    assert [r.status for r in sel.candidates].count("chosen") == 1
    # the returned detector is the chosen one, fitted: its calibration AUROC reproduces
    again = auroc(y, sel.detector.score_samples(calib))
    assert again == pytest.approx(areas[sel.chosen], abs=1e-6)
    record = sel.detector.metadata_["auto_preset"]
    assert json.loads(json.dumps(record)) == record
    assert [c["name"] for c in record["candidates"]] == [c.name for c in cands]
    assert record["chosen"] == sel.chosen and record["calibration_images"] == len(calib)
    assert sum("calibration image AUROC" in line for line in lines) == 3


def test_the_budget_runs_the_first_candidate_and_skips_what_would_not_fit(casting):
    train, calib, y = casting
    cands = [_cand("first", **SMALL), _cand("dear", cost=1e6, **SMALL)]
    sel = auto_select(train, calib, y, candidates=cands, budget_seconds=3600)
    assert sel.chosen == "first"
    assert sel.candidates[1].status.startswith("skipped: about")
    assert sel.candidates[1].calibration_auroc is None


def test_bad_requests_are_refused(casting):
    train, calib, y = casting
    five = [_cand(str(i), **SMALL) for i in range(5)]
    with pytest.raises(ValueError, match="1 to 4 candidates, got 5"):
        auto_select(train, calib, y, candidates=five)
    with pytest.raises(ValueError, match="need both labels"):
        auto_select(train, calib, np.zeros(len(calib)), candidates=five[:1])
    with pytest.raises(ValueError, match="24 calibration images but 3 labels"):
        auto_select(train, calib, y[:3], candidates=five[:1])
    with pytest.raises(ValueError, match="budget_seconds must be > 0"):
        auto_select(train, calib, y, candidates=five[:1], budget_seconds=0)


def test_the_default_candidates_are_at_most_four_cheapest_first():
    assert 1 <= len(CANDIDATES) <= 4
    costs = [c.cost for c in CANDIDATES]
    assert costs == sorted(costs) and costs[0] == 1.0
