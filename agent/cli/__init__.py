"""The `jouleward` command line; `agent.cli:main` is the console script's entry point."""

from agent.cli.app import main

__all__ = ["main"]
