"""AWS Rekognition, AWS JSON 1.1: ``POST /`` with ``X-Amz-Target: RekognitionService.<Op>``.

boto3.client("rekognition", endpoint_url=<faceserve>) works unchanged. The
request is SigV4-signed with a faceserve key: access key id = the key id,
secret access key = hex sha256 of the key's secret ("bootstrap" + the
bootstrap key for the bootstrap key). Each operation is translated onto the
same services as the native API (api/compat/rekognition_ops.py); errors are
``{"__type", "message"}`` with Rekognition's statuses, so botocore raises
``client.exceptions.<Type>``.
"""
from __future__ import annotations

import json
import logging
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve_app.api.body import read_capped
from serve_app.api.compat.auth import sigv4_principal
from serve_app.api.compat.aws import AwsError, aws_error
from serve_app.api.compat.rekognition_ops import OPERATIONS, Call
from serve_app.api.deps import charge_quota, get_edge

log = logging.getLogger("ray.serve")
router = APIRouter(tags=["compat: AWS Rekognition"])

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "RekognitionService."


def body_cap(max_image_bytes: int) -> int:
    """Two base64 images (CompareFaces) plus the JSON around them."""
    return max_image_bytes * 2 * 4 // 3 + 65536


@router.post("/", summary="AWS Rekognition (JSON 1.1; see docs/COMPATIBILITY.md)")
async def rekognition(request: Request) -> JSONResponse:
    edge = get_edge(request)
    request_id = str(uuid.uuid4())
    try:
        body = await read_capped(request, body_cap(edge.config().max_image_bytes))
        who = await sigv4_principal(edge, request, body)
        target = request.headers.get("x-amz-target", "")
        op = OPERATIONS.get(target[len(TARGET_PREFIX):]) if target.startswith(TARGET_PREFIX) else None
        if op is None:
            raise AwsError("UnknownOperationException", f"unknown or unsupported operation {target[:100]!r}")
        await charge_quota(edge, who)
        try:
            params = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise AwsError("SerializationException", "body is not valid JSON") from None
        if not isinstance(params, dict):
            raise AwsError("SerializationException", "body must be a JSON object")
        result = await op[0](Call(edge, who, params))
        return JSONResponse(result, media_type=CONTENT_TYPE, headers={"x-amzn-RequestId": request_id})
    except Exception as exc:
        err = aws_error(exc)
        if err.status >= 500:
            log.exception("rekognition %s failed", request.headers.get("x-amz-target", "?"))
        return JSONResponse(err.body(), status_code=err.status, media_type=CONTENT_TYPE,
                            headers={"x-amzn-RequestId": request_id, "x-amzn-ErrorType": err.kind})
