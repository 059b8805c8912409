"""The morning report: `kintsugi report RUN_DIR` writes one self-contained HTML file and a PDF."""

from kintsugi_daemon.report.document import ReportFiles, write_report

__all__ = ["ReportFiles", "write_report"]
