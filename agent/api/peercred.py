"""HTTP over a Unix socket with the peer's credentials on every request.

uvicorn hides the socket from the ASGI app, so the protocol looks up
SO_PEERCRED once per connection and hands it to the app through the
per-request ``state`` that uvicorn copies into each scope.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.api.access import Caller, peer_credentials
from agent.api.http_guard import DeadlineH11Protocol

STATE_KEY = "jouleward_peer"


class PeerCredH11Protocol(DeadlineH11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        caller = peer_credentials(sock) if sock is not None else None
        self.app_state = {**self.app_state, STATE_KEY: caller}


def peer_of(state: Any) -> Caller | None:
    """The Unix-socket caller behind a request (``request.state``), if any."""
    return getattr(state, STATE_KEY, None)
