"""Command line: one module per command (``run``, ``doctor``, ``jobs`` and
``report``, ``top``, ``wrap``); this one parses and dispatches.

Every user error prints one message naming the flag or key and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from agent import __version__
from agent.cli.common import EXIT_USAGE, Parser, add_agent_flags
from agent.errors import JoulewardError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jouleward", description="Energy and carbon telemetry for machine-learning hosts.")
    parser.add_argument("--version", action="version", version=f"jouleward {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = commands.add_parser("run", help="run the agent")
    add_agent_flags(run)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--fresh-ledger",
        action="store_true",
        help="start a new ledger, keeping the old file beside it as ledger.sqlite3.replaced-<time>"
        " (for a damaged or foreign file; Prometheus sees every counter reset once)",
    )
    doctor = commands.add_parser("doctor", help="which sensors this host offers, and why not")
    add_agent_flags(doctor)
    report = commands.add_parser("report", help="a job's energy and emissions in codecarbon's emissions.csv format")
    report.add_argument("job_id", metavar="JOB", help="job id, as `jouleward jobs` lists it")
    report.add_argument("--format", default="text", choices=["csv", "json", "text"])
    report.add_argument("--append", type=Path, metavar="emissions.csv", help="also append the row to this CSV file")
    add_agent_flags(report)
    jobs = commands.add_parser("jobs", help="jobs the agent knows, with energy and emissions")
    add_agent_flags(jobs)
    top = commands.add_parser("top", help="live view of the running agent (q quits)")
    # Listed for --help only: main() hands "wrap" to its own parser before this one runs.
    commands.add_parser("wrap", help="run a command as a job and print its energy: wrap [options] -- CMD ARGS...")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit (also when not a terminal)")
    add_agent_flags(top)
    return parser


# Each command's module is imported only when it runs, so `jouleward top` does not load the agent.
COMMANDS = {
    "run": ("agent.cli.run", "command"),
    "doctor": ("agent.cli.doctor", "command"),
    "report": ("agent.cli.jobs", "report_command"),
    "jobs": ("agent.cli.jobs", "jobs_command"),
    "top": ("agent.cli.top", "command"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wrap"]:  # its own parser: everything after -- belongs to the command
        from agent.cli.wrap import main as wrap_main

        return wrap_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        module, function = COMMANDS[args.command]
        return getattr(importlib.import_module(module), function)(args)
    except JoulewardError as exc:  # configuration, an unreadable ledger: one line, exit 2
        print(f"jouleward: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
