"""HTTP over a Unix socket with the peer's credentials on every request.

The server looks up SO_PEERCRED once per connection and hands it to the app
through the per-request ``state`` that it copies into each scope.
"""

from __future__ import annotations

import socket
from typing import Any

from agent.api.access import Caller, peer_credentials

STATE_KEY = "jouleward_peer"


def unix_peer_state(sock: socket.socket) -> dict[str, Any]:
    """The per-connection state of a control-socket connection: its caller."""
    return {STATE_KEY: peer_credentials(sock)}


def peer_of(state: Any) -> Caller | None:
    """The Unix-socket caller behind a request (``request.state``), if any."""
    return getattr(state, STATE_KEY, None)
