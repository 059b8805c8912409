"""Guards (hysteresis, settle time) on instrument states; the state diagram in sync with the table."""

from __future__ import annotations

from pathlib import Path

from kintsugi_daemon.config import GuardSettings
from kintsugi_daemon.drivers.base import InstrumentState
from kintsugi_daemon.states.guards import Guards
from kintsugi_daemon.states.table import mermaid_diagram
from tests.support.instrument_states import state

REPO = Path(__file__).resolve().parents[2]


SETTINGS = GuardSettings(beam_current_tolerance=0.15, min_free_disk_bytes=1000, settle_s=10.0)


def tripped(g: Guards, s: InstrumentState, free: int = 10**9, *, gis: bool = False) -> set[str]:
    g.update(g.evaluate(s, free, needs_gis=gis), 0.0)
    return set(g.tripped)


def test_current_band_has_hysteresis() -> None:
    g = Guards(SETTINGS)
    assert tripped(g, state(ion_a=14e-9)) == set()  # 7 % off: inside the band
    assert tripped(g, state(ion_a=12e-9)) == {"ion_current"}  # 20 % off: trips
    assert tripped(g, state(ion_a=13.2e-9)) == {"ion_current"}  # 12 %: inside 15 %, not yet under 7.5 %
    assert tripped(g, state(ion_a=14.2e-9)) == set()  # 5 %: clears


def test_vacuum_gis_and_disk() -> None:
    g = Guards(SETTINGS)
    assert tripped(g, state(vacuum="venting")) == {"vacuum"}
    assert tripped(g, state(gis_k=295.0), gis=True) == {"gis_temperature"}
    assert tripped(g, state(gis_k=295.0), gis=False) == set()  # only checked before a deposit
    assert tripped(g, state(), free=999) == {"disk"}
    assert tripped(g, state(), free=1200) == {"disk"}  # must clear past 1.5 x the minimum
    assert tripped(g, state(), free=1600) == set()


def test_resume_only_after_settling() -> None:
    g = Guards(SETTINGS)
    g.update(g.evaluate(state(vacuum="fault"), 10**9, needs_gis=False), 0.0)
    clear = g.evaluate(state(), 10**9, needs_gis=False)
    assert g.update(clear, 1.0) == ([], False)
    assert g.update(clear, 5.0)[1] is False
    assert g.update(clear, 11.5)[1] is True  # clear for 10.5 s >= settle_s
    g.update(g.evaluate(state(vacuum="fault"), 10**9, needs_gis=False), 12.0)
    assert g.update(clear, 13.0)[1] is False  # a relapse restarts the settle time


def test_state_diagram_is_generated_from_the_table() -> None:
    doc = (REPO / "docs" / "state-machine.md").read_text()
    assert mermaid_diagram().strip() in doc, (
        "run: python -m kintsugi_daemon.states.table docs/state-machine.md"
    )
