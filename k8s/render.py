#!/usr/bin/env python3
"""A small, strict renderer for the subset of kustomize that k8s/ uses.

CI has no API server, and a kustomize binary is not guaranteed everywhere the
unit tests run, so the tests render the overlays with this module. It is NOT a
general kustomize: it implements exactly what our kustomization files use and
raises ``Unsupported`` for anything else, so a new feature in an overlay fails
loudly instead of rendering wrongly.

Supported kustomization keys:
  resources   files (multi-document YAML) and directories holding a kustomization
  namespace   sets metadata.namespace on namespaced objects, renames Namespace
              objects, and sets it on (Cluster)RoleBinding ServiceAccount
              subjects that have none and name a ServiceAccount of the build
              (all as kustomize v5 does)
  patches     {path|patch, target?}:
                - a YAML list  -> JSON6902 (RFC 6902 ops add/remove/replace/test;
                  a ``target`` is required)
                - a YAML map   -> strategic merge. Built-in kinds merge the usual
                  keyed lists (containers/initContainers/env/volumes by name,
                  volumeMounts by mountPath, container ports by containerPort,
                  Service ports by port); custom resources replace lists (no
                  schema, like kustomize); a list of maps anywhere else, or a
                  ``$patch`` directive, raises Unsupported
  images      name -> newName/newTag/digest in every ``containers`` and
              ``initContainers`` list, wherever it sits (custom resources too)

Transformer order: resources, patches, namespace, images (as kustomize).
When ``kubectl`` is installed, tests/unit/test_k8s_render.py checks this
renderer against ``kubectl kustomize`` for every overlay.

Usage: python k8s/render.py k8s/overlays/ha > ha.yaml
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches", "images"}

# Cluster-scoped kinds we know about (kustomize's own list is longer; the ones
# that matter are the ones our manifests could contain).
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "IngressClass",
    "PersistentVolume", "StorageClass", "CustomResourceDefinition",
    "PriorityClass", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration", "APIService", "CSIDriver", "RuntimeClass",
}

# apiVersion groups whose kinds are built into Kubernetes: strategic merge uses
# their merge keys. Everything else is a custom resource.
BUILTIN_GROUPS = {
    "", "apps", "batch", "policy", "networking.k8s.io",
    "rbac.authorization.k8s.io", "autoscaling", "storage.k8s.io",
}

# (field name, parent context) -> merge key, for built-in kinds.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class Unsupported(Exception):
    """The kustomization uses something this renderer does not implement."""


# --------------------------------------------------------------------------- io
def _load_docs(path: Path) -> list[dict]:
    with path.open() as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise ValueError(f"{path}: every document must be a Kubernetes object")
    return docs


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        p = directory / name
        if p.is_file():
            return p
    raise FileNotFoundError(f"no kustomization file in {directory}")


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def _obj_id(obj: dict) -> tuple:
    md = obj.get("metadata", {})
    return (_group(obj["apiVersion"]), obj["kind"], md.get("namespace"), md.get("name"))


# ------------------------------------------------------------------- json6902
def _decode_pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        if isinstance(doc, list):
            doc = doc[int(p)]
        else:
            doc = doc[p]
    return doc


def apply_json6902(obj: dict, ops: list[dict]) -> dict:
    obj = copy.deepcopy(obj)
    for op in ops:
        kind = op["op"]
        parts = _decode_pointer(op["path"])
        if not parts:
            raise Unsupported("JSON6902 op on the document root")
        parent = _walk(obj, parts[:-1])
        last = parts[-1]
        if kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                else:
                    parent.insert(int(last), value)
            else:
                parent[last] = value
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if last not in parent:
                    raise KeyError(f"replace: {op['path']} does not exist")
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        elif kind == "test":
            if _walk(obj, parts) != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        else:
            raise Unsupported(f"JSON6902 op {kind!r}")
    return obj


# ------------------------------------------------------------ strategic merge
def _merge_key(field: str, path: tuple[str, ...], kind: str) -> str | None:
    if field == "ports":
        if kind == "Service" and path == ("spec",):
            return "port"
        if "containers" in path or "initContainers" in path:
            return "containerPort"
        return None
    return MERGE_KEYS.get(field)


def _smp(base: Any, patch: Any, path: tuple[str, ...], kind: str, builtin: bool) -> Any:
    if isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise Unsupported(f"strategic-merge directive at {'/'.join(path)}")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _smp(out[k], v, path + (k,), kind, builtin)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list):
        if not builtin or not patch or not all(isinstance(i, dict) for i in patch):
            return copy.deepcopy(patch)  # primitive lists and CR lists: replace
        if not isinstance(base, list):
            return copy.deepcopy(patch)  # nothing to merge with: the patch's list
        key = _merge_key(path[-1], path[:-1], kind)
        if key is None:
            raise Unsupported(
                f"strategic merge of list {'/'.join(path)} in {kind}: use a JSON6902 patch"
            )
        by_key = {item.get(key): item for item in base}
        merged, used = [], set()
        for item in patch:
            k = item.get(key)
            if k in by_key:
                merged.append(_smp(by_key[k], item, path + (str(k),), kind, builtin))
                used.add(k)
            else:
                merged.append(copy.deepcopy(item))
        merged.extend(copy.deepcopy(i) for i in base if i.get(key) not in used)
        return merged
    return copy.deepcopy(patch)


def apply_smp(obj: dict, patch: dict) -> dict:
    builtin = _group(obj["apiVersion"]) in BUILTIN_GROUPS
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
    return _smp(obj, body, (), obj["kind"], builtin)


# ------------------------------------------------------------------ targeting
def _matches(obj: dict, target: dict) -> bool:
    for key in target:
        if key not in {"kind", "name", "namespace", "group", "version"}:
            raise Unsupported(f"patch target selector {key!r}")
    api = obj["apiVersion"]
    version = api.split("/")[-1]
    md = obj.get("metadata", {})
    checks = {
        "kind": obj["kind"],
        "name": md.get("name", ""),
        "namespace": md.get("namespace") or "",
        "group": _group(api),
        "version": version,
    }
    return all(re.fullmatch(str(target[k]), checks[k] or "") for k in target)


# --------------------------------------------------------------------- images
def _split_image(image: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1:]
    return image, tag, digest


def _retag(image: str, rule: dict) -> str:
    name, tag, digest = _split_image(image)
    if name != rule["name"]:
        return image
    name = rule.get("newName", name)
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    tag = rule.get("newTag", tag)
    out = name + (f":{tag}" if tag else "")
    return out + (f"@{digest}" if digest and "newTag" not in rule else "")


def _apply_images(node: Any, rules: list[dict]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                for c in v:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        for rule in rules:
                            c["image"] = _retag(c["image"], rule)
            _apply_images(v, rules)
    elif isinstance(node, list):
        for item in node:
            _apply_images(item, rules)


# ---------------------------------------------------------------------- build
def render(directory: str | Path) -> list[dict]:
    """Render the kustomization in ``directory`` to a list of objects."""
    directory = Path(directory)
    kfile = _kustomization_file(directory)
    kust = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(kust) - SUPPORTED_KEYS
    if unknown:
        raise Unsupported(f"{kfile}: unsupported kustomization keys {sorted(unknown)}")

    objects: list[dict] = []
    for entry in kust.get("resources", []):
        p = (directory / entry).resolve()
        if p.is_dir():
            objects.extend(render(p))
        elif p.is_file():
            objects.extend(_load_docs(p))
        else:
            raise FileNotFoundError(f"{kfile}: resource {entry} not found")

    seen = set()
    for o in objects:
        oid = _obj_id(o)
        if oid in seen:
            raise ValueError(f"{kfile}: duplicate object {oid}")
        seen.add(oid)

    for entry in kust.get("patches", []):
        if "path" in entry:
            text = (directory / entry["path"]).read_text()
        elif "patch" in entry:
            text = entry["patch"]
        else:
            raise Unsupported(f"{kfile}: patch without path/patch")
        if set(entry) - {"path", "patch", "target"}:
            raise Unsupported(f"{kfile}: patch options {sorted(set(entry) - {'path', 'patch', 'target'})}")
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        if len(docs) != 1:
            raise Unsupported(f"{kfile}: a patch entry must hold exactly one document")
        body = docs[0]
        if isinstance(body, list):
            target = entry.get("target")
            if not target:
                raise ValueError(f"{kfile}: JSON6902 patch needs a target")
            hits = [i for i, o in enumerate(objects) if _matches(o, target)]
            for i in hits:
                objects[i] = apply_json6902(objects[i], body)
        else:
            target = entry.get("target") or {
                "kind": body["kind"], "name": body["metadata"]["name"],
            }
            hits = [i for i, o in enumerate(objects) if _matches(o, target)]
            for i in hits:
                objects[i] = apply_smp(objects[i], body)
        if not hits:
            raise ValueError(f"{kfile}: patch {entry.get('path', '<inline>')} matched nothing")

    ns = kust.get("namespace")
    if ns:
        # Like kustomize: a ServiceAccount subject without a namespace that
        # names a ServiceAccount of this build gets the new namespace.
        service_accounts = {o["metadata"]["name"] for o in objects
                            if o["kind"] == "ServiceAccount"}
        for o in objects:
            if o["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                for subj in o.get("subjects") or []:
                    if (subj.get("kind") == "ServiceAccount" and not subj.get("namespace")
                            and subj.get("name") in service_accounts):
                        subj["namespace"] = ns
        for o in objects:
            md = o.setdefault("metadata", {})
            if o["kind"] == "Namespace":
                md["name"] = ns
            elif o["kind"] not in CLUSTER_SCOPED:
                md["namespace"] = ns

    if kust.get("images"):
        for o in objects:
            _apply_images(o, kust["images"])
    return objects


def dump(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: render.py DIR")
    sys.stdout.write(dump(render(sys.argv[1])))
