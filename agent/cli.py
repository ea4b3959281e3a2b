"""Command line: ``jouleward run`` and ``jouleward doctor``.

Every user error prints one message naming the flag or key and exits 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import Config, ConfigError, build

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep one format
        self.print_usage(sys.stderr)
        print(f"jouleward: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_agent_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--listen", help="host:port of the HTTP listener (default 127.0.0.1:9883)")
    parser.add_argument("--state-dir", dest="state_dir", help="where the ledger lives (default /var/lib/jouleward)")
    parser.add_argument("--control-socket", dest="control_socket",
                        help="Unix socket for control endpoints (default <state-dir>/control.sock)")
    parser.add_argument("--sysfs", help="sysfs root (default /sys; /host/sys in a DaemonSet)")
    parser.add_argument("--procfs", help="procfs root (default /proc; /host/proc in a DaemonSet)")
    parser.add_argument("--interval", dest="interval_s", help="seconds between samples (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jouleward", description="Energy and carbon telemetry for machine-learning hosts.")
    parser.add_argument("--version", action="version", version=f"jouleward {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="run the agent")
    _add_agent_flags(run)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    doctor = commands.add_parser("doctor", help="which sensors this host offers, and why not")
    _add_agent_flags(doctor)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    flags: dict[str, Any] = {
        key: getattr(args, key, None)
        for key in ("listen", "state_dir", "control_socket", "sysfs", "procfs", "interval_s")
    }
    return build(file_path=args.config, flags=flags)


def _run(args: argparse.Namespace) -> int:
    from agent.ledger import LedgerError
    from agent.server import ServeError, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        serve(config)
    except (LedgerError, ServeError) as exc:
        print(f"jouleward: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from agent.doctor import examine, report

    text, code = report(examine(config_from_args(args)))
    print(text)
    return code


COMMANDS = {"run": _run, "doctor": _doctor}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wrap"]:  # its own parser: everything after -- belongs to the command
        from agent.wrap import main as wrap_main

        return wrap_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"jouleward: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
