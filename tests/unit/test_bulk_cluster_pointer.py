"""`faceserve stop` forgets Ray's pointer to our cluster, and only to ours (no Ray started)."""
from __future__ import annotations

from pathlib import Path

import pytest

from serve_app import cluster


@pytest.fixture()
def default_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Ray's default temp dir follows RAY_TMPDIR: keep the real /tmp/ray out of it.
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "default"))
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_pointer_to_our_cluster_is_removed_in_both_places(tmp_path: Path, default_tmp: Path) -> None:
    ours = tmp_path / "ray-ours"
    ours.mkdir()
    (ours / "ray_current_cluster").write_text("127.0.0.1:6390")
    default_tmp.write_text("10.0.0.5:6390\n")
    removed = cluster.forget_cluster(str(ours), 6390)
    assert sorted(removed) == sorted([str(ours / "ray_current_cluster"), str(default_tmp)])
    assert not (ours / "ray_current_cluster").exists() and not default_tmp.exists()


def test_pointer_to_another_cluster_is_kept(tmp_path: Path, default_tmp: Path) -> None:
    default_tmp.write_text("127.0.0.1:6380")
    assert cluster.forget_cluster(str(tmp_path / "none"), 63900) == []
    assert default_tmp.read_text() == "127.0.0.1:6380"
