"""`kintsugi export RUN_DIR [--out DIR]`: OME-TIFF volumes of a run for Fiji, napari or tifffile."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from kintsugi_daemon.service.export import ExportWarning, export_run

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="assemble a run's slices into OME-TIFF volumes")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's folder (holds run.json)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/export)")
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(f"kintsugi export: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        paths = export_run(args.run_dir, args.out, progress=progress)
    for w in caught:
        print(f"kintsugi export: warning: {w.message}", file=sys.stderr)
    for path in paths:  # stdout carries only the files written, one a line, for scripts
        print(path)
    return 0
