"""The caller of a compatibility route: SigV4 (Rekognition), then the same quotas as the native API."""
from __future__ import annotations

from fastapi import Request

from serve_app.api.compat import sigv4
from serve_app.api.compat.aws import AwsError
from serve_app.api.deps import Edge
from serve_app.gallery.access import SCOPES
from serve_app.services.access import Principal


def header_lists(request: Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in request.headers.items():
        out.setdefault(k.lower(), []).append(v)
    return out


async def sigv4_principal(edge: Edge, request: Request, body: bytes) -> Principal:
    """The key that signed this request (access key id = key id, secret = hex sha256 of the
    key's secret; "bootstrap" + the bootstrap key), or the AWS authentication error."""
    header = request.headers.get("authorization", "")
    if not header and await edge.auth.is_open():
        host = request.client.host if request.client else "unknown"
        return Principal("default", f"open:{host}", frozenset(SCOPES))
    try:
        auth = sigv4.parse_authorization(header)
        creds = await edge.auth.sigv4_credentials(auth.access_key_id)
        if creds is None:
            if await edge.auth.is_open():  # open mode: any signature is as good as none
                host = request.client.host if request.client else "unknown"
                return Principal("default", f"open:{host}", frozenset(SCOPES))
            raise AwsError("UnrecognizedClientException", "The security token included in the request is invalid.")
        secret, who = creds
        sigv4.verify(secret, auth, method=request.method, raw_path=_raw_path(request),
                     raw_query=request.scope.get("query_string", b"").decode("latin-1"),
                     headers=header_lists(request), body=body)
    except sigv4.SigV4Error as exc:
        status = 403 if exc.kind == "MissingAuthenticationTokenException" else 400
        raise AwsError(exc.kind, exc.message, status) from None
    return who


def _raw_path(request: Request) -> str:
    raw = request.scope.get("raw_path")
    return raw.decode("latin-1") if raw else request.url.path


