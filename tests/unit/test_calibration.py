"""Similarity <-> estimated FMR mapping (models/calibration.py) and the shipped SFace table."""
from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from models.alignment import align_face
from models.calibration import FMR_FLOOR, Calibration, from_points, load_calibration

TOY = [(0.5, 0.1), (1e-1, 0.2), (1e-2, 0.26), (1e-3, 0.3), (1e-4, 0.38), (1e-5, 0.44), (1e-6, 0.5)]


@pytest.fixture(scope="module")
def toy() -> Calibration:
    return from_points("toy", TOY)


def test_table_points_are_exact(toy: Calibration) -> None:
    for fmr, thr in TOY:
        assert toy.threshold_for(fmr) == pytest.approx(thr, abs=1e-12)
        assert toy.fmr_at(thr) == pytest.approx(fmr, rel=1e-9)


def test_log_linear_between_points(toy: Calibration) -> None:
    # Half way in log10 between 1e-3 and 1e-4 is half way in similarity.
    assert toy.threshold_for(10 ** -3.5) == pytest.approx(0.34)
    assert toy.fmr_at(0.34) == pytest.approx(10 ** -3.5)


def test_round_trip_and_monotone(toy: Calibration) -> None:
    fmrs = np.logspace(math.log10(0.5), -6, 200)
    thr = [toy.threshold_for(f) for f in fmrs]
    assert all(b > a for a, b in zip(thr, thr[1:]))  # lower FMR -> higher threshold
    for f, t in zip(fmrs, thr):
        assert toy.fmr_at(t) == pytest.approx(f, rel=1e-9)
    sims = np.linspace(-1, 1, 401)
    est = [toy.fmr_at(s) for s in sims]
    assert all(b <= a for a, b in zip(est, est[1:]))  # higher similarity -> lower FMR


def test_outside_the_table(toy: Calibration) -> None:
    assert toy.fmr_at(-1.0) == 1.0  # extended below the lowest point, capped at 1
    assert toy.fmr_at(0.56) == pytest.approx(1e-7)  # last segment extended: 0.06 per decade
    assert toy.fmr_at(1.0) == FMR_FLOOR
    for bad in (1e-7, 0.9, 0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            toy.threshold_for(bad)
    with pytest.raises(ValueError):
        toy.fmr_at(float("nan"))


def test_rejects_bad_tables() -> None:
    with pytest.raises(ValueError):
        from_points("x", [(1e-2, 0.3), (1e-3, 0.2)])  # threshold falls as FMR falls
    with pytest.raises(ValueError):
        from_points("x", [(1e-2, 0.3), (1e-2, 0.4)])  # repeated FMR
    with pytest.raises(ValueError):
        from_points("x", [(1.5, 0.1), (1e-2, 0.3)])
    with pytest.raises(ValueError):
        from_points("x", [(1e-2, 0.3)])


def test_load(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": "toy", "points": TOY, "method": "test"}))
    cal = load_calibration("toy", p)
    assert cal.table() == TOY and cal.meta == {"method": "test"}
    with pytest.raises(ValueError):
        load_calibration("sface", p)  # calibrates another model
    with pytest.raises(ValueError):
        load_calibration("nope", tmp_path / "missing.json")


def test_shipped_sface_table() -> None:
    cal = load_calibration("sface")
    assert cal.min_fmr <= 1e-6 and cal.max_fmr >= 1e-2
    for f in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        assert 0.0 < cal.threshold_for(f) < 1.0
    # OpenCV's published SFace threshold falls inside the table's range.
    assert 1e-6 < cal.fmr_at(0.363) < 1e-2


def test_shipped_table_against_the_test_photos(yunet, sface, load_rgb, detect_cached,
                                               people_photos: list[Path]) -> None:
    """Clean photos of the same person land far below FMR 1e-4; different
    people stay above it (15 photos, 6 people: 16 same / 89 different pairs)."""
    cal = load_calibration("sface")
    embs = []
    for p in people_photos:
        rgb = load_rgb(p)
        face = detect_cached(yunet, p, rgb)[0]
        embs.append(sface.embed(align_face(rgb, face.landmarks)[None])[0])
    same, diff = [], []
    for (i, a), (j, b) in combinations(enumerate(people_photos), 2):
        (same if a.parent == b.parent else diff).append(cal.fmr_at(float(embs[i] @ embs[j])))
    assert len(same) == 16 and len(diff) == 89
    assert max(same) < 1e-5
    assert min(diff) > 1e-4
