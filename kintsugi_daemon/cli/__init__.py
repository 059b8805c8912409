"""The `kintsugi` command line: one module per command, each registering its own subcommand."""

from kintsugi_daemon.cli.main import main

__all__ = ["main"]
