"""The one base of jouleward's own exceptions.

Every error a user can cause or meet derives from ``JoulewardError``; each
stage's error adds the standard class it behaves as (``ValueError``,
``RuntimeError``, ``LookupError``), so existing handlers keep working.

- ``agent.config.ConfigError``: configuration that cannot be used.
- ``agent.ledger.totals.LedgerError``: the ledger's SQLite file cannot be opened.
- ``agent.api.server.ServeError``: a listener cannot be set up.
- ``agent.api.access.ControlError``: a control request is refused (status and message).
- ``agent.workloads.registry.RegistrationError`` / ``UnknownJob``.
"""

from __future__ import annotations


class JoulewardError(Exception):
    """Base of every jouleward error."""
