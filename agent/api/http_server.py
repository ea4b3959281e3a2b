"""The agent's HTTP/1.1 server: h11 on asyncio, speaking ASGI to the apps.

Only what the two listeners need: HTTP/1.1 with keep-alive and pipelining,
no TLS, no WebSocket, no lifespan. Every connection is bounded: its request
head must be complete within ``head_timeout_s`` of the connection opening or
of the previous response (which also ends idle keep-alive connections), a
head larger than ``max_head_bytes`` is answered 431, and a body is buffered
only up to a small window while the app is not reading it (the app's
RequestGuard caps the body and its arrival time). Errors have the API's
shape, ``{"detail": "..."}``.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import h11

log = logging.getLogger("jouleward")

# ASGI 3, as the server and the RequestGuard middleware speak it.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ConnectionState = Callable[[socket.socket], dict[str, Any]]

MAX_HEAD_BYTES = 16 * 1024  # request line plus headers, for both listeners
BODY_WINDOW_BYTES = 64 * 1024  # read no further ahead of the app than this
SHUTDOWN_GRACE_S = 5.0  # in-flight requests get this long to finish on stop


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    head_timeout_s: float  # a complete request head within this, from connect or the previous response
    max_head_bytes: int  # request line plus headers


def _json_error(status: int, detail: str) -> tuple[h11.Response, bytes]:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"date", _http_date()),
    ]
    return h11.Response(status_code=status, headers=headers, reason=_reason(status)), body


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode())
    return _date_cache[1]


class _Connection(asyncio.Protocol):
    """One client connection: h11's state machine, one request at a time."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.loop = server.loop
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.limits.max_head_bytes)
        self.transport: asyncio.Transport | None = None
        self.state: dict[str, Any] = {}
        self.scope_base: Scope = {}
        self.head_deadline: asyncio.TimerHandle | None = None
        self.drain_deadline: asyncio.TimerHandle | None = None
        self.peer_eof = False  # the client shut its side after a complete request
        self.request: _Request | None = None
        self.reading = True
        self.writable = asyncio.Event()
        self.writable.set()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and self.server.connection_state is not None:
            self.state = self.server.connection_state(sock)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.scope_base = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "scheme": "http",
            "root_path": "",
            "server": tuple(local[:2]) if isinstance(local, tuple) else None,
            "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
        }
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self.h11.their_state in (h11.ERROR, h11.CLOSED, h11.MUST_CLOSE):
            # Refused, closed, or after a request that closes the connection
            # (a stray CRLF included): nothing more is read from this client.
            self.pause_reading()
            return
        self.h11.receive_data(data)
        self._handle_events()

    def eof_received(self) -> bool | None:
        if self.request is not None and self.h11.their_state is not h11.SEND_BODY:
            # A complete request, then a half-close: answer it, then close.
            self.peer_eof = True
            return True
        if self.request is not None:
            self.request.disconnected()  # the body can never be complete
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        if self.drain_deadline is not None:
            self.drain_deadline.cancel()
            self.drain_deadline = None
        self.server.connections.discard(self)
        self.writable.set()
        if self.request is not None:
            self.request.disconnected()
        self.transport = None

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # request handling

    def _arm_head_deadline(self) -> None:
        # One pending timer per connection: a pending timer holds the connection
        # (and its buffers) until it fires, closed or not.
        self._cancel_head_deadline()
        self.head_deadline = self.loop.call_later(self.server.limits.head_timeout_s, self._head_overdue)

    def _cancel_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_overdue(self) -> None:
        self.head_deadline = None
        if self.request is None:  # no complete request head in time (or idle keep-alive)
            self.close()

    def _handle_events(self) -> None:
        while self.transport is not None:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self.request is not None:
                    # Garbage after a complete request: let its response finish, then close.
                    self.pause_reading()
                    return
                self._refuse(exc.error_status_hint, f"invalid HTTP request: {exc}")
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:  # a pipelined request waits for the current response
                self.pause_reading()
                return
            if isinstance(event, h11.Request):
                self._cancel_head_deadline()
                # h11 bounds only a head still incomplete; one that arrived in a single read is measured here.
                head_bytes = len(event.target) + sum(len(name) + len(value) + 4 for name, value in event.headers)
                if head_bytes > self.server.limits.max_head_bytes:
                    self._refuse(431, f"request head over the limit of {self.server.limits.max_head_bytes} bytes")
                    return
                self.request = _Request(self, event)
                self.request.task = self.loop.create_task(self.request.run())
            elif isinstance(event, h11.Data):
                if self.request is not None:
                    self.request.body_arrived(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if self.request is not None:
                    self.request.body_arrived(b"", complete=True)
            elif isinstance(event, h11.ConnectionClosed):
                if self.request is None:
                    self.close()
                return

    def send_error(self, status: int, detail: str) -> bool:
        """Answer the current request with ``{"detail": ...}`` and ``Connection:
        close``; False where h11's state allows no response any more."""
        response, body = _json_error(status, detail)
        try:
            for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                self.write(self.h11.send(event) or b"")
        except h11.LocalProtocolError:
            return False
        return True

    def _refuse(self, status: int, detail: str) -> None:
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.send_error(status, detail)
        self.close()

    def pause_reading(self) -> None:
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading and self.transport is not None:
            self.reading = True
            self.transport.resume_reading()

    def resume_body_reading(self) -> None:
        """Read on while the current request's body is still arriving, and only
        then: a pipelined request waits unread (in the socket, not in memory)
        until the current response is complete."""
        if self.h11.their_state is h11.SEND_BODY:
            self.resume_reading()

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing():
            transport.close()
        if transport.get_write_buffer_size() and self.drain_deadline is None:
            # close() waits for the buffer to drain; a client that stops reading would hold it for ever.
            self.drain_deadline = self.loop.call_later(self.server.limits.head_timeout_s, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def response_complete(self) -> None:
        """The current response is sent: close, or wait for the next request."""
        self.request = None
        if self.h11.our_state is h11.MUST_CLOSE or self.server.stopping or self.peer_eof or self.transport is None:
            self.close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:  # the client had not finished sending its request
            self.close()
            return
        self._arm_head_deadline()
        self.resume_reading()
        self._handle_events()  # a pipelined request already buffered


class _Request:
    """One request's ASGI exchange: the body in, the response out."""

    def __init__(self, connection: _Connection, request: h11.Request) -> None:
        self.connection = connection
        self.method = request.method.decode("ascii")
        target = request.target
        path, _, query = target.partition(b"?")
        self.scope: Scope = {
            **connection.scope_base,
            "http_version": request.http_version.decode("ascii"),
            "method": self.method,
            "path": unquote(path.decode("ascii", "replace")),
            "raw_path": path,
            "query_string": query,
            "headers": list(request.headers),  # h11 lowercases the names
            "state": dict(connection.state),
        }
        self.body: list[bytes] = []
        self.buffered = 0
        self.body_complete = False
        self.end_delivered = False  # the app has had the message with more_body False
        self.gone = False
        self.wake = asyncio.Event()
        self.response_started = False
        self.response_complete = False
        self.task: asyncio.Task[None] | None = None  # held while it runs: the loop keeps tasks only weakly

    # connection side

    def body_arrived(self, data: bytes, complete: bool = False) -> None:
        if data:
            self.body.append(data)
            self.buffered += len(data)
            if self.buffered > BODY_WINDOW_BYTES:
                self.connection.pause_reading()
        self.body_complete = self.body_complete or complete
        self.wake.set()

    def disconnected(self) -> None:
        self.gone = True
        self.wake.set()

    # ASGI side

    async def receive(self) -> Message:
        connection = self.connection
        if connection.h11.they_are_waiting_for_100_continue and not self.gone:
            connection.write(
                connection.h11.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")) or b""
            )
        while True:
            if self.body or (self.body_complete and not self.end_delivered):
                chunk = b"".join(self.body)
                self.body.clear()
                self.buffered = 0
                self.end_delivered = self.body_complete
                connection.resume_body_reading()
                return {"type": "http.request", "body": chunk, "more_body": not self.body_complete}
            if self.gone or self.response_complete:
                return {"type": "http.disconnect"}
            self.wake.clear()
            connection.resume_body_reading()
            await self.wake.wait()

    async def send(self, message: Message) -> None:
        connection = self.connection
        kind = message["type"]
        if self.gone:
            return
        if not connection.writable.is_set():
            try:  # a client that stops reading holds the response no longer than this
                await asyncio.wait_for(connection.writable.wait(), connection.server.limits.head_timeout_s)
            except TimeoutError:
                connection.abort()
                self.gone = True
                return
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("http.response.start sent twice")
            self.response_started = True
            headers = [(bytes(name).lower(), bytes(value)) for name, value in message.get("headers", ())]
            if not any(name == b"date" for name, _ in headers):
                headers.append((b"date", _http_date()))
            if connection.server.stopping:
                headers.append((b"connection", b"close"))
            status = message["status"]
            response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
            connection.write(connection.h11.send(response) or b"")
        elif kind == "http.response.body":
            if not self.response_started or self.response_complete:
                raise RuntimeError("http.response.body outside a response")
            body = message.get("body", b"")
            if body and self.method != "HEAD":
                # Passed through, not joined: h11 would copy the whole body into one new bytes object.
                # Written at once: the socket takes most of it, and writing in slices that each wait
                # for the transport to drain cost a GIL hand-off per slice while the sampler ticks
                # (/metrics p99 5 -> 45 ms with 500 jobs).
                for piece in connection.h11.send_with_data_passthrough(h11.Data(data=body)) or ():
                    connection.write(piece)
            if not message.get("more_body", False):
                self.response_complete = True
                connection.write(connection.h11.send(h11.EndOfMessage()) or b"")
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def run(self) -> None:
        connection = self.connection
        try:
            await connection.server.app(self.scope, self.receive, self.send)
        except Exception:  # noqa: BLE001 - one failed request must not take the listener down
            log.exception("HTTP request %s %s failed", self.method, self.scope["path"])
            if not self.response_started and not self.gone:
                self.response_complete = connection.send_error(500, "internal error")
            if not self.response_complete:
                connection.close()
                return
        else:
            if not self.response_complete and not self.gone:
                if not self.response_started:
                    log.error("HTTP request %s %s: the app sent no response", self.method, self.scope["path"])
                    connection.send_error(500, "internal error: no response")
                else:
                    connection.close()
                    return
        finally:
            self.task = None
        if not self.body_complete and connection.h11.their_state is h11.SEND_BODY:
            connection.close()  # an unread body: the next request cannot be found after it
            return
        connection.response_complete()


class HTTPServer:
    """Serves one ASGI app on one listening socket until ``stop()``."""

    def __init__(
        self, app: ASGIApp, sock: socket.socket, limits: ListenerLimits, connection_state: ConnectionState | None = None
    ) -> None:
        self.app = app
        self.sock = sock
        self.limits = limits
        self.connection_state = connection_state
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.started = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by serve()
        self._stop: asyncio.Event | None = None

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.stopping:
            return
        self.sock.setblocking(False)
        server = await self.loop.create_server(lambda: _Connection(self), sock=self.sock, backlog=2048)
        self.started = True
        try:
            await self._stop.wait()
        finally:
            self.stopping = True
            server.close()
            for connection in list(self.connections):
                if connection.request is None:
                    connection.close()
            deadline = self.loop.time() + SHUTDOWN_GRACE_S
            while self.connections and self.loop.time() < deadline:
                await asyncio.sleep(0.05)
            for connection in list(self.connections):
                connection.abort()

    def stop(self) -> None:
        """Stop accepting, finish in-flight requests; safe from any thread."""
        self.stopping = True
        if self._stop is not None:
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop has already closed
                pass
