"""kintsugi-daemon: unattended kintsugi serial sectioning on plasma FIB-SEM DualBeams."""

__version__ = "0.2.0"
