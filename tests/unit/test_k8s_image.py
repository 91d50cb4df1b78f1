"""One version: the image tag of every faceserve container in k8s/ is
pyproject.toml's version (written by k8s/generate.py), so the image the
Dockerfile builds, faceserve:<version>, is the one the manifests run.
If one of these fails, run `python k8s/generate.py` and commit the result."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.unit.k8s_support import manifests

ROOT = Path(__file__).resolve().parents[2]
M = manifests()
gen = M.load_module("generate")


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _faceserve_images(objs: list[dict]) -> list[tuple[str, str]]:
    found = []
    for where, tmpl in M.all_pod_templates(objs):
        spec = tmpl["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["image"].split(":")[0].rsplit("/", 1)[-1] == "faceserve":
                found.append((f"{where}/{c['name']}", c["image"]))
    return found


def test_generate_reads_the_package_version():
    assert gen.package_version() == _version()


@pytest.mark.parametrize("target", ["base", "dev", "ha", "enroll-folder", "reembed"])
def test_every_faceserve_container_runs_the_package_version(target):
    images = _faceserve_images(M.rendered(target))
    assert images, f"{target}: no faceserve container found"
    wrong = [(where, image) for where, image in images if image != f"faceserve:{_version()}"]
    assert not wrong, (f"image tags differ from pyproject's version {_version()}: {wrong}; "
                       "run `python k8s/generate.py`")


def test_a_version_bump_retags_every_generated_manifest(monkeypatch):
    """Drift is caught: a new version in pyproject makes the committed
    manifests stale (test_k8s_generate then fails until they are regenerated)."""
    monkeypatch.setattr(gen, "package_version", lambda: "9.8.7")
    out = gen.outputs()
    for path in (gen.BASE_RAYSERVICE, gen.HA_PATCH, gen.ENROLL_RAYJOB):
        assert "image: faceserve:9.8.7" in out[path], path
        assert f"faceserve:{_version()}" not in out[path], path
        assert out[path] != path.read_text(), path


def test_a_manifest_without_the_image_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no `image: faceserve"):
        gen.set_image_tag("spec:\n  image: redis:7.4\n", "1.0.0", tmp_path / "x.yaml")


def test_only_faceserve_images_are_retagged():
    text = "- image: faceserve:0.0.1\n  x:\n    image: faceserve:old\n    other: redis:7.4\n" \
           "image: reg.example/faceserve:1\n"
    out = gen.set_image_tag(text, "2.0.0", Path("x.yaml"))
    assert out == ("- image: faceserve:2.0.0\n  x:\n    image: faceserve:2.0.0\n"
                   "    other: redis:7.4\nimage: reg.example/faceserve:1\n")
