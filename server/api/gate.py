"""ASGI middleware in front of every route: the drain gate, the API key, the
body cap (before anything parses a body), and the in-flight count."""
from __future__ import annotations

import hmac

from loramux.server.api.errors import error_response, response_for
from loramux.server.api.state import ServerState
from loramux.server.errors import TooLarge

OPEN_PATHS = ("/health", "/metrics")  # no API key, served while draining
# Routes that count their streamed bodies against their own cap (a file upload's --max-file-bytes can be far
# above --max-request-bytes), refusing a Content-Length above it before reading: the Gate does not buffer them.
SELF_CAPPED = ("/v1/files",)


class Gate:
    """ASGI middleware: 503 while draining, 401 without the API key, 413 for a
    body over the cap (before anything parses it), and the in-flight count
    the drain waits for (streaming bodies included)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.state.draining:
            return await error_response(503, "the server is shutting down", code="draining")(scope, receive, send)
        headers = dict(scope["headers"])
        key = self.state.settings.api_key
        if key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return await error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                            code="invalid_api_key")(scope, receive, send)
        settings = self.state.settings
        upload = scope["path"] == "/v1/adapters"
        cap = settings.max_upload_bytes if upload else settings.max_request_bytes
        length = headers.get(b"content-length", b"")
        if scope["path"] in SELF_CAPPED:
            pass  # the route streams its body to a temporary file under its own cap (routes_files.read_upload)
        elif length.isdigit() and int(length) > cap:
            return await response_for(_too_large(upload, cap))(scope, receive, send)
        elif upload:  # the upload route streams its body (to temporary files): stop it at the cap
            receive = _capped_receive(receive, cap, _too_large(upload, cap))
        else:  # bodies parsed whole: read under the cap here, so no parser ever sees more
            body = await _read_body(receive, cap)
            if body is None:
                return await response_for(_too_large(upload, cap))(scope, receive, send)
            receive = _replay(body, receive)
        self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1


def _too_large(upload: bool, cap: int) -> TooLarge:
    if upload:
        return TooLarge(f"the upload is larger than the limit of {cap} bytes", code="upload_too_large")
    return TooLarge(f"the request body is larger than the limit of {cap} bytes (--max-request-bytes)",
                    code="request_too_large")


async def _read_body(receive, cap: int) -> dict | None:
    """The request's body as one http.request message, or None past `cap` bytes."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return message
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > cap:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}


def _replay(first: dict, receive):
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _capped_receive(receive, cap: int, too_large: TooLarge):
    """`receive` that stops a streamed body at `cap` bytes with a 413."""
    total = 0

    async def capped():
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > cap:  # stop reading: the body is never held whole
                raise too_large
        return message

    return capped
