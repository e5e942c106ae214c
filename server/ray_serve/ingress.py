"""The ingress deployment: the OpenAI API of `loramux serve`, forwarded to replicas.

Every route is the replicas' own (the same app serves them there), so the
ingress only picks a replica and relays bytes:

    POST /v1/completions, /v1/chat/completions   the body's `model`: an adapter name is the
                                                 multiplexed model id (Ray prefers a replica
                                                 holding it); the base model goes to any replica
    anything else                                any replica (uploads are written once, into the
                                                 shared store; deletes leave it, and every replica
                                                 checks the store before it serves an adapter)

Responses stream back chunk by chunk (SSE included), with the replica's
`x-loramux-replica` header. A replica that fails mid-request ends it with an
error in OpenAI's shape.
"""
# no `from __future__ import annotations`: Ray rebuilds the routes of the class and must see `Request` itself
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from loramux.server.ray_serve.asgi import ForwardedRequest, ResponseHead

log = logging.getLogger("loramux.ray_serve.ingress")

ROUTED_BY_MODEL = ("/v1/completions", "/v1/chat/completions")
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}

api = FastAPI(title="loramux (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)


def adapter_of(path: str, body: bytes, base_model: str) -> str:
    """The multiplexed model id of a request: its adapter, or "" for the base model or any other route."""
    if path not in ROUTED_BY_MODEL:
        return ""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return ""  # the replica answers 400 for the body
    return model if isinstance(model, str) and model != base_model else ""


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status)


@serve.deployment(name="LoramuxIngress")
@serve.ingress(api)
class LoramuxIngress:
    def __init__(self, replicas: DeploymentHandle, base_model: str):
        self.replicas = replicas
        self.base_model = base_model

    @api.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"], include_in_schema=False)
    async def relay(self, request: Request):
        body = await request.body()
        path = request.url.path
        forwarded = ForwardedRequest(request.method, path, request.url.query.encode("latin-1"),
                                     tuple(request.headers.items()), body)
        model_id = adapter_of(path, body, self.base_model)
        handle = self.replicas.options(stream=True, multiplexed_model_id=model_id)
        chunks = handle.forward.remote(forwarded)
        try:
            head = await chunks.__anext__()
        except Exception as exc:  # the replica died or failed before answering
            log.error("replica call failed: %s", exc)
            return _error(503, "the replica serving this request failed; retry", "service_unavailable")
        assert isinstance(head, ResponseHead)

        async def body_chunks():
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:  # mid-stream: the status is sent; end the body with an SSE error event
                log.error("replica failed mid-response: %s", exc)
                error = {"error": {"message": "the replica serving this request failed", "type": "server_error",
                                   "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n".encode()

        headers = {k: v for k, v in head.headers if k.lower() not in _HOP_BY_HOP}
        return StreamingResponse(body_chunks(), status_code=head.status, headers=headers)
