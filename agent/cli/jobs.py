"""``jouleward jobs`` and ``jouleward report``: from the running agent, or the
state directory's ledger when none runs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from agent.cli.common import EXIT_USAGE, config_from_args
from agent.config import Config, ConfigError


def jobs_from_agent_or_ledger(config: Config, job_id: str | None) -> list[dict[str, Any]]:
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
    ledger = Ledger(config.state_dir, read_only=True)  # raises LedgerError: one message, exit 2
    try:
        records = [ledger.job(job_id)] if job_id else ledger.all_jobs()
    finally:
        ledger.close()
    if job_id and records[0] is None:
        raise ConfigError(f"no job {job_id!r} in {config.state_dir}")
    return [job_out(r).model_dump() for r in records if r is not None]


def report_command(args: argparse.Namespace) -> int:
    from agent.cli.reader import AgentAnswer, AgentNotRunning, AgentReader
    from exporters import report

    config = config_from_args(args)
    try:
        rows = json.loads(
            AgentReader(config.listen, control_sockets=config.control_socket_candidates).report(args.job_id, "json")
        )
    except AgentNotRunning:
        jobs = jobs_from_agent_or_ledger(config, args.job_id)
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


def jobs_command(args: argparse.Namespace) -> int:
    from agent.cli.reader import AgentAnswer
    from agent.cli.top import energy_text

    try:
        jobs = jobs_from_agent_or_ledger(config_from_args(args), None)
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
