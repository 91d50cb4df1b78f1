"""Loads k8s/manifests.py (a script folder, not a package) once for the k8s tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"


def manifests() -> ModuleType:
    name = "faceserve_k8s_manifests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, K8S / "manifests.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
