"""Fixtures every kind of test shares. Each kind (unit/, integration/, drills/) has its own conftest."""

from tests.support.simulator import sim_cache

__all__ = ["sim_cache"]
