"""Runs a real agent with its control API on a Unix socket: ``python -m
tests.support.control_agent STATE_DIR SOCKET``. Ticks every 0.2 s."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

from agent.config import Config
from agent.control_api import WorkUnits, control_app
from agent.daemon import Agent
from agent.peercred_http import unix_server


def main() -> None:
    state_dir, socket_path = Path(sys.argv[1]), sys.argv[2]
    agent = Agent(Config(state_dir=state_dir, interval_s=0.2))
    threading.Thread(target=agent.run, daemon=True).start()
    unix_server(control_app(agent, WorkUnits()), socket_path).run()
    agent.stop()


if __name__ == "__main__":
    main()
