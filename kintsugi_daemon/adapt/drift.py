"""Drift: the fiducial's shift goes to beam shift, written as a whole point; near the limit the stage
takes it over; a poor match suspends the run (lag 1).

Convention: the fiducial match's shift is what moves the current image onto the reference, so the beam
shift offset that cancels the drift is the current offset minus the shift, in face-plane metres (the same
frame as the y-correction: rows are foreshortened in cross-section). The offset rides on top of the
y-correction the imaging step applies for the receding face.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kintsugi_daemon.adapt.decisions import Decision, decision
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import Recipe

__all__ = ["decide"]


def decide(history: Sequence[Observation], recipe: Recipe) -> list[Decision]:
    s = recipe.adapt.drift
    if not history:
        return []
    o = history[-1]
    fid = o.fiducial
    if fid is None:
        return [
            decision(
                "drift",
                "suspend",
                o,
                measured={},
                threshold=s.min_score,
                change={},
                why=f"slice {o.slice_index}: the fiducial was not imaged; not milling blind",
            )
        ]
    measured = {"shift_x_px": fid.shift_x_px, "shift_y_px": fid.shift_y_px, "score": fid.score}
    if fid.score < s.min_score:
        return [
            decision(
                "drift",
                "suspend",
                o,
                measured=measured,
                threshold=s.min_score,
                change={},
                why=f"fiducial match score {fid.score:.2f} below {s.min_score}: fiducial lost",
            )
        ]
    # The shift is measured with this slice's offset applied: relative to what we already corrected.
    step = math.hypot(fid.shift_x_px, fid.shift_y_px)
    if step > s.max_step_px:
        return [
            decision(
                "drift",
                "suspend",
                o,
                measured=measured,
                threshold=s.max_step_px,
                change={},
                why=f"fiducial moved {step:.1f} px in one slice (more than {s.max_step_px}): not believed",
            )
        ]
    if step <= s.deadband_px:
        return []
    x = o.settings.beam_shift_offset_x_m - fid.shift_x_px * o.pixel_size_m
    y = o.settings.beam_shift_offset_y_m - fid.shift_y_px * o.pixel_size_y_m
    near = s.stage_fraction * o.beam_shift_limit_m
    if abs(x) > near or abs(y) > near:
        # Hand the whole accumulated offset to the stage; the beam goes back to its centre. The stage
        # moves the specimen, beam shift moves the beam: the same correction has the opposite sign.
        return [
            decision(
                "drift",
                "stage_move",
                o,
                measured=measured,
                threshold=near,
                change={
                    "stage_move_x_m": -x,
                    "stage_move_y_m": -y,
                    "beam_shift_offset_x_m": 0.0,
                    "beam_shift_offset_y_m": 0.0,
                },
                why=f"drift offset ({x * 1e9:.0f}, {y * 1e9:.0f}) nm nears the beam-shift limit: stage move",
            )
        ]
    return [
        decision(
            "drift",
            "beam_shift",
            o,
            measured=measured,
            threshold=s.deadband_px,
            change={"beam_shift_offset_x_m": x, "beam_shift_offset_y_m": y},
            why=f"fiducial shifted ({fid.shift_x_px:.2f}, {fid.shift_y_px:.2f}) px",
        )
    ]
