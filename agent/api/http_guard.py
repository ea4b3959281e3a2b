"""Limits on what a client may make the HTTP listeners hold.

Both listeners (TCP and the world-connectable control socket) face callers
who may be hostile: a body is capped before it is read into memory, a
request that does not arrive in time is answered 408 and its connection
closed, and on the TCP listener a control request is authenticated before
a byte of its body is read or parsed. Errors have the API's shape,
``{"detail": "..."}``.
"""

from __future__ import annotations

import asyncio
import json

from agent.api.access import bearer_ok
from agent.api.http_server import ASGIApp, Message, Receive, Scope, Send

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def _answer(send: Send, status: int, detail: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class RequestGuard:
    """ASGI middleware: bearer check (TCP control only), body cap, read deadline, JSON check.

    The body is read here, at most ``max_body_bytes`` of it, within
    ``timeout_s`` of the request's start, and handed to the app in one
    piece; a declared ``Content-Length`` over the cap is answered 413
    without reading anything. A non-empty body of a POST, PUT or PATCH must
    be JSON (whatever the Content-Type says: every body this API takes is
    JSON), else 400.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, timeout_s: float, bearer_token: str | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.bearer_token = bearer_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if self.bearer_token is not None and method not in READ_METHODS:
            authorization = _header(scope, b"authorization")
            if not bearer_ok(authorization.decode("latin-1") if authorization else None, self.bearer_token):
                await _answer(
                    send,
                    401,
                    "control requests need the Unix control socket or a valid bearer token",
                    ((b"www-authenticate", b"Bearer"),),
                )
                return
        declared = _header(scope, b"content-length")
        if declared is not None and int(declared) > self.max_body_bytes:  # h11 has checked it is a number
            await _answer(
                send,
                413,
                f"request body of {int(declared)} bytes is over the limit of "
                f"{self.max_body_bytes} bytes (max_request_body_bytes)",
            )
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        if body and method in ("POST", "PUT", "PATCH"):
            try:
                json.loads(body)
            except ValueError as exc:  # UnicodeDecodeError included
                await _answer(send, 400, f"body: not valid JSON: {exc}")
                return
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once an error has been answered (or the client left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await _answer(send, 408, f"request body not received within {self.timeout_s:g} s (request_timeout_s)")
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                await _answer(
                    send, 413, f"request body is over the limit of {self.max_body_bytes} bytes (max_request_body_bytes)"
                )
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
