"""Drills: the daemon killed, starved or cut off on purpose; each guarantee seen red once by its mutation."""

from tests.support.simulator import scope, sim, start_sim

__all__ = ["scope", "sim", "start_sim"]
