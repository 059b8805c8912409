"""Integration tests: real processes (simulator, Mosquitto, the daemon) over their real interfaces."""

from tests.support.simulator import scope, sim, start_sim

__all__ = ["scope", "sim", "start_sim"]
