"""Shared fixtures for unit tests: test photos, weights, loaded models.

Unit tests never start Ray: the autouse fixture below makes ray.init raise.
Data lives outside the repo in ../shared (override with FACESERVE_SHARED_DIR).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

SHARED_DIR = Path(os.environ.get("FACESERVE_SHARED_DIR")
                  or Path(__file__).resolve().parents[2].parent / "shared")
FACES_DIR = SHARED_DIR / "faces"
PEOPLE_DIR = FACES_DIR / "people"
GROUPS_DIR = FACES_DIR / "groups"
LIVENESS_DIR = FACES_DIR / "liveness"
SHARED_MODELS_DIR = SHARED_DIR / "models"

# Set before any model module resolves weights (module/session fixtures included).
os.environ.setdefault("FACE_MODELS_DIR", str(SHARED_MODELS_DIR))

# Face counts per group image, from ../shared/faces/README.md.
GROUP_COUNTS: dict[str, int] = {
    "obama_and_biden.jpg": 3,
    "kit_with_rose.jpg": 2,
    "two_people.jpg": 2,
    "obama_partial_face.jpg": 1,
    "32bit_rgba.png": 1,
}


def _photos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


PEOPLE_PHOTOS: list[Path] = _photos(PEOPLE_DIR) if PEOPLE_DIR.is_dir() else []
LIVENESS_PHOTOS: list[Path] = _photos(LIVENESS_DIR) if LIVENESS_DIR.is_dir() else []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize by test photo through argument names, so test modules need
    not import this file: ``people_photo`` (a Path under people/, identity =
    its folder name), ``group_image`` (name, expected face count),
    ``liveness_photo`` (a Path)."""
    if "people_photo" in metafunc.fixturenames:
        metafunc.parametrize("people_photo", PEOPLE_PHOTOS, ids=[p.name for p in PEOPLE_PHOTOS])
    if "group_image" in metafunc.fixturenames:
        items = sorted(GROUP_COUNTS.items())
        metafunc.parametrize("group_image", items, ids=[name for name, _ in items])
    if "liveness_photo" in metafunc.fixturenames:
        metafunc.parametrize("liveness_photo", LIVENESS_PHOTOS, ids=[p.name for p in LIVENESS_PHOTOS])


@pytest.fixture(autouse=True)
def _forbid_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests must run without Ray; anything that tries to start it fails."""
    if importlib.util.find_spec("ray") is None:
        return
    import ray

    def _refuse(*_a: object, **_k: object) -> None:
        raise RuntimeError("unit tests must not start Ray (use tests/integration)")

    monkeypatch.setattr(ray, "init", _refuse)
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    if worker is not None and hasattr(worker, "init"):
        monkeypatch.setattr(worker, "init", _refuse)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED_DIR


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    return FACES_DIR


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return SHARED_MODELS_DIR


@pytest.fixture(scope="session")
def people_photos() -> list[Path]:
    assert PEOPLE_PHOTOS, f"no test photos under {PEOPLE_DIR}; set FACESERVE_SHARED_DIR"
    return PEOPLE_PHOTOS


@pytest.fixture(scope="session")
def group_counts() -> dict[str, int]:
    return dict(GROUP_COUNTS)


@pytest.fixture(scope="session")
def load_rgb() -> Callable[[Path], np.ndarray]:
    """Decode a test photo with the production decoder (cached per session)."""
    from models.images import decode_image

    cache: dict[Path, np.ndarray] = {}

    def _load(path: Path) -> np.ndarray:
        if path not in cache:
            cache[path] = decode_image(path.read_bytes())
        return cache[path]

    return _load


# Loaded models are session-scoped: MTCNN takes ~1.5 s and SFace ~1 s to load
# on the 2-core build machine, and they are stateless between calls.
@pytest.fixture(scope="session")
def yunet():
    from models.detection import YuNetDetector

    return YuNetDetector()


@pytest.fixture(scope="session")
def mtcnn():
    from models.detection import MTCNNDetector

    # The build machine's 2 cores are shared: with torch's default (a spinning
    # thread per core) 18 MTCNN calls on face crops took 13-67 s under load,
    # with one thread 2.7 s.
    return MTCNNDetector(torch_threads=1)


@pytest.fixture(scope="session")
def sface():
    from models.embedding import SFaceEmbedder

    return SFaceEmbedder()


@pytest.fixture(scope="session")
def detect_cached() -> Callable[..., list]:
    """detector.detect(photo) memoised per session, for tests that only need a
    full photo's detection as their starting point (crops, comparisons);
    MTCNN takes up to a second per large photo on 2 cores."""
    cache: dict[tuple[str, Path], list] = {}

    def _detect(det, path: Path, rgb: np.ndarray) -> list:
        key = (det.name, path)
        if key not in cache:
            cache[key] = det.detect(rgb)
        return cache[key]

    return _detect


@pytest.fixture(scope="session", params=["yunet", "mtcnn"])
def detector(request: pytest.FixtureRequest):
    """Each test using this runs once per detector."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make any attempt to open a URL fail loudly (there is no network here anyway)."""
    import urllib.request

    def _blocked(*_a: object, **_k: object) -> None:
        raise AssertionError("test tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", _blocked)
    yield
