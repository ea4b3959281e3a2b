"""What every command shares: the parser that exits 2 with one message, the
flags that locate the agent, and the configuration built from them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.config import Config, build

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the agent ran and a part of it died: a service manager should restart it


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep one format
        self.print_usage(sys.stderr)
        print(f"jouleward: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def fail(message: str) -> int:
    print(f"jouleward: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def add_agent_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--listen", help="host:port of the HTTP listener (default 127.0.0.1:9883)")
    parser.add_argument("--state-dir", dest="state_dir", help="where the ledger lives (default /var/lib/jouleward)")
    parser.add_argument(
        "--control-socket",
        dest="control_socket",
        help="Unix socket for control endpoints (default <state-dir>/control.sock)",
    )
    parser.add_argument("--sysfs", help="sysfs root (default /sys; /host/sys in a DaemonSet)")
    parser.add_argument("--procfs", help="procfs root (default /proc; /host/proc in a DaemonSet)")
    parser.add_argument("--interval", dest="interval_s", help="seconds between samples (default 1)")


def config_from_args(args: argparse.Namespace) -> Config:
    flags: dict[str, Any] = {
        key: getattr(args, key, None)
        for key in ("listen", "state_dir", "control_socket", "sysfs", "procfs", "interval_s")
    }
    return build(file_path=args.config, flags=flags)
