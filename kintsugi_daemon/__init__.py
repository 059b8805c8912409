"""kintsugi-daemon: unattended kintsugi serial sectioning on plasma FIB-SEM DualBeams."""

from importlib.metadata import PackageNotFoundError, version

# One version, declared once in pyproject.toml and read from the installed package's metadata.
try:
    __version__ = version("kintsugi-daemon")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
