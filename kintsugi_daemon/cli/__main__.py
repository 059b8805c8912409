"""`python -m kintsugi_daemon.cli`: the same entry point as the `kintsugi` script."""

import sys

from kintsugi_daemon.cli.main import main

sys.exit(main())
