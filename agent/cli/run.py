"""``jouleward run``: the daemon, until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import resource
import sys

from agent.cli.common import EXIT_FAILURE, EXIT_USAGE, config_from_args


def raise_open_file_limit() -> None:
    """The soft open-file limit up to the hard one, as Go programs do: the
    scanner keeps the stat files of the processes it reads open (a quarter of
    the limit at most), and systemd's default soft limit is 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; the scanner keeps fewer files open


def command(args: argparse.Namespace) -> int:
    from agent.api.server import ServeError, ServeFailed, serve
    from agent.ledger.totals import LedgerError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    raise_open_file_limit()
    try:
        serve(config, fresh_ledger=args.fresh_ledger)
    except (LedgerError, ServeError) as exc:
        print(f"jouleward: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ServeFailed as exc:
        print(f"jouleward: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
