"""The HTTP listeners let go of a closed connection at once.

A connection's head deadline is a timer on the event loop; a timer left
pending holds the protocol, its transport and its buffers until it fires,
so a burst of short requests (a cluster of jobs registering) would keep
every closed connection resident for the whole deadline.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import weakref

import uvicorn

from agent.api.http_guard import DeadlineH11Protocol, with_header_timeout

HEAD_DEADLINE_S = 60.0  # far longer than the test: only a cancelled timer lets go in time


async def tiny_app(scope, receive, send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def keep_alive_exchange(port: int, requests: int) -> list[bytes]:
    """``requests`` requests on one connection, then close it."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(requests):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok"):
                chunk = sock.recv(4096)
                assert chunk, "the server closed the connection early"
                answer += chunk
            answers.append(answer)
    return answers


def test_closed_connections_are_released_before_their_head_deadline():
    alive: list[weakref.ref] = []

    class Recorded(with_header_timeout(DeadlineH11Protocol, HEAD_DEADLINE_S)):  # type: ignore[misc]
        def connection_made(self, transport):
            alive.append(weakref.ref(self))
            super().connection_made(transport)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(tiny_app, http=Recorded, lifespan="off", log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        for _ in range(20):
            answers = keep_alive_exchange(port, requests=3)
            assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 3
        assert len(alive) == 20
        deadline = time.monotonic() + 5
        while True:
            gc.collect()
            held = sum(ref() is not None for ref in alive)
            if held == 0:
                break
            assert time.monotonic() < deadline, f"{held} of 20 closed connections are still held"
            time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
