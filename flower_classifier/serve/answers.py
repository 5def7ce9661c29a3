"""The answers a client can act on: a status, {"error": sentence}, and Retry-After or Connection:
close where they apply.

    raise BadRequest(400, "The upload is empty; send a photo such as a JPEG or PNG file.")
"""
from starlette.responses import JSONResponse

RETRY_AFTER_S = "1"


class BadRequest(Exception):
    """A request the client can fix, or retry later: answered with its status and
    {"error": message}, plus headers (Retry-After, Connection: close) where they apply."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers


def busy(message):
    """A 503 that closes the connection: a body left unsent is not worth draining when full."""
    return BadRequest(503, message, {"Retry-After": RETRY_AFTER_S, "Connection": "close"})


def error_response(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)
