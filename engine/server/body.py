"""A request body read with a byte limit (413 even for chunked bodies without Content-Length) and
parsed into plain JSON that nothing downstream can choke on: nesting depth bounded (no
RecursionError in the parser, pydantic or the chat template) and every string valid Unicode (no
lone UTF-16 surrogates for the tokenizer to fail on)."""
from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from .protocol import BadRequest

MAX_DEPTH = 64  # arrays and objects nested in one another; JSON schemas of real tools stay far below


class PayloadTooLarge(Exception):
    """The body is over --max-request-bytes (answered 413)."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than the server's limit of {limit} bytes (--max-request-bytes)")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused as soon as it is known to pass `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _depth_ok(obj: Any, limit: int) -> bool:
    """Iterative (a recursive walk would be the RecursionError this guards against)."""
    level = [obj] if isinstance(obj, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return False
        nxt = []
        for v in level:
            items = v.values() if isinstance(v, dict) else v
            nxt += [x for x in items if isinstance(x, (dict, list))]
        level = nxt
    return True


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or BadRequest saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"the request body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if not _depth_ok(body, MAX_DEPTH):
        raise BadRequest(f"the request body is nested too deeply (at most {MAX_DEPTH} levels)")
    try:
        json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the request body holds a lone UTF-16 surrogate (such as \\ud800): "
                         "strings must be valid Unicode") from None
    return body
