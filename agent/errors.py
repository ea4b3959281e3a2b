"""The one base of jouleward's own exceptions.

A stage's error derives from ``JoulewardError`` and from the standard class
it behaves as, so existing handlers keep working:

- ``agent.config.ConfigError`` (a ``ValueError``): configuration that cannot be used.
- ``agent.ledger.totals.LedgerError`` (a ``RuntimeError``): the ledger's SQLite file cannot be opened.
- ``agent.api.access.ControlError``: a control request is refused (``status`` and ``message``).
- ``agent.carbon.tables.CarbonTableError`` (a ``LookupError``): a zone or data file codecarbon lacks.

The other stages' errors join as they are next changed.
"""

from __future__ import annotations


class JoulewardError(Exception):
    """Base of every jouleward error."""
