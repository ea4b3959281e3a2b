"""``jouleward wrap [--name N] [--label k=v]... [--report FILE] -- COMMAND ARGS...``

Runs a command as a model job: through the running agent when one listens on
the control socket, else measured in-process. Output passes straight through
(the command inherits the terminal), signals sent to the wrapper are
forwarded, and the wrapper exits with the command's status (128 + signal
when a signal killed it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

from agent.api.access import ControlError, validate_job_name, validate_labels
from agent.client import (
    JOB_ID_ENV,
    SOCKET_ENV,
    AgentError,
    AgentUnavailable,
    Job,
    JobSummary,
    first_socket,
)
from agent.config import ConfigError, build

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_SI_KERNEL = 0x80  # si_code of signals the terminal driver sends to the whole foreground group


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jouleward wrap", description="Run a command as a measured model job.")
    parser.add_argument("--name", help="job name (default: the command's base name)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="job label, repeatable")
    parser.add_argument("--report", type=Path, metavar="FILE.json", help="write the summary as JSON to this file")
    parser.add_argument(
        "--emissions-csv",
        dest="emissions_csv",
        type=Path,
        metavar="emissions.csv",
        help="append the job as a row of codecarbon's emissions.csv (header written once)",
    )
    # Located as every command locates the agent: flags, then JOULEWARD_* variables, then --config.
    parser.add_argument("--config", type=Path, help="TOML configuration file (its control_socket, state_dir)")
    parser.add_argument("--state-dir", dest="state_dir", help="the agent's state directory")
    parser.add_argument(
        "--control-socket",
        "--socket",
        dest="control_socket",
        type=Path,
        help="agent control socket (default: $JOULEWARD_CONTROL_SOCKET, else <state-dir>/control.sock, "
        "/run/jouleward/control.sock or /var/lib/jouleward/control.sock, the first that exists)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--standalone", action="store_true", help="measure in-process even if an agent runs")
    mode.add_argument("--require-agent", action="store_true", help="fail unless the agent registers the job")
    parser.add_argument("--interval", type=float, default=0.5, help="standalone sampling period in seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("no command given: jouleward wrap [options] -- COMMAND ARGS...")
    args.command = command
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    try:
        args.name = validate_job_name(args.name if args.name is not None else Path(command[0]).name)
        args.labels = validate_labels(labels)
    except ControlError as exc:
        raise UsageError(exc.message.replace("name:", "--name:").replace("labels", "--label")) from None
    if not 0.05 <= args.interval <= 60:
        raise UsageError("--interval: expected 0.05..60 seconds")
    try:
        config = build(
            file_path=args.config, flags={"state_dir": args.state_dir, "control_socket": args.control_socket}
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    args.socket = first_socket(config.control_socket_candidates)
    return args


def format_summary(summary: JobSummary) -> str:
    parts = ", ".join(f"{domain} {energy:.2f} J" for domain, energy in sorted(summary.energy_j.items()))
    sources = ", ".join(f"{domain}: {source}" for domain, source in sorted(summary.sources.items()))
    lines = [
        f"jouleward: job {summary.name!r} ({summary.mode}{'; ' + sources if sources else ''})",
        f"  duration  {summary.duration_s:.2f} s",
        f"  energy    {summary.total_energy_j:.2f} J" + (f" ({parts})" if parts else ""),
        f"  power     {summary.average_power_w:.2f} W average",
    ]
    if summary.emissions_g is not None:
        lines.append(f"  emissions {summary.emissions_g:.4f} gCO2eq")
    if summary.work_units:
        work = ", ".join(f"{count:g} {unit}" for unit, count in sorted(summary.work_units.items()))
        lines.append(f"  work      {work}")
        for unit, count in sorted(summary.work_units.items()):
            if count > 0:
                lines.append(f"            {summary.total_energy_j / count:.6g} J per {unit.rstrip('s') or unit}")
    return "\n".join(lines)


def _wait(pid: int, signals: set[int]) -> None:
    """Forward signals until the child exits; leave it unreaped (a zombie keeps its CPU times)."""
    while True:
        info = signal.sigtimedwait(signals, 1.0)
        if info is not None and info.si_signo != signal.SIGCHLD:
            # The terminal already delivered Ctrl-C and friends to the child's
            # group; forwarding those again would signal it twice.
            if info.si_code != _SI_KERNEL and info.si_pid != pid:
                try:
                    os.kill(pid, info.si_signo)
                except ProcessLookupError:
                    pass
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return


def run(args: argparse.Namespace, err: TextIO) -> int:
    signals = {*FORWARDED, signal.SIGCHLD}
    # Block before anything starts a thread, so only sigtimedwait sees them.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        job = Job(args.name, args.labels, socket_path=args.socket, standalone=False, interval_s=args.interval)
        fallback = ""
        try:
            if args.standalone:
                raise AgentUnavailable("standalone requested")
            job.start()  # the wrapper itself is the root: the command is its child from the start
        except AgentUnavailable as exc:
            if args.require_agent:
                print(f"jouleward wrap: {exc}", file=err)
                return 2
            fallback = "standalone"
        except AgentError as exc:
            if exc.status != 409 or args.require_agent:
                print(f"jouleward wrap: the agent refused the job: {exc.message}", file=err)
                return 2
            # Already inside a registered job (a Slurm prolog's, an outer wrap): the agent books
            # the command there; its own figures are measured here.
            print(f"jouleward wrap: {exc.message}; measuring this command standalone", file=err)
            fallback = "standalone"
        if fallback:
            # Measured here: the command is the root, so the meter's own work is not charged to it.
            job = Job(args.name, args.labels, standalone=True, interval_s=args.interval)
            job.prime()
        env = dict(os.environ)
        if job.mode == "agent":
            env[JOB_ID_ENV] = job.job_id
            env[SOCKET_ENV] = str(job.client.path)
        try:
            pid = os.posix_spawnp(
                args.command[0], args.command, env, setsigmask=old_mask, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ)
            )
        except OSError as exc:
            try:
                job.abandon()
            except (AgentError, AgentUnavailable, OSError):
                pass
            print(f"jouleward wrap: cannot run {shlex.join(args.command[:1])}: {exc.strerror}", file=err)
            return 127 if isinstance(exc, FileNotFoundError) else 126
        if job.mode != "agent":
            job.start([pid])
        _wait(pid, signals)
        summary: JobSummary | None = None
        try:
            summary = job.finish()  # the agent samples once more first: the last partial interval is the job's
        except (AgentError, AgentUnavailable, OSError) as exc:
            # The command ran; its status is the answer whatever became of the agent.
            print(f"jouleward wrap: cannot finish job {job.job_id} with the agent ({exc}); no energy figures", file=err)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if summary is None:
        return code if code >= 0 else 128 - code
    print(format_summary(summary), file=err)
    if args.emissions_csv is not None:
        _append_emissions(args.emissions_csv, job, summary, err)
    if args.report is not None:
        report = {**summary.as_dict(), "command": args.command, "exit_status": code if code >= 0 else 128 - code}
        try:
            args.report.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            print(f"jouleward wrap: cannot write {args.report}: {exc.strerror}", file=err)
    return code if code >= 0 else 128 - code


def _append_emissions(path: Path, job: Job, summary: JobSummary, err: TextIO) -> None:
    """The agent's own report row (its zone and PUE); measured here, the defaults' row."""
    import time

    from agent.config import CarbonConfig
    from exporters import report

    try:
        if job.mode == "agent":
            rows = job.client.request("GET", f"/v1/jobs/{quote(summary.job_id, safe='')}/report?format=json")
        else:
            now = time.time()
            figures = {
                "id": summary.job_id,
                "name": summary.name,
                "energy_j": summary.energy_j,
                "emissions_g": summary.emissions_g,
                "work_units": summary.work_units,
                "first_seen": now - summary.duration_s,
                "finished_at": now,
            }
            rows = [report.report_row(report.job_emissions(figures, report.site_from_config(CarbonConfig()), 1.0, now))]
        report.append_csv(path, rows)
    except (AgentError, AgentUnavailable, report.ReportError, OSError, ValueError) as exc:
        print(f"jouleward wrap: cannot append to {path}: {exc}", file=err)


def main(argv: list[str] | None = None, err: TextIO = sys.stderr) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"jouleward wrap: {exc}", file=err)
        return 2
    return run(args, err)


if __name__ == "__main__":
    sys.exit(main())
