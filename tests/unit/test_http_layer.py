"""The HTTP edge without Ray: body parsing, error mapping, the app factory
over fake services, and config generation."""
from __future__ import annotations

import base64
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from serve_app import errors
from serve_app.api import errors as http_errors
from serve_app.api.body import as_bool, as_int, parse_request
from serve_app.cluster import ClusterPorts, deploy_config
from serve_app.deployment_config import IngressConfig
from serve_app.pipeline_client import unwrap
from serve_app.services.gallery import GalleryService
from serve_app.services.recognition import RecognitionService
from tests.unit.fakes import DIM, CountingOutcomes, FakeObjects, FakePipeline, FakeRepo

LIMIT = 1000


def _echo_app() -> FastAPI:
    app = FastAPI()
    http_errors.install(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, Any]:
        parsed = await parse_request(request, max_bytes=LIMIT)
        return {
            "images": {k: len(v) for k, v in parsed.images.items()},
            "fields": {k: v for k, v in parsed.fields.items()},
        }

    return app


@pytest.fixture(scope="module")
def http() -> TestClient:
    return TestClient(_echo_app())


def test_multipart_json_and_raw_bodies(http: TestClient) -> None:
    r = http.post("/echo?top_k=3", files={"image": ("a.jpg", b"x" * 10)}, data={"liveness": "flag"})
    assert r.json() == {"images": {"image": 10}, "fields": {"top_k": "3", "liveness": "flag"}}
    b64 = base64.b64encode(b"y" * 20).decode()
    r = http.post("/echo", json={"image1": b64, "image2": f"data:image/png;base64,{b64}", "subject_id": "s"})
    assert r.json() == {"images": {"image1": 20, "image2": 20}, "fields": {"subject_id": "s"}}
    r = http.post("/echo", content=b"z" * 30, headers={"content-type": "image/jpeg"})
    assert r.json()["images"] == {"image": 30}


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"files": {"image": ("a.jpg", b"x" * (LIMIT + 1))}}, 413, "image_too_large"),
        ({"json": {"image": "not base64!!"}}, 400, "invalid_request"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_request"),
        ({"json": [1, 2]}, 400, "invalid_request"),
        ({"content": b"x" * (LIMIT + 1), "headers": {"content-type": "image/jpeg"}}, 413, "image_too_large"),
        ({"content": b"[" * 50_000, "headers": {"content-type": "application/json"}}, 400, "invalid_request"),
        ({"files": [("a", ("a.jpg", b"x")), ("b", ("b.jpg", b"x")), ("c", ("c.jpg", b"x"))]}, 400, "invalid_request"),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ],
)
def test_bad_bodies_are_4xx_with_a_reason(http: TestClient, kwargs: dict, status: int, code: str) -> None:
    r = http.post("/echo", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]


def test_every_caller_error_is_a_4xx_and_every_fault_a_5xx() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.ServiceError) and c is not errors.ServiceError]
    assert classes
    for cls in classes:
        status = http_errors.status_for(cls("x"))
        if issubclass(cls, errors.CallerError):
            assert 400 <= status < 500, f"{cls.__name__} -> {status}"
        else:
            assert status >= 500, f"{cls.__name__} -> {status}"
    for name in ("InvalidRequest", "ImageUnreadable", "NoFaceFound", "SubjectNotFound", "RateLimited"):
        assert getattr(errors, name).code != errors.ServiceError.code


def test_unwrap_finds_the_domain_error_in_a_chain() -> None:
    inner = errors.NoFaceFound("none")
    try:
        try:
            raise inner
        except errors.NoFaceFound as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert unwrap(outer) is inner
    plain = ValueError("x")
    assert unwrap(plain) is plain


def test_field_coercion() -> None:
    assert as_bool("true", "x") and not as_bool("0", "x") and not as_bool(None, "x")
    with pytest.raises(errors.InvalidRequest):
        as_bool("maybe", "x")
    assert as_int(None, "k", default=5, lo=1, hi=10) == 5
    assert as_int("7", "k", default=5, lo=1, hi=10) == 7
    for bad in ("0", "11", "seven"):
        with pytest.raises(errors.InvalidRequest):
            as_int(bad, "k", default=5, lo=1, hi=10)


def test_generated_deploy_config_is_valid_for_serve() -> None:
    from ray.serve.schema import ServeDeploySchema

    ports = ClusterPorts(http=18123, http_host="127.0.0.1")
    cfg = deploy_config(
        {"database_url": "postgresql://u@h/db"},
        ports,
        overrides={"Detector": {"autoscaling_config": {"max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.1}}},
    )
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert app["args"]["database_url"] == "postgresql://u@h/db"
    assert cfg["http_options"] == {"host": "127.0.0.1", "port": 18123}
    det = next(d for d in app["deployments"] if d["name"] == "Detector")
    assert det["autoscaling_config"]["max_replicas"] == 1
    assert det["autoscaling_config"]["min_replicas"] == 1  # merged, not replaced
    assert det["ray_actor_options"]["num_cpus"] == 0.1


def test_serve_config_names_every_deployment_in_the_graph() -> None:
    from serve_app.cluster import SERVE_CONFIG

    cfg = yaml.safe_load(SERVE_CONFIG.read_text())
    names = {d["name"] for d in cfg["applications"][0]["deployments"]}
    assert names == {"Ingress", "Detector", "Embedder", "Liveness", "Matcher"}
    for dep in cfg["applications"][0]["deployments"]:
        assert 0 < dep["ray_actor_options"]["num_cpus"] < 1, "2-core machines need fractions"
        assert "autoscaling_config" in dep and "user_config" in dep


def test_settings_secrets_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_app.settings import load_settings

    monkeypatch.setenv("DATABASE_URL", "postgresql://env/db")
    monkeypatch.setenv("FACESERVE_API_KEY", "s3cret")
    s = load_settings()
    assert s.database_dsn() == "postgresql://env/db"
    assert "s3cret" not in repr(s) and "env/db" not in repr(s)
    s = load_settings(database_url="postgresql://arg/db", redis_url=None)
    assert s.database_dsn() == "postgresql://arg/db"


def test_migration_files_are_well_named() -> None:
    from serve_app.gallery.migrations import migration_files

    versions = [v for v, _ in migration_files()]
    assert versions == sorted(versions) and versions[0] == 1


def test_cursor_round_trip_and_garbage() -> None:
    import uuid
    from datetime import datetime, timezone

    from serve_app.api.routers.gallery import _decode_cursor, _encode_cursor

    ts, sid = datetime.now(timezone.utc), uuid.uuid4()
    assert _decode_cursor(_encode_cursor(ts, sid)) == (ts, sid)
    with pytest.raises(errors.InvalidRequest):
        _decode_cursor("garbage")


def test_bootstrap_key_both_header_forms_and_token_parsing() -> None:
    import asyncio

    from serve_app.gallery.access import split_token
    from serve_app.services.access import Authenticator
    from tests.unit.fakes import FakeAccess

    auth = Authenticator(FakeAccess(), b"s3cret")

    def run(**headers: str) -> Any:
        return asyncio.run(auth.authenticate({k.replace("_", "-"): v for k, v in headers.items()}, "10.1.2.3"))

    who = run(x_api_key="s3cret")
    assert who.superuser and who.actor == "bootstrap" and "s3cret" not in repr(who)
    assert run(authorization="Bearer s3cret") == who
    for bad in ({}, {"x_api_key": "wrong"}, {"authorization": "Basic s3cret"}):
        with pytest.raises(errors.Unauthorized):
            run(**bad)
    assert split_token("fsk_abc_def_ghi") == ("abc", "def_ghi")
    assert split_token("fsk_") is None and split_token("other") is None


def test_enroll_folder_picks_images_by_content_and_names_what_it_skips(tmp_path: Any) -> None:
    import io

    from PIL import Image

    from serve_app.cli import _enrolment_files

    person = tmp_path / "ada"
    person.mkdir()
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PPM")
    (person / "face.pgm").write_bytes(buf.getvalue())
    (person / "no_suffix").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 40)
    (person / "notes.txt").write_text("hello")
    (person / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\0" * 40)
    jobs, skipped = _enrolment_files([person])
    assert sorted(p.name for _, p in jobs) == ["face.pgm", "no_suffix"]
    assert dict((p.name, why) for p, why in skipped) == {
        "notes.txt": "not a recognised image", "phone.heic": "HEIC images are not supported"}
