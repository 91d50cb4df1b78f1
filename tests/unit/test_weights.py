"""Weights manifest and resolver: order, checksums, cache, download, verify_all."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from models import weights as W
from models.weights import ChecksumMismatch, WeightsNotFound

REPO_ROOT = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def manifest() -> dict[str, W.WeightSpec]:
    return W.load_manifest()


@pytest.fixture
def empty_dirs(tmp_path: Path) -> tuple[Path, Path]:
    models, cache = tmp_path / "models", tmp_path / "cache"
    models.mkdir()
    cache.mkdir()
    return models, cache


@pytest.fixture
def small_spec(tmp_path: Path, models_dir: Path) -> W.WeightSpec:
    """A manifest entry for a real small file (YuNet, 230 kB) served from a file:// URL."""
    src = models_dir / "face_detection_yunet_2023mar.onnx"
    return W.WeightSpec(name="tiny", file="tiny.onnx", sha256=_sha(src), url=src.as_uri(),
                        licence="MIT", kind="detector")


# --- manifest ----------------------------------------------------------------
def test_manifest_lists_every_model(manifest: dict[str, W.WeightSpec]) -> None:
    assert {"yunet", "sface", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "facenet_vggface2",
            "minifasnet_v2", "minifasnet_v1se"} <= set(manifest)
    for name, spec in manifest.items():
        assert spec.name == name
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.url.startswith("https://") and spec.file and spec.kind and spec.licence
    assert manifest["mtcnn_pnet"].package == "facenet_pytorch"
    assert manifest["mtcnn_pnet"].package_path == "data/pnet.pt"
    assert manifest["yunet"].package is None


def test_manifest_default_path_is_repo_config() -> None:
    assert W.DEFAULT_MANIFEST == REPO_ROOT / "configs" / "weights.yaml"
    assert W.load_manifest(REPO_ROOT / "configs" / "weights.yaml") == W.load_manifest()


def test_shared_files_match_manifest(manifest: dict[str, W.WeightSpec], models_dir: Path) -> None:
    for name in ("yunet", "sface", "minifasnet_v2", "minifasnet_v1se"):
        assert W.sha256_file(models_dir / manifest[name].file) == manifest[name].sha256


# --- resolution order --------------------------------------------------------------
def test_models_dir_from_env(models_dir: Path) -> None:
    assert os.environ["FACE_MODELS_DIR"]  # set by conftest
    got = W.resolve_weights("yunet", allow_download=False)
    assert got.source == "FACE_MODELS_DIR"
    assert got.path == Path(os.environ["FACE_MODELS_DIR"]) / "face_detection_yunet_2023mar.onnx"


def test_models_dir_argument_beats_env(tmp_path: Path, models_dir: Path, empty_dirs) -> None:
    models, cache = empty_dirs
    shutil.copy(models_dir / "face_detection_yunet_2023mar.onnx", models)
    got = W.resolve_weights("yunet", models_dir=models, cache_dir=cache, allow_download=False)
    assert (got.source, got.path) == ("FACE_MODELS_DIR", models / "face_detection_yunet_2023mar.onnx")


def test_package_data_used_when_models_dir_lacks_file(empty_dirs, no_network) -> None:
    models, cache = empty_dirs
    got = W.resolve_weights("mtcnn_pnet", models_dir=models, cache_dir=cache)
    assert got.source == "package"
    assert got.path.parts[-3:] == ("facenet_pytorch", "data", "pnet.pt")


def test_models_dir_beats_package(empty_dirs) -> None:
    models, cache = empty_dirs
    pkg = W.resolve_weights("mtcnn_pnet", models_dir=models, cache_dir=cache).path
    shutil.copy(pkg, models / "pnet.pt")
    got = W.resolve_weights("mtcnn_pnet", models_dir=models, cache_dir=cache)
    assert got.source == "FACE_MODELS_DIR"


def test_cache_used_last(tmp_path: Path, empty_dirs, small_spec: W.WeightSpec, no_network) -> None:
    models, cache = empty_dirs
    shutil.copy(Path(small_spec.url.removeprefix("file://")), cache / small_spec.file)
    got = W.resolve_weights("tiny", models_dir=models, cache_dir=cache, manifest={"tiny": small_spec})
    assert (got.source, got.path) == ("cache", cache / "tiny.onnx")


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FACE_WEIGHTS_CACHE", str(tmp_path / "c"))
    assert W.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FACE_WEIGHTS_CACHE")
    assert W.default_cache_dir() == Path.home() / ".cache" / "faceserve" / "weights"


# --- checksums ------------------------------------------------------------------
def test_wrong_checksum_in_models_dir_is_refused(empty_dirs, models_dir: Path) -> None:
    models, cache = empty_dirs
    wrong = models / "face_detection_yunet_2023mar.onnx"
    shutil.copy(models_dir / "NOTICE.md", wrong)  # a small real file under the right name
    with pytest.raises(ChecksumMismatch) as err:
        W.resolve_weights("yunet", models_dir=models, cache_dir=cache, allow_download=False)
    e = err.value
    assert e.details["file"] == str(wrong)
    assert e.details["expected"] == W.load_manifest()["yunet"].sha256
    assert e.details["actual"] == _sha(wrong)
    assert str(wrong) in e.message and e.details["expected"] in e.message and e.details["actual"] in e.message


def test_wrong_file_does_not_fall_through_to_package(empty_dirs, models_dir: Path) -> None:
    """A corrupted file earlier in the order is an error even if a good copy exists later."""
    models, cache = empty_dirs
    shutil.copy(models_dir / "NOTICE.md", models / "pnet.pt")
    with pytest.raises(ChecksumMismatch):
        W.resolve_weights("mtcnn_pnet", models_dir=models, cache_dir=cache, allow_download=False)


def test_wrong_checksum_in_cache_is_refused(empty_dirs, small_spec: W.WeightSpec, models_dir: Path) -> None:
    models, cache = empty_dirs
    shutil.copy(models_dir / "NOTICE.md", cache / small_spec.file)
    with pytest.raises(ChecksumMismatch):
        W.resolve_weights("tiny", models_dir=models, cache_dir=cache, manifest={"tiny": small_spec})


def test_rewritten_file_is_rehashed(tmp_path: Path, empty_dirs, models_dir: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    models, cache = empty_dirs
    target = models / "face_detection_yunet_2023mar.onnx"
    shutil.copy(models_dir / target.name, target)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(W.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    W.resolve_weights("yunet", models_dir=models, cache_dir=cache, allow_download=False)
    W.resolve_weights("yunet", models_dir=models, cache_dir=cache, allow_download=False)
    assert len(calls) == 1  # second load served from the (path, size, mtime) cache
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different content, new mtime
    target.write_bytes(bytes(data))
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    with pytest.raises(ChecksumMismatch):
        W.resolve_weights("yunet", models_dir=models, cache_dir=cache, allow_download=False)
    assert len(calls) == 2


def test_explicit_path_is_checked(models_dir: Path) -> None:
    ok = W.verify_file("yunet", models_dir / "face_detection_yunet_2023mar.onnx")
    assert ok.source == "explicit"
    with pytest.raises(ChecksumMismatch):
        W.verify_file("yunet", models_dir / "NOTICE.md")
    with pytest.raises(WeightsNotFound):
        W.verify_file("yunet", models_dir / "missing.onnx")


# --- download -----------------------------------------------------------------------
def test_download_into_cache(empty_dirs, small_spec: W.WeightSpec) -> None:
    models, cache = empty_dirs
    manifest = {"tiny": small_spec}
    got = W.resolve_weights("tiny", models_dir=models, cache_dir=cache, manifest=manifest)
    assert (got.source, got.path) == ("cache", cache / "tiny.onnx")
    assert _sha(got.path) == small_spec.sha256
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.onnx"]  # no temp files left
    # Second time: from the cache, the URL is not needed any more.
    gone = replace(small_spec, url=(cache / "nowhere").as_uri())
    again = W.resolve_weights("tiny", models_dir=models, cache_dir=cache, manifest={"tiny": gone})
    assert again.source == "cache"


def test_download_with_wrong_checksum_leaves_nothing(empty_dirs, small_spec: W.WeightSpec) -> None:
    models, cache = empty_dirs
    bad = replace(small_spec, sha256="0" * 64)
    with pytest.raises(ChecksumMismatch):
        W.resolve_weights("tiny", models_dir=models, cache_dir=cache, manifest={"tiny": bad})
    assert list(cache.iterdir()) == []


def test_unreachable_url_gives_weights_not_found(empty_dirs, small_spec: W.WeightSpec) -> None:
    models, cache = empty_dirs
    # Port 9 (discard) on loopback: connection refused at once, no network needed.
    spec = replace(small_spec, url="http://127.0.0.1:9/tiny.onnx")
    with pytest.raises(WeightsNotFound) as err:
        W.resolve_weights("tiny", models_dir=models, cache_dir=cache, manifest={"tiny": spec})
    assert "download" in err.value.message and str(cache / "tiny.onnx") in err.value.message
    assert list(cache.iterdir()) == []


def test_nothing_found_lists_places_tried(empty_dirs, no_network) -> None:
    models, cache = empty_dirs
    with pytest.raises(WeightsNotFound) as err:
        W.resolve_weights("facenet_vggface2", models_dir=models, cache_dir=cache, allow_download=False)
    tried = err.value.details["tried"]
    assert any(str(models) in t for t in tried) and any(str(cache) in t for t in tried)
    assert str(models) in err.value.message


def test_unknown_name() -> None:
    with pytest.raises(WeightsNotFound):
        W.resolve_weights("no_such_model", allow_download=False)


# --- verify_all --------------------------------------------------------------------------
def test_verify_all_reports_every_entry_without_downloading(empty_dirs, models_dir: Path, no_network) -> None:
    _, cache = empty_dirs
    rows = W.verify_all(models_dir=models_dir, cache_dir=cache)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(W.load_manifest())
    for name in ("yunet", "sface", "minifasnet_v2", "minifasnet_v1se"):
        assert by_name[name]["ok"] and by_name[name]["source"] == "FACE_MODELS_DIR"
        assert by_name[name]["path"] == str(models_dir / by_name[name]["file"])
    for name in ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"):
        assert by_name[name]["ok"] and by_name[name]["source"] == "package"
    fn = by_name["facenet_vggface2"]
    assert fn["ok"] is False and fn["error_code"] == "weights_not_found" and fn["file"] == "20180402-114759-vggface2.pt"
    assert "error" in fn and "path" not in fn


def test_verify_all_reports_bad_checksum(empty_dirs, models_dir: Path) -> None:
    models, cache = empty_dirs
    shutil.copy(models_dir / "NOTICE.md", models / "face_recognition_sface_2021dec.onnx")
    rows = {r["name"]: r for r in W.verify_all(models_dir=models, cache_dir=cache, names=["sface", "mtcnn_onet"])}
    assert rows["sface"]["ok"] is False and rows["sface"]["error_code"] == "checksum_mismatch"
    assert rows["mtcnn_onet"]["ok"] is True


# --- packaging ----------------------------------------------------------------------------
def test_models_package_imports_without_ray() -> None:
    code = ("import sys, models.weights, models.images, models.alignment, models.detection, "
            "models.embedding, models.pipeline, models.working_image; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)
