"""`faceserve`: start/stop the service, enrol a folder, identify, verify models."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faceserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("start", help="start Ray, the database if needed, and the app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, default=None, help="default ./data")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs Ray may hand out")
    p.add_argument("--detach", action="store_true", help="return once ready instead of waiting")
    p.set_defaults(func=_cmd_start)

    p = sub.add_parser("stop", help="stop the app, Ray and the embedded database")
    p.add_argument("--data-dir", type=Path, default=None)
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("enroll-folder", help="enrol DIR/<person>/<photos> through the HTTP API")
    p.add_argument("folder", type=Path)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--collection", default=None)
    p.add_argument("--largest", action="store_true", help="take the largest face of group photos")
    p.add_argument("--liveness", default=None, choices=["off", "flag", "block"])
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=_cmd_enroll_folder)

    p = sub.add_parser("identify", help="identify the faces in an image")
    p.add_argument("image", type=Path)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--collection", default=None)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=_cmd_identify)

    p = sub.add_parser("keys", help="API keys: create, list, revoke (through the admin API)")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("key_id", nargs="?", help="the key to revoke")
    p.add_argument("--scopes", default="read", help="comma-separated: read,enrol,admin")
    p.add_argument("--tenant", default=None, help="the tenant (bootstrap key only; default: your own)")
    p.add_argument("--name", default="")
    p.add_argument("--requests-per-minute", type=int, default=0)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="an admin key (default: $FACESERVE_API_KEY)")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser("models", help="weights: list where each model is found and check it")
    p.add_argument("action", choices=["verify"])
    p.set_defaults(func=_cmd_models)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


# ---------------------------------------------------------------- service
def _cmd_start(args: argparse.Namespace) -> int:
    from serve_app import cluster
    from serve_app.embedded_pg import start_embedded_postgres
    from serve_app.settings import load_settings

    settings = load_settings()
    if settings.api_key is None:
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"refusing to listen on {args.host} without an API key: set FACESERVE_API_KEY "
                  "(the bootstrap admin key), or keep the default 127.0.0.1", file=sys.stderr)
            return 2
        print("no FACESERVE_API_KEY: until an API key is created (faceserve keys create), the API is open "
              "to callers on this machine only (127.0.0.1)")
    data_dir = (args.data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    app_args: dict[str, Any] = {}
    if settings.database_url is None:
        print(f"DATABASE_URL not set: starting embedded PostgreSQL under {data_dir / 'pg'}")
        app_args["database_url"] = start_embedded_postgres(data_dir)
    if settings.object_store_url == "file://./data/objects":
        app_args["object_store_url"] = f"file://{data_dir / 'objects'}"
    # Settings from this shell travel as app args: replicas may run in a Ray
    # cluster that was started with another environment.
    if settings.redis_url:
        app_args["redis_url"] = settings.redis_url
    if settings.api_key is not None:
        app_args["api_key"] = settings.api_key.get_secret_value()
    if settings.snapshot_key is not None:
        app_args["snapshot_key"] = settings.snapshot_key.get_secret_value()
    if settings.trace_exporter != "none":
        app_args["trace_exporter"] = settings.trace_exporter
        app_args["otlp_endpoint"] = settings.otlp_endpoint
    if settings.matcher_shards > 1:  # one Matcher deployment per shard (deploy_config writes their entries)
        app_args["matcher_shards"] = settings.matcher_shards
    models_dir = settings.models_dir or _default_models_dir()
    if models_dir:
        app_args["models_dir"] = str(Path(models_dir).resolve())
    ports = cluster.ClusterPorts(http=args.port, http_host=args.host)
    if not cluster.ray_running(ports):
        print(f"starting Ray (GCS :{ports.gcs}, dashboard {ports.dashboard_url}, metrics :{ports.metrics})")
        cluster.start_ray_head(ports, num_cpus=args.num_cpus)
    config = cluster.deploy_config(app_args, ports)
    cluster.serve_deploy(config, ports, data_dir)
    print("deploying faceserve; waiting until it is ready (models load, database migrates)...")
    cluster.wait_ready(ports.http_url, timeout_s=600)
    print(f"faceserve is ready: {ports.http_url}  (API docs {ports.http_url}/docs, "
          f"Ray dashboard {ports.dashboard_url})")
    if args.detach:
        return 0
    stop = {"now": False}

    def _stop(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print("Ctrl-C stops it.")
    while not stop["now"]:
        time.sleep(0.5)
    return _cmd_stop(argparse.Namespace(data_dir=data_dir))


def _cmd_stop(args: argparse.Namespace) -> int:
    from serve_app import cluster
    from serve_app.embedded_pg import stop_embedded_postgres
    from serve_app.settings import load_settings

    data_dir = (args.data_dir or load_settings().data_dir).resolve()
    ports = cluster.ClusterPorts()
    if cluster.ray_running(ports):
        cluster.serve_shutdown(ports)
    cluster.stop_ray("/tmp/ray", gcs_port=ports.gcs)  # the default temp dir `faceserve start` uses
    if stop_embedded_postgres(data_dir):
        print("embedded PostgreSQL stopped")
    print("faceserve stopped")
    return 0


def _default_models_dir() -> str | None:
    # A checkout sits beside ../shared/models on the build machines.
    candidate = Path(__file__).resolve().parents[2] / "shared" / "models"
    return str(candidate) if candidate.is_dir() else None


# ---------------------------------------------------------------- clients
def _client(url: str, api_key: str | None):  # noqa: ANN202 - httpx is imported lazily
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=120)


def _cmd_enroll_folder(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    folder: Path = args.folder
    if not folder.is_dir():
        print(f"not a folder: {folder}", file=sys.stderr)
        return 2
    people = sorted(p for p in folder.iterdir() if p.is_dir())
    jobs, skipped = _enrolment_files(people)
    for path, why in skipped:
        print(f"  skipped {path}: {why}", file=sys.stderr)
    if not jobs:
        print(f"no <person>/<photo> images under {folder}", file=sys.stderr)
        return 2
    params = {k: v for k, v in {"collection": args.collection}.items() if v}
    failures: list[str] = []
    enrolled = 0
    subject_ids: dict[str, str] = {}
    with _client(args.url, args.api_key) as client:
        for person, photo in tqdm(jobs, desc="enrolling", unit="photo"):
            name = person.name
            if name not in subject_ids:
                subject_ids[name] = _ensure_subject(client, name, params)
            data: dict[str, str] = {}
            if args.largest:
                data["largest"] = "true"
            if args.liveness:
                data["liveness"] = args.liveness
            with photo.open("rb") as fh:
                r = client.post(
                    f"/v1/subjects/{subject_ids[name]}/faces",
                    params=params,
                    files={"image": (photo.name, fh)},
                    data=data,
                )
            if r.status_code == 201:
                enrolled += 1
            else:
                failures.append(f"{photo}: {r.status_code} {_reason(r)}")
    print(f"enrolled {enrolled} of {len(jobs)} photos for {len(subject_ids)} subjects"
          + (f"; skipped {len(skipped)} files that are not images we read" if skipped else ""))
    for line in failures:
        print(f"  failed {line}", file=sys.stderr)
    return 0 if not failures else 1


def _cmd_keys(args: argparse.Namespace) -> int:
    import os

    key = args.api_key or os.environ.get("FACESERVE_API_KEY")
    params = {"tenant": args.tenant} if args.tenant else {}
    with _client(args.url, key) as client:
        if args.action == "create":
            scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
            r = client.post("/v1/keys", params=params, json={
                "scopes": scopes, "name": args.name, "requests_per_minute": args.requests_per_minute})
        elif args.action == "list":
            r = client.get("/v1/keys", params=params)
        else:
            if not args.key_id:
                print("keys revoke needs the key id", file=sys.stderr)
                return 2
            r = client.delete(f"/v1/keys/{args.key_id}", params=params)
    if r.status_code >= 400:
        print(f"{r.status_code}: {_reason(r)}", file=sys.stderr)
        return 1
    body = r.json()
    if args.action == "create":
        print(f"created key {body['key_id']} for tenant {body['tenant']} with scopes {','.join(body['scopes'])}")
        print(f"token (shown once, keep it secret): {body['token']}")
    elif args.action == "list":
        for k in body["keys"]:
            state = f"revoked {k['revoked_at']}" if k["revoked_at"] else "active"
            print(f"{k['key_id']}  {k['tenant']}  {','.join(k['scopes'])}  {k['name'] or '-'}  {state}")
    else:
        print(f"revoked key {body['key_id']}")
    return 0


def _enrolment_files(people: list[Path]) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """Images by their content, not their name (a .pgm, a photo without a
    suffix), and every other file with the reason it is skipped."""
    from models.images import SUPPORTED_FORMATS, sniff_format

    jobs: list[tuple[Path, Path]] = []
    skipped: list[tuple[Path, str]] = []
    for person in people:
        for path in sorted(person.iterdir()):
            if path.name.startswith("."):
                continue
            if not path.is_file():
                skipped.append((path, "not a file"))
                continue
            with path.open("rb") as fh:
                fmt = sniff_format(fh.read(32))
            if fmt is None:
                skipped.append((path, "not a recognised image"))
            elif fmt not in SUPPORTED_FORMATS:
                skipped.append((path, f"{fmt} images are not supported"))
            else:
                jobs.append((person, path))
    return jobs, skipped


def _ensure_subject(client: Any, name: str, params: dict[str, str]) -> str:
    r = client.post("/v1/subjects", params=params, json={"name": name})
    if r.status_code == 201:
        return r.json()["id"]
    if r.status_code == 409:
        found = client.get("/v1/subjects", params={**params, "name": name}).json()["subjects"]
        if found:
            return found[0]["id"]
    r.raise_for_status()
    raise RuntimeError(f"could not create subject {name}: {r.status_code} {r.text}")


def _reason(r: Any) -> str:
    try:
        return r.json()["error"]["message"]
    except Exception:
        return r.text[:200]


def _cmd_identify(args: argparse.Namespace) -> int:
    with _client(args.url, args.api_key) as client, args.image.open("rb") as fh:
        params: dict[str, Any] = {"top_k": args.top_k}
        if args.collection:
            params["collection"] = args.collection
        r = client.post("/v1/identify", params=params, files={"image": (args.image.name, fh)})
    print(json.dumps(r.json(), indent=2))
    return 0 if r.status_code == 200 else 1


def _cmd_models(args: argparse.Namespace) -> int:
    from models.weights import verify_all

    models_dir = _default_models_dir()
    import os

    if models_dir and not os.environ.get("FACE_MODELS_DIR"):
        os.environ["FACE_MODELS_DIR"] = models_dir
    rows = verify_all()
    ok = True
    for row in rows:
        status = "ok" if row["ok"] else "FAILED"
        where = row.get("path") or row.get("error", "")
        print(f"{row['name']:18} {status:6} {row.get('source') or '-':16} {where}")
        # FaceNet's weights are optional (fetched from upstream on first use).
        if not row["ok"] and row["name"] != "facenet_vggface2":
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
