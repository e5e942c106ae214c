"""The ingress deployment: the OpenAI API of `loramux serve`, forwarded to replicas.

Every route is the replicas' own (the same app serves them there), so the
ingress only picks a replica and relays bytes:

    POST /v1/completions, /v1/chat/completions   the body's `model`: an adapter name is the
                                                 multiplexed model id (Ray prefers a replica
                                                 holding it); the base model goes to any replica
    anything else                                any replica (uploads are written once, into the
                                                 shared store; deletes leave it, and every replica
                                                 checks the store before it serves an adapter)

    GET /metrics                                 every replica's metrics, labelled by replica
                                                 (server/ray_serve/metrics_board.py); open, as
                                                 on `loramux serve`

Responses stream back chunk by chunk (SSE included), with the replica's
`x-loramux-replica` header. A replica that fails mid-request ends it with an
error in OpenAI's shape. Draining (`loramux ray-serve` on SIGTERM) refuses
new requests with 503 while those in flight finish, as `loramux serve` does.
"""
# no `from __future__ import annotations`: Ray rebuilds the routes of the class and must see `Request` itself
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle

from loramux.server.api.errors import error_body, error_response
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


@serve.deployment(name="LoramuxIngress")
@serve.ingress(api)
class LoramuxIngress:
    def __init__(self, replicas: DeploymentHandle, board: DeploymentHandle, base_model: str, max_body_bytes: int):
        self.replicas = replicas
        self.board = board
        self.base_model = base_model
        # the largest body any route takes; the replica's gate applies each route's own cap
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.inflight = 0  # requests relayed and not yet fully sent (streams included)

    def drain(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        self.draining = True

    def requests_in_flight(self) -> int:
        return self.inflight

    @api.get("/metrics", include_in_schema=False)
    async def metrics(self):
        return Response(await self.board.exposition.remote(), media_type=CONTENT_TYPE_LATEST)

    @api.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"], include_in_schema=False)
    async def relay(self, request: Request):
        if self.draining:
            return error_response(503, "the server is shutting down", code="draining")
        self.inflight += 1
        try:
            response = await self._relay(request)
        except BaseException:
            self.inflight -= 1
            raise
        if not isinstance(response, StreamingResponse):
            self.inflight -= 1
        return response

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None once it passes max_body_bytes (read no further: a client
        cannot make the ingress hold more than that)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return None
        return bytes(body)

    async def _relay(self, request: Request):
        body = await self._read_body(request)
        if body is None:
            return error_response(413, f"the request body is larger than the limit of {self.max_body_bytes} bytes",
                                  code="request_too_large")
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
            return error_response(503, "the replica serving this request failed; retry", code="replica_failed")
        assert isinstance(head, ResponseHead)

        async def body_chunks():
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:  # mid-stream: the status is sent; end the body with an SSE error event
                log.error("replica failed mid-response: %s", exc)
                error = error_body(500, "the replica serving this request failed", code="replica_failed")
                yield f"data: {error.model_dump_json()}\n\n".encode()
            finally:
                self.inflight -= 1

        headers = {k: v for k, v in head.headers if k.lower() not in _HOP_BY_HOP}
        return StreamingResponse(body_chunks(), status_code=head.status, headers=headers)
