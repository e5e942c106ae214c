"""Domain errors: what went wrong, in the server's own terms.

Each carries a message safe to show a client, the offending field (`param`)
and a machine-readable `code`. No module here knows HTTP: the API maps each
class to a status in one table (server/api/errors.py).
"""
from __future__ import annotations


class LoramuxError(Exception):
    code = "error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code


class Invalid(LoramuxError):
    """The request asks for something that cannot be served as asked."""

    code = "invalid_value"


class Unauthorized(LoramuxError):
    code = "invalid_api_key"


class Forbidden(LoramuxError):
    """Allowed to nobody through this server (a path outside the allowed roots)."""

    code = "forbidden"


class NotFound(LoramuxError):
    code = "not_found"


class Conflict(LoramuxError):
    """The name is taken, or the thing changed under us."""

    code = "conflict"


class TooLarge(LoramuxError):
    code = "too_large"


class Unprocessable(LoramuxError):
    """Well-formed, but not a valid adapter (or file) for this server."""

    code = "invalid_adapter"


class Busy(LoramuxError):
    """A bounded resource is full right now; the same request may succeed later."""

    code = "busy"


class ClientGone(LoramuxError):
    code = "client_closed_request"


class Failed(LoramuxError):
    """The server failed this request (and this request only)."""

    code = "request_failed"


class Unavailable(LoramuxError):
    """The server is draining or unhealthy."""

    code = "unavailable"
