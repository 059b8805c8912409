"""Open a bridge backend: OpenFIBSEM's ThermoMicroscope (+ AutoScript), TescanMicroscope or DemoMicroscope."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Literal

from kintsugi_daemon.drivers.bridge.autoscript import AutoScriptVerbs
from kintsugi_daemon.drivers.bridge.dualbeam import BridgeDualBeam

__all__ = ["BACKENDS", "Backend", "open_backend"]

Backend = Literal["thermo", "tescan", "demo"]
BACKENDS: tuple[Backend, ...] = ("thermo", "tescan", "demo")
_MANUFACTURER = {"thermo": "Thermo", "tescan": "Tescan", "demo": "Demo"}
# The Demo's application files (OpenFIBSEM's SIMULATOR_APPLICATION_FILES): Si for every material.
DEMO_APPLICATION_FILES = {"c": "Si", "al": "Si", "pt": "Si", "deposit": "cryo_Pt_dep"}


def open_backend(
    backend: Backend,
    *,
    microscope_host: str | None,
    log_dir: Path,
    application_files: dict[str, str] | None = None,
    state_file: Path | None = None,
    gis_warmup_s: float | None = None,
) -> BridgeDualBeam:
    """Connect to the microscope (AutoScript's server on the thermo PC is localhost by default)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # OpenFIBSEM prints to stdout; our stdout carries the ready line, so its chatter goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            from fibsem import utils
        except ImportError as exc:
            raise ValueError(
                f"the bridge needs OpenFIBSEM: pip install 'kintsugi-daemon[bridge]' ({exc})"
            ) from None
        microscope, _ = utils.setup_session(
            session_path=log_dir,
            setup_logging=False,
            manufacturer=_MANUFACTURER[backend],
            ip_address=microscope_host or ("localhost" if backend != "demo" else None),
        )
    if backend == "demo":
        # The Demo models a Ga column unless told otherwise; the daemon drives plasma FIBs.
        microscope.system.ion.plasma = True
        microscope.system.ion.plasma_gas = "Xenon"
    direct = (
        AutoScriptVerbs(microscope.connection, microscope._threading_lock) if backend == "thermo" else None
    )
    extra = {} if gis_warmup_s is None else {"gis_warmup_s": gis_warmup_s}
    beam = BridgeDualBeam(
        microscope,
        backend=backend,
        direct=direct,
        application_files={
            **(DEMO_APPLICATION_FILES if backend == "demo" else {}),
            **(application_files or {}),
        },
        state_file=state_file,
        **extra,
    )
    beam.check_application_files()
    return beam
