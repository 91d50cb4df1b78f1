"""Shared test paths: the real photos and weights beside the checkout."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("FACESERVE_SHARED_DIR", REPO_ROOT.parent / "shared"))
FACES_DIR = SHARED_DIR / "faces"
MODELS_DIR = SHARED_DIR / "models"

os.environ.setdefault("FACE_MODELS_DIR", str(MODELS_DIR))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def people() -> dict[str, list[Path]]:
    root = FACES_DIR / "people"
    return {
        d.name: sorted(p for p in d.iterdir() if p.is_file())
        for d in sorted(root.iterdir())
        if d.is_dir()
    }


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    return FACES_DIR
