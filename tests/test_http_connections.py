"""The agent's HTTP server (agent/api/http_server.py) on real sockets:
keep-alive and pipelining, the head deadline, HEAD, bad requests, and
closed connections let go of at once.

A connection's head deadline is a timer on the event loop; a timer left
pending holds the connection and its buffers until it fires, so a burst of
short requests (a cluster of jobs registering) would keep every closed
connection resident for the whole deadline.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

from agent.api import http_server
from agent.api.http_server import HTTPServer, ListenerLimits


async def echo_app(scope, receive, send) -> None:
    """Answers with what it was asked: method, path, query and the body's length."""
    assert scope["type"] == "http"
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = json.dumps(
        {"method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(), "body": len(body)}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


class Served:
    def __init__(self, head_timeout_s: float, max_head_bytes: int = 16 * 1024) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.server = HTTPServer(echo_app, self.sock, ListenerLimits(head_timeout_s, max_head_bytes))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served(head_timeout_s=60.0)  # far longer than any test: only a cancelled timer lets go in time
    yield s
    s.stop()


def read_responses(
    sock: socket.socket, count: int, heads: tuple[int, ...] = ()
) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` responses with Content-Length bodies, in order; those at the
    indexes in ``heads`` answer HEAD requests (no body whatever the length)."""
    buffer = b""
    out = []
    while len(out) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} responses"
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = 0 if len(out) in heads else int(headers.get("content-length", "0"))
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a body"
            buffer += chunk
        out.append((status, headers, buffer[:length]))
        buffer = buffer[length:]
    assert buffer == b"", f"more than {count} responses: {buffer[:80]!r}"
    return out


def test_keep_alive_and_pipelined_requests_are_answered_in_order(served):
    with served.connect() as sock:
        sock.sendall(
            b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /b%20c HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
            b"HEAD /d HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /e HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        time.sleep(0.3)  # everything answered: a HEAD answer with a body would show as extra bytes
        (s1, h1, b1), (s2, _h2, b2), (s3, h3, b3), (s4, _h4, b4) = read_responses(sock, 4, heads=(2,))
    assert (s1, json.loads(b1)) == (200, {"method": "GET", "path": "/a", "query": "x=1", "body": 0})
    assert (s2, json.loads(b2)) == (200, {"method": "POST", "path": "/b c", "query": "", "body": 5})
    head_answer = json.dumps({"method": "HEAD", "path": "/d", "query": "", "body": 0})
    assert (s3, b3, int(h3["content-length"])) == (200, b"", len(head_answer))
    assert (s4, json.loads(b4)["path"]) == (200, "/e")
    assert "date" in h1


def test_a_large_body_arrives_whole(served):
    body = b"x" * (3 * http_server.BODY_WINDOW_BYTES + 7)
    with served.connect() as sock:
        sock.sendall(b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        [(status, _headers, answer)] = read_responses(sock, 1)
    assert (status, json.loads(answer)["body"]) == (200, len(body))


def test_a_malformed_request_gets_400_with_a_message_and_the_server_keeps_serving(served):
    with served.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n")
        [(status, headers, body)] = read_responses(sock, 1)
        assert status == 400 and headers["connection"] == "close"
        assert "invalid HTTP request" in json.loads(body)["detail"]
        assert sock.recv(10) == b""  # closed
    with served.connect() as sock:
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
        assert json.loads(read_responses(sock, 1)[0][2])["path"] == "/after"


def test_a_head_over_the_limit_gets_431():
    small = Served(head_timeout_s=60.0, max_head_bytes=1024)
    try:
        with small.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
            [(status, _headers, body)] = read_responses(sock, 1)
        assert status == 431 and json.loads(body)["detail"]
    finally:
        small.stop()


def test_a_request_head_that_does_not_arrive_in_time_is_closed_and_others_are_served():
    quick = Served(head_timeout_s=0.5)
    try:
        with quick.connect() as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHo")
            started = time.monotonic()
            with quick.connect() as other:
                other.sendall(b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
                assert json.loads(read_responses(other, 1)[0][2])["path"] == "/other"
            slow.settimeout(5)
            assert slow.recv(10) == b""
            assert 0.4 < time.monotonic() - started < 3
        # An idle keep-alive connection ends the same way.
        with quick.connect() as idle:
            idle.sendall(b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n")
            read_responses(idle, 1)
            idle.settimeout(5)
            assert idle.recv(10) == b""
    finally:
        quick.stop()


def test_closed_connections_are_released_before_their_head_deadline(served, monkeypatch):
    alive: list[weakref.ref] = []
    made = http_server._Connection.connection_made

    def recording(self, transport):
        alive.append(weakref.ref(self))
        made(self, transport)

    monkeypatch.setattr(http_server._Connection, "connection_made", recording)
    for _ in range(20):
        with served.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" * 3)
            assert [status for status, _h, _b in read_responses(sock, 3)] == [200, 200, 200]
    assert len(alive) == 20
    deadline = time.monotonic() + 5
    while True:
        gc.collect()
        held = sum(ref() is not None for ref in alive)
        if held == 0:
            break
        assert time.monotonic() < deadline, f"{held} of 20 closed connections are still held"
        time.sleep(0.1)


async def failing_app(scope, receive, send) -> None:
    if scope["path"] == "/fail":
        raise RuntimeError("boom")
    await echo_app(scope, receive, send)


def test_an_app_that_fails_gets_a_500_with_a_message_and_the_listener_keeps_serving(monkeypatch):
    s = Served(head_timeout_s=60.0)
    monkeypatch.setattr(s.server, "app", failing_app)
    try:
        with s.connect() as sock:
            sock.sendall(b"GET /fail HTTP/1.1\r\nHost: h\r\n\r\n")
            [(status, headers, body)] = read_responses(sock, 1)
        assert (status, json.loads(body), headers["connection"]) == (500, {"detail": "internal error"}, "close")
        with s.connect() as sock:
            sock.sendall(b"GET /fine HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            time.sleep(0.2)
            sock.sendall(b"abc")
            data = b""
            while not data.endswith(b"}"):
                data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
        assert json.loads(data.split(b"\r\n\r\n")[-1]) == {"method": "GET", "path": "/fine", "query": "", "body": 3}
    finally:
        s.stop()


async def slow_big_app(scope, receive, send) -> None:
    """Reads its body, waits 50 ms, answers with 2 MB."""
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(0.05)
    body = b"y" * 2_000_000
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def test_a_half_closed_client_still_gets_its_answer(served, monkeypatch):
    monkeypatch.setattr(served.server, "app", slow_big_app)  # still working when the half-close arrives
    with served.connect() as sock:
        sock.sendall(b"GET /half HTTP/1.1\r\nHost: h\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        [(status, _headers, body)] = read_responses(sock, 1)
        assert (status, len(body)) == (200, 2_000_000)
        assert sock.recv(10) == b""  # then closed


def test_stray_bytes_after_a_closing_request_do_not_spoil_its_answer(served):
    with served.connect() as sock:
        sock.sendall(b"POST /p HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}\r\n")
        [(status, _headers, body)] = read_responses(sock, 1)
    assert (status, json.loads(body)["body"]) == (200, 2)


def test_a_client_that_stops_reading_is_dropped_after_the_deadline(monkeypatch):
    s = Served(head_timeout_s=0.5)
    monkeypatch.setattr(s.server, "app", slow_big_app)
    try:
        readers = []
        for _ in range(3):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", s.port))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" * 2)  # two 2 MB answers, never read
            readers.append(sock)
        deadline = time.monotonic() + 10
        while s.server.connections:
            assert time.monotonic() < deadline, f"{len(s.server.connections)} non-reading clients still held"
            time.sleep(0.1)
        for sock in readers:
            sock.close()
    finally:
        s.stop()


def test_a_pipelining_flood_is_left_in_the_socket_not_read_into_memory(monkeypatch):
    s = Served(head_timeout_s=30.0)
    monkeypatch.setattr(s.server, "app", slow_big_app)
    try:
        with s.connect() as sock:
            sock.setblocking(False)
            request = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" * 1000
            sent = 0
            end = time.monotonic() + 2
            while time.monotonic() < end:  # write as much as the server lets in, read nothing
                try:
                    sent += sock.send(request)
                except BlockingIOError:
                    time.sleep(0.01)
            buffered = max(len(c.h11._receive_buffer) for c in s.server.connections)
            assert sent > 1_000_000, "the test did not manage to pipeline much"
            assert buffered < 512 * 1024, f"{buffered} bytes of pipelined requests read into memory"
    finally:
        s.stop()
