"""``jouleward run``: the daemon, until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys

from agent.cli.common import EXIT_FAILURE, EXIT_USAGE, config_from_args


def command(args: argparse.Namespace) -> int:
    from agent.api.server import ServeError, ServeFailed, serve
    from agent.ledger.totals import LedgerError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        serve(config, fresh_ledger=args.fresh_ledger)
    except (LedgerError, ServeError) as exc:
        print(f"jouleward: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ServeFailed as exc:
        print(f"jouleward: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
