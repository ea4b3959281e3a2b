"""``jouleward run``: the daemon, until SIGTERM."""

from __future__ import annotations

import argparse
import ctypes
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


M_ARENA_MAX = -8  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
DAEMON_MALLOC_ARENAS = 2
DAEMON_MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, kept from moving


def trim_daemon_memory() -> None:
    """Three memory cuts for the long-running daemon, measured in
    docs/performance.md ("Cutting the daemon's RSS"):

    - FastAPI imports its pydantic-v1 compatibility module while it builds
      routes, only to check whether a model is a v1 model; the agent has none.
      A ``None`` entry in ``sys.modules`` makes that import fail, which FastAPI
      reads as "no v1 models" (about 1.2 MiB).
    - glibc gives every thread that allocates its own malloc arena; the
      daemon's few mostly idle threads share two (about 0.5 MiB).
    - glibc raises its mmap threshold each time a large block is freed, so
      the exposition's large buffers (hundreds of KiB per rendering) soon come
      from the heap, whose freed space is kept; a fixed threshold maps and
      unmaps them instead (about 1 MiB after a few hundred scrapes).
    """
    sys.modules.setdefault("pydantic.v1", None)  # type: ignore[arg-type]
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into the process
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt(M_ARENA_MAX, DAEMON_MALLOC_ARENAS)
    mallopt(M_MMAP_THRESHOLD, DAEMON_MMAP_THRESHOLD_BYTES)


def command(args: argparse.Namespace) -> int:
    trim_daemon_memory()
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
