"""AWS Signature Version 4, the server's side: rebuild the signature and compare.

Follows botocore's SigV4Auth (botocore/auth.py): canonical request = method,
URI-encoded path, sorted query, the signed headers (trimmed), their names,
sha256 of the body; string to sign = algorithm, X-Amz-Date, credential
scope, sha256 of the canonical request; key derived from "AWS4" + secret
through date, region, service and "aws4_request".
"""
from __future__ import annotations

import hashlib
import hmac
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_S = 15 * 60  # what AWS allows between the client's clock and its own


class SigV4Error(ValueError):
    """``kind`` is the AWS error type the caller should get."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Authorization:
    access_key_id: str
    date: str  # yyyymmdd from the credential scope
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


def parse_authorization(header: str) -> Authorization:
    """``AWS4-HMAC-SHA256 Credential=AKID/date/region/service/aws4_request, SignedHeaders=a;b, Signature=hex``."""
    if not header:
        raise SigV4Error("MissingAuthenticationTokenException", "Missing Authentication Token")
    algo, _, rest = header.strip().partition(" ")
    if algo != ALGORITHM:
        raise SigV4Error("IncompleteSignatureException", f"Unsupported authorization algorithm {algo!r}")
    parts: dict[str, str] = {}
    for item in rest.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts[key] = value
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if not parts.get(k)]
    if missing:
        raise SigV4Error("IncompleteSignatureException", f"Authorization header requires {', '.join(missing)}")
    cred = parts["Credential"].split("/")
    if len(cred) != 5 or cred[4] != "aws4_request" or not cred[0]:
        raise SigV4Error("IncompleteSignatureException", "Credential must be AKID/date/region/service/aws4_request")
    signed = tuple(parts["SignedHeaders"].lower().split(";"))
    if "host" not in signed:
        raise SigV4Error("IncompleteSignatureException", "SignedHeaders must include host")
    return Authorization(cred[0], cred[1], cred[2], cred[3], signed, parts["Signature"].lower())


def canonical_request(method: str, raw_path: str, raw_query: str, headers: dict[str, list[str]],
                      signed_headers: Iterable[str], body: bytes) -> str:
    """``headers``: lower-case name -> values as received."""
    path = quote(_normalize_path(raw_path or "/"), safe="/~")
    pairs = sorted(tuple(p.partition("=")[::2]) for p in raw_query.split("&") if p) if raw_query else []
    query = "&".join(f"{k}={v}" for k, v in pairs)
    names = sorted(set(signed_headers))
    lines = [f"{n}:{','.join(' '.join(v.split()) for v in headers.get(n, []))}" for n in names]
    return "\n".join([method.upper(), path, query, "\n".join(lines) + "\n", ";".join(names),
                      hashlib.sha256(body).hexdigest()])


def _normalize_path(path: str) -> str:
    # botocore's normalize_url_path: remove dot segments, keep a trailing slash.
    if not path:
        return "/"
    normalized = posixpath.normpath(path)
    if path.endswith("/") and normalized != "/":
        normalized += "/"
    return normalized if normalized.startswith("/") else "/" + normalized


def string_to_sign(amz_date: str, scope: str, creq: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])


def signature(secret: str, auth_date: str, region: str, service: str, sts: str) -> str:
    def h(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    k = h(h(h(h(f"AWS4{secret}".encode(), auth_date), region), service), "aws4_request")
    return hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()


def check_date(amz_date: str, auth: Authorization, now: datetime | None = None) -> None:
    try:
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise SigV4Error("IncompleteSignatureException", "X-Amz-Date header is missing or malformed") from None
    if amz_date[:8] != auth.date:
        raise SigV4Error("InvalidSignatureException", "Credential date does not match X-Amz-Date")
    now = now or datetime.now(timezone.utc)
    if abs((now - when).total_seconds()) > MAX_SKEW_S:
        raise SigV4Error("InvalidSignatureException",
                         f"Signature expired: {amz_date} is now earlier or later than the allowed 15 minutes "
                         f"around {now.strftime('%Y%m%dT%H%M%SZ')}")


def verify(secret: str, auth: Authorization, *, method: str, raw_path: str, raw_query: str,
           headers: dict[str, list[str]], body: bytes, now: datetime | None = None) -> None:
    """Raises SigV4Error unless the request was signed with ``secret``."""
    amz_date = (headers.get("x-amz-date") or [""])[0]
    check_date(amz_date, auth, now)
    creq = canonical_request(method, raw_path, raw_query, headers, auth.signed_headers, body)
    expected = signature(secret, auth.date, auth.region, auth.service, string_to_sign(amz_date, auth.scope, creq))
    if not hmac.compare_digest(expected, auth.signature):
        raise SigV4Error("InvalidSignatureException",
                         "The request signature we calculated does not match the signature you provided. "
                         "Check your AWS Secret Access Key and signing method.")
