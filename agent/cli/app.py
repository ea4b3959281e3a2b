"""Command line: ``jouleward run``, ``doctor``, ``report``, ``jobs`` and ``top``.

Every user error prints one message naming the flag or key and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import Config, ConfigError, build

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the agent ran and a part of it died: a service manager should restart it


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep one format
        self.print_usage(sys.stderr)
        print(f"jouleward: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_agent_flags(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jouleward", description="Energy and carbon telemetry for machine-learning hosts.")
    parser.add_argument("--version", action="version", version=f"jouleward {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="run the agent")
    _add_agent_flags(run)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    doctor = commands.add_parser("doctor", help="which sensors this host offers, and why not")
    _add_agent_flags(doctor)
    report = commands.add_parser("report", help="a job's energy and emissions in codecarbon's emissions.csv format")
    report.add_argument("job_id", metavar="JOB", help="job id, as `jouleward jobs` lists it")
    report.add_argument("--format", default="text", choices=["csv", "json", "text"])
    report.add_argument("--append", type=Path, metavar="emissions.csv", help="also append the row to this CSV file")
    _add_agent_flags(report)
    jobs = commands.add_parser("jobs", help="jobs the agent knows, with energy and emissions")
    _add_agent_flags(jobs)
    top = commands.add_parser("top", help="live view of the running agent (q quits)")
    # Listed for --help only: main() hands "wrap" to its own parser before this one runs.
    commands.add_parser("wrap", help="run a command as a job and print its energy: wrap [options] -- CMD ARGS...")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit (also when not a terminal)")
    _add_agent_flags(top)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    flags: dict[str, Any] = {
        key: getattr(args, key, None)
        for key in ("listen", "state_dir", "control_socket", "sysfs", "procfs", "interval_s")
    }
    return build(file_path=args.config, flags=flags)


def _run(args: argparse.Namespace) -> int:
    from agent.api.server import ServeError, ServeFailed, serve
    from agent.ledger.totals import LedgerError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        serve(config)
    except (LedgerError, ServeError) as exc:
        print(f"jouleward: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ServeFailed as exc:
        print(f"jouleward: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from agent.cli.doctor import examine, report

    text, code = report(examine(config_from_args(args)))
    print(text)
    return code


def _jobs_from_agent_or_ledger(config: Config, job_id: str | None) -> list[dict[str, Any]]:
    """The running agent's answer, or the state directory's ledger when no agent runs."""
    from agent.cli.reader import AgentNotRunning, AgentReader

    reader = AgentReader(config.listen, control_sockets=config.control_socket_candidates)
    try:
        return [reader.job(job_id)] if job_id else reader.jobs()
    except AgentNotRunning:
        pass
    from agent.api.models import job_out
    from agent.ledger.totals import Ledger

    if not (config.state_dir / "ledger.sqlite3").is_file():
        raise ConfigError(f"no agent answers at {config.listen} and no ledger in {config.state_dir} (--state-dir)")
    ledger = Ledger(config.state_dir)
    try:
        records = [ledger.job(job_id)] if job_id else ledger.all_jobs()
    finally:
        ledger.close()
    if job_id and records[0] is None:
        raise ConfigError(f"no job {job_id!r} in {config.state_dir}")
    return [job_out(r).model_dump() for r in records if r is not None]


def _report(args: argparse.Namespace) -> int:
    import time

    from agent.cli.reader import AgentAnswer, AgentNotRunning, AgentReader
    from exporters import report

    config = config_from_args(args)
    try:
        rows = json.loads(
            AgentReader(config.listen, control_sockets=config.control_socket_candidates).report(args.job_id, "json")
        )
    except AgentNotRunning:
        jobs = _jobs_from_agent_or_ledger(config, args.job_id)
        site = report.site_from_config(config.carbon, config.procfs)
        rows = [report.report_row(report.job_emissions(jobs[0], site, config.carbon.pue, time.time()))]
    except AgentAnswer as exc:
        print(f"jouleward: error: {exc.detail}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(report.render(rows, args.format))
    if args.append is not None:
        try:
            report.append_csv(args.append, rows)
        except (report.ReportError, OSError) as exc:
            print(f"jouleward: error: --append: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from agent.cli.reader import AgentAnswer
    from agent.cli.top import energy_text

    try:
        jobs = _jobs_from_agent_or_ledger(config_from_args(args), None)
    except AgentAnswer as exc:
        print(f"jouleward: error: {exc.detail}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{'JOB ID':<28}{'NAME':<24}{'KIND':<11}{'STATE':<10}{'ENERGY':>12}{'CO2 g':>12}")
    for job in jobs:
        print(
            f"{job['id']:<28}{job['name']:<24}{job['kind']:<11}{'running' if job['running'] else 'finished':<10}"
            f"{energy_text(sum(job['energy_j'].values())):>12}{job.get('emissions_g', 0.0):12.3f}"
        )
    return 0


def _top(args: argparse.Namespace) -> int:
    from agent.cli.reader import AgentAnswer, AgentNotRunning, AgentReader
    from agent.cli.top import run_curses, snapshot

    config = config_from_args(args)
    reader = AgentReader(
        config.listen, timeout_s=min(2.0, max(config.interval_s, 0.5)), control_sockets=config.control_socket_candidates
    )
    if args.once or not (sys.stdout.isatty() and sys.stdin.isatty()):
        try:
            sys.stdout.write(snapshot(reader))
        except (AgentNotRunning, AgentAnswer) as exc:
            print(f"jouleward: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    run_curses(reader, interval_s=1.0)
    return 0


COMMANDS = {"run": _run, "doctor": _doctor, "report": _report, "jobs": _jobs, "top": _top}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wrap"]:  # its own parser: everything after -- belongs to the command
        from agent.cli.wrap import main as wrap_main

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
