"""Per-job, per-domain and per-device energy totals, and their SQLite storage."""
