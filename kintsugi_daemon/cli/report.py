"""`kintsugi report RUN_DIR [--out DIR]`: the morning report of a run (HTML + PDF)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("report", help="a run's report: one self-contained HTML file and a PDF")
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    r.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/report)")
    r.add_argument(
        "--journal",
        type=Path,
        default=None,
        help="the daemon's journal, for the timeline (default: RUN_DIR/../journal.sqlite)",
    )
    r.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    from kintsugi_daemon.report import write_report  # matplotlib loads only for this command

    files = write_report(args.run_dir, args.out, args.journal)
    print(files.html)
    print(files.pdf)
    return 0
