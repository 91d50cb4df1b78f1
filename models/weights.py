"""Weights manifest (configs/weights.yaml) and the resolver that finds each file.

Resolution order for one entry, every candidate checked against the pinned
sha256 (a mismatch is an error, never a warning, and never falls through to
the next place: a corrupted or swapped file must be noticed):

1. ``FACE_MODELS_DIR/<file>`` (or the ``models_dir`` argument)
2. the package's own data file (``package`` + ``package_path``), e.g. the
   MTCNN weights inside facenet-pytorch's wheel
3. the cache dir (argument, else ``FACE_WEIGHTS_CACHE``, else
   ``~/.cache/faceserve/weights``); downloaded there from ``url`` if missing
   and ``allow_download``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from models.detailed_error import DetailedError


class WeightsError(DetailedError, RuntimeError):
    """Weights that cannot be used: missing, unreadable or not the pinned file."""

    code = "weights_error"


class WeightsNotFound(WeightsError):
    code = "weights_not_found"


class ChecksumMismatch(WeightsError):
    code = "checksum_mismatch"


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO_ROOT / "configs" / "weights.yaml"
ENV_MODELS_DIR = "FACE_MODELS_DIR"
ENV_CACHE_DIR = "FACE_WEIGHTS_CACHE"
DOWNLOAD_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSpec:
    name: str
    file: str
    sha256: str
    url: str
    licence: str
    kind: str
    package: str | None = None
    package_path: str | None = None


@dataclass
class ResolvedWeights:
    spec: WeightSpec
    path: Path
    source: str  # "FACE_MODELS_DIR" | "package" | "cache" (| "explicit" from verify_file)


def load_manifest(path: Path | None = None) -> dict[str, WeightSpec]:
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    entries = doc.get("models")
    if not isinstance(entries, dict):
        raise WeightsError(f"weights manifest {path} has no 'models' mapping", path=str(path))
    specs: dict[str, WeightSpec] = {}
    for name, raw in entries.items():
        try:
            specs[name] = WeightSpec(
                name=name,
                file=str(raw["file"]),
                sha256=str(raw["sha256"]).lower(),
                url=str(raw["url"]),
                licence=str(raw.get("licence", "")),
                kind=str(raw.get("kind", "")),
                package=raw.get("package"),
                package_path=raw.get("package_path"),
            )
        except (KeyError, TypeError) as exc:
            raise WeightsError(f"weights manifest {path}: entry {name!r} is incomplete ({exc})",
                               path=str(path), name=name) from exc
    return specs


# --- hashing ---------------------------------------------------------------
# Keyed by (path, size, mtime_ns): a replaced or rewritten file gets rehashed,
# an unchanged one (e.g. SFace, 38 MB, loaded by every replica) does not.
_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def sha256_file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    return digest


def clear_hash_cache() -> None:
    with _HASH_LOCK:
        _HASH_CACHE.clear()


def _check(spec: WeightSpec, path: Path) -> None:
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise ChecksumMismatch(
            f"weights {spec.name!r}: {path} has sha256 {actual}, expected {spec.sha256}",
            name=spec.name, file=str(path), expected=spec.sha256, actual=actual,
        )


# --- candidate places --------------------------------------------------------
def _package_file(spec: WeightSpec) -> Path | None:
    if not spec.package or not spec.package_path:
        return None
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin:
        return None
    return Path(found.origin).parent / spec.package_path


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env) if env else Path.home() / ".cache" / "faceserve" / "weights"


def _download(spec: WeightSpec, dest: Path) -> None:
    """Download to a temp file in the same dir, check it, then rename atomically,
    so a concurrent reader never sees a half-written or unchecked file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading weights %s from %s to %s", spec.name, spec.url, dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                h.update(chunk)
        actual = h.hexdigest()
        if actual != spec.sha256:
            raise ChecksumMismatch(
                f"weights {spec.name!r}: download from {spec.url} has sha256 {actual}, expected {spec.sha256}",
                name=spec.name, file=spec.url, expected=spec.sha256, actual=actual,
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_weights(
    name: str,
    *,
    models_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    allow_download: bool = True,
    manifest: dict[str, WeightSpec] | None = None,
) -> ResolvedWeights:
    specs = manifest if manifest is not None else load_manifest()
    spec = specs.get(name)
    if spec is None:
        raise WeightsNotFound(f"no weights named {name!r} in the manifest (known: {sorted(specs)})", name=name)

    tried: list[str] = []
    mdir = models_dir if models_dir is not None else os.environ.get(ENV_MODELS_DIR)
    if mdir:
        path = Path(mdir) / spec.file
        if path.is_file():
            _check(spec, path)
            return ResolvedWeights(spec, path, "FACE_MODELS_DIR")
        tried.append(f"{path} ({ENV_MODELS_DIR})")
    else:
        tried.append(f"{ENV_MODELS_DIR} (not set)")

    pkg_path = _package_file(spec)
    if pkg_path is not None:
        if pkg_path.is_file():
            _check(spec, pkg_path)
            return ResolvedWeights(spec, pkg_path, "package")
        tried.append(f"{pkg_path} (package {spec.package})")
    elif spec.package:
        tried.append(f"package {spec.package} (not installed)")

    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cdir / spec.file
    if cached.is_file():
        _check(spec, cached)
        return ResolvedWeights(spec, cached, "cache")
    if allow_download:
        try:
            _download(spec, cached)
        except ChecksumMismatch:
            raise
        except (OSError, ValueError) as exc:  # URLError/HTTPError/timeouts are OSErrors
            tried.append(f"{cached} (download from {spec.url} failed: {exc})")
        else:
            _check(spec, cached)
            return ResolvedWeights(spec, cached, "cache")
    else:
        tried.append(f"{cached} (cache; download disabled)")

    raise WeightsNotFound(
        f"weights {name!r} ({spec.file}) not found; tried: " + "; ".join(tried),
        name=name, file=spec.file, tried=tried,
    )


def verify_file(name: str, path: Path | str, *, manifest: dict[str, WeightSpec] | None = None) -> ResolvedWeights:
    """Check an explicitly given file (a ``weights_path=`` override) against the
    manifest entry ``name``: an override moves the file, it does not waive the pin."""
    specs = manifest if manifest is not None else load_manifest()
    spec = specs.get(name)
    if spec is None:
        raise WeightsNotFound(f"no weights named {name!r} in the manifest (known: {sorted(specs)})", name=name)
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFound(f"weights {name!r}: {p} does not exist", name=name, file=str(p), tried=[str(p)])
    _check(spec, p)
    return ResolvedWeights(spec, p, "explicit")


def verify_all(
    *,
    models_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    manifest: dict[str, WeightSpec] | None = None,
    names: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Check every manifest entry where it would be resolved. Never downloads:
    it is a read-only health check for ``faceserve models verify``."""
    specs = manifest if manifest is not None else load_manifest()
    rows: list[dict[str, Any]] = []
    for name in names if names is not None else list(specs):
        spec = specs.get(name)
        row: dict[str, Any] = {"name": name, "file": spec.file if spec else None}
        try:
            got = resolve_weights(name, models_dir=models_dir, cache_dir=cache_dir,
                                  allow_download=False, manifest=specs)
        except WeightsError as exc:
            row.update(ok=False, error=exc.message, error_code=exc.code)
        else:
            row.update(ok=True, source=got.source, path=str(got.path), sha256=got.spec.sha256)
        rows.append(row)
    return rows
