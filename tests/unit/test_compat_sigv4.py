"""SigV4 verification against botocore's own signer."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from serve_app.api.compat import sigv4

BODY = b'{"CollectionId": "people"}'


def _signed(secret: str = "s3cr3t", *, url: str = "http://127.0.0.1:18000/", body: bytes = BODY,
            akid: str = "key1") -> AWSRequest:
    req = AWSRequest(method="POST", url=url, data=body, headers={
        "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "RekognitionService.ListFaces"})
    SigV4Auth(Credentials(akid, secret), "rekognition", "eu-west-1").add_auth(req)
    return req


def _check(req: AWSRequest, secret: str, *, body: bytes | None = None, now: datetime | None = None) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(req.url)
    headers: dict[str, list[str]] = {}
    for k, v in req.headers.items():
        headers.setdefault(k.lower(), []).append(v if isinstance(v, str) else v.decode())
    headers.setdefault("host", [parts.netloc])
    auth = sigv4.parse_authorization(headers["authorization"][0])
    sigv4.verify(secret, auth, method=req.method, raw_path=parts.path, raw_query=parts.query, headers=headers,
                 body=req.body if body is None else body, now=now)


def test_botocore_signature_verifies() -> None:
    req = _signed()
    _check(req, "s3cr3t")
    auth = sigv4.parse_authorization(req.headers["Authorization"])
    assert (auth.access_key_id, auth.region, auth.service) == ("key1", "eu-west-1", "rekognition")
    assert "host" in auth.signed_headers and "x-amz-target" in auth.signed_headers


def test_path_and_query_are_signed_like_botocore() -> None:
    req = _signed(url="http://h:1/a%20b/./c/?z=1&a=x%2Fy&a=b")
    _check(req, "s3cr3t")


@pytest.mark.parametrize("case", ["wrong secret", "other body", "other target"])
def test_a_changed_request_or_secret_fails(case: str) -> None:
    req = _signed()
    if case == "other target":
        req.headers.replace_header("X-Amz-Target", "RekognitionService.DeleteCollection")
    with pytest.raises(sigv4.SigV4Error) as err:
        _check(req, "wrong" if case == "wrong secret" else "s3cr3t",
               body=b'{"CollectionId": "other"}' if case == "other body" else None)
    assert err.value.kind == "InvalidSignatureException"


def test_an_old_signature_is_expired() -> None:
    req = _signed()
    with pytest.raises(sigv4.SigV4Error, match="Signature expired") as err:
        _check(req, "s3cr3t", now=datetime.now(timezone.utc) + timedelta(minutes=16))
    assert err.value.kind == "InvalidSignatureException"
    _check(req, "s3cr3t", now=datetime.now(timezone.utc) + timedelta(minutes=14))


@pytest.mark.parametrize("header,kind", [
    ("", "MissingAuthenticationTokenException"),
    ("Bearer abc", "IncompleteSignatureException"),
    ("AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request, SignedHeaders=host", "IncompleteSignatureException"),
    ("AWS4-HMAC-SHA256 Credential=a/b/c, SignedHeaders=host, Signature=00", "IncompleteSignatureException"),
    ("AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request, SignedHeaders=x-amz-date, Signature=00",
     "IncompleteSignatureException"),
])
def test_malformed_authorization(header: str, kind: str) -> None:
    with pytest.raises(sigv4.SigV4Error) as err:
        sigv4.parse_authorization(header)
    assert err.value.kind == kind
