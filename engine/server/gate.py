"""ASGI middleware in front of every route: the API key (401 without `Authorization: Bearer KEY` on
/v1/*, as vLLM, and on /reset_prefix_cache, which vLLM leaves open; /health and /metrics stay open)
and the origin check (403 for a request from a browser page of a foreign origin, which a web page
could send without a CORS preflight, e.g. a text/plain POST). CORS itself (--allowed-origins) is
starlette's CORSMiddleware, outside this."""
from __future__ import annotations

import hmac
import json
from urllib.parse import urlsplit

KEYED_PATHS = ("/v1", "/reset_prefix_cache")  # what needs the API key


def _error(status: int, message: str, type_: str, code: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


class Gate:
    def __init__(self, app, api_key: str | None = None, allowed_origins: tuple[str, ...] = ()):
        self.app, self.allowed = app, set(allowed_origins)
        self.key = f"Bearer {api_key}".encode() if api_key else None

    def _foreign(self, origin: str, host: str) -> bool:
        if "*" in self.allowed or origin in self.allowed:
            return False
        return urlsplit(origin).netloc != host  # same origin: the page the server itself serves

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        refusal = None
        if (origin is not None and scope["method"] != "OPTIONS"
                and self._foreign(origin.decode("latin-1"), headers.get(b"host", b"").decode("latin-1"))):
            refusal = _error(403, "requests from this origin are not allowed (see --allowed-origins)",
                             "permission_error", "origin_not_allowed")
        elif (self.key is not None and scope["path"].startswith(KEYED_PATHS)
              and not hmac.compare_digest(headers.get(b"authorization", b""), self.key)):
            refusal = _error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                             "authentication_error", "invalid_api_key")
        if refusal is None:
            return await self.app(scope, receive, send)
        start, body = refusal
        await send(start)
        await send({"type": "http.response.body", "body": body})
